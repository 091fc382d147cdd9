"""launch/experiments/: experiment.py at a tiny configuration writes its runs and table; loss_spread.py's
statistics on a known series, and its quick run writes the JSON, the table and the plot.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')
from tests.helpers.scripts import PYTHON, run_script

# ----------------------------------------------------------------------------- experiment.py


def test_experiment_cli_at_a_tiny_configuration(tmp_path):
    out = tmp_path / 'exp'
    proc = run_script([PYTHON, 'launch/experiments/experiment.py', '--world-size', '2', '--modes', 'local', 'global',
                 '--batch-sizes', '1', '2', '--seeds', '0', '--train-samples', '8', '--eval-samples', '20',
                 '--epochs', '1', '--out', str(out)], timeout=150)
    payload = json.loads(out.with_suffix('.json').read_text())
    assert payload['complete'] is True and len(payload['runs']) == 4
    assert {(r['mode'], r['batch_size_per_rank']) for r in payload['runs']} == {
        ('local', 1), ('global', 1), ('local', 2), ('global', 2)}
    assert {r['samples_seen'] for r in payload['runs']} == {8}  # the same samples for every configuration
    assert all(r['world_size'] == 2 and 0.0 <= r['eval_accuracy'] <= 1.0 for r in payload['runs'])
    table = out.with_suffix('.md').read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith('| ') and ln[2].isdigit()]
    assert len(rows) == 4 and '| global |' in table and '±' in table
    assert table in proc.stdout


# ----------------------------------------------------------------------------- loss_spread.py


def test_loss_spread_statistics_on_a_known_series():
    from launch.experiments.loss_spread import spread

    s = spread([1.0, 2.0, 4.0, 7.0])
    assert s['mean'] == pytest.approx(3.5)
    assert s['std'] == pytest.approx(torch.tensor([1.0, 2.0, 4.0, 7.0]).std().item())
    assert s['diff_std'] == pytest.approx(1.0)  # differences 1, 2, 3
    assert spread([5.0]) == {'mean': 5.0, 'std': None, 'diff_std': None}


def test_loss_spread_quick_writes_json_table_and_plot(tmp_path):
    from PIL import Image

    out, png = tmp_path / 'spread', tmp_path / 'spread.png'
    proc = run_script([PYTHON, 'launch/experiments/loss_spread.py', '--quick', '--out', str(out), '--plot', str(png)],
                      timeout=150)
    payload = json.loads(out.with_suffix('.json').read_text())
    assert payload['complete'] is True and payload['setup']['quick'] is True
    runs = {r['variant']: r for r in payload['runs']}
    assert set(runs) == {'batch', 'per-sample', 'none'} and len(payload['runs']) == 3
    for variant, r in runs.items():
        assert r['world_size'] == 2 and r['global_batch_size'] == 16 and r['steps'] == 6 and len(r['loss']) == 6
        assert len(r['lambda']) == (0 if variant == 'none' else 6)
        assert set(r['stats']) >= {'loss_std', 'loss_diff_std', 'lambda_std', 'eval_accuracy', 'wall_s'}
    # Batch mode: every rank logs the one λ; per-sample: each rank its own samples' mean.
    assert runs['batch']['lambda'] == runs['batch']['lambda_rank0']
    assert runs['per-sample']['stats']['lambda_std'] < runs['batch']['stats']['lambda_std']
    summary = payload['summary']
    assert set(summary['by_variant']) == {'batch', 'per-sample', 'none'}
    assert set(summary['per_sample_over_batch']) == {'loss_std', 'loss_diff_std', 'loss_diff_std_2nd_half',
                                                     'lambda_std'}
    assert 0.0 <= summary['batch_loss_diff_r2_on_label_entropy'] <= 1.0
    assert summary['expected_lambda_std']['global_batch_mean_std'] == pytest.approx(
        summary['expected_lambda_std']['per_sample_lambda_std'] / 4)
    table = out.with_suffix('.md').read_text()
    assert table in proc.stdout and '| per-sample |' in table and '±' in table
    with Image.open(png) as img:
        assert img.format == 'PNG' and img.size == (880, 1045)

"""``launch/benchmarks/bench_loss.py`` runs as a script and as a module, at a tiny size, and reports one row per
(class count, dtype) with both timings, the ratio and the two losses' agreement (never its timings)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.benchmarks.bench_loss import build_parser, loss_markdown, run_loss

ROOT = Path(__file__).resolve().parents[2]
TINY = ['--n', '6', '--classes', '5,9', '--iters', '2', '--warmup', '1']


def _check_rows(rows: list[dict], device: str = 'cpu') -> None:
    assert [(r['classes'], r['dtype']) for r in rows] == [(5, 'float32'), (5, 'bfloat16'), (9, 'float32'),
                                                          (9, 'bfloat16')]
    for r in rows:
        assert r['n'] == 6 and r['device'] == device and r['iters'] == 2
        assert len(r['samples_ms']['ours']) == len(r['samples_ms']['dense']) == 2
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ('ours_ms', 'dense_ms', 'speedup'))
        assert r['ours_faults'] >= 0 and r['dense_faults'] >= 0
        # the two losses agree: float32 to rounding; bfloat16, where F.cross_entropy computes in bfloat16, loosely
        assert r['loss_rel_diff'] < (1e-6 if r['dtype'] == 'float32' else 2e-2), r


@pytest.mark.parametrize('how', ['script', 'module'])
def test_the_benchmark_runs_and_writes_its_rows(tmp_path, how: str) -> None:
    out = tmp_path / 'loss.json'
    entry = [str(ROOT / 'launch' / 'benchmarks' / 'bench_loss.py')] if how == 'script' \
        else ['-m', 'launch.benchmarks.bench_loss']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop('PYTHONPATH', None)  # the script must find the project itself
    done = subprocess.run([sys.executable, *entry, *TINY, '--json', str(out)],
                          cwd=ROOT if how == 'module' else tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    _check_rows(report['rows'])
    assert report['environment']['threads'] == 1 and report['environment']['device'] == 'cpu'
    assert report['markdown'] in done.stdout and '| N | C | dtype |' in done.stdout


def test_run_loss_takes_the_device_for_the_gpu_check() -> None:
    rows = run_loss('cpu', n=6, classes=(5, 9), iters=2, warmup=1)
    _check_rows(rows)
    assert loss_markdown(rows).count('\n') == 1 + len(rows)


def test_bad_arguments_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(['--classes', '0'])
    assert "expected comma-separated positive ints, got '0'" in capsys.readouterr().err

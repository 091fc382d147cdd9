"""launch/benchmarks/benchmark.py runs every part at tiny sizes and reports what it should.

Timings are never asserted (they depend on the machine and its load); shapes of the report,
positive numbers, byte counts (exact arithmetic) and the same-work checks inside the script are.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')
pytest.importorskip('timm', reason="the op benchmark compares against timm: pip install '.[bench]'")
pytest.importorskip('torchvision')

from launch.benchmarks import bench_exchange, bench_op  # noqa: E402
from launch.benchmarks import benchmark as bench  # noqa: E402
from tests.helpers.spawn import run_ranks  # noqa: E402

TINY = ['--quick', '--op-shapes', '4x3x8x8', '--exchange-shapes', '4x3x8x8,2x1x6x6', '--iters', '2']


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_run_reports_every_part(tmp_path, capsys, keep_threads):
    out = tmp_path / 'bench.json'
    bench.main([*TINY, '--json', str(out)])
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out

    assert report['environment']['threads'] == 1
    assert 'torch.set_num_threads(1)' in printed

    # op: one row per shape and layout, every implementation timed, every ratio positive
    assert [(r['shape'], r['layout']) for r in report['op']] == [([4, 3, 8, 8], k) for k in bench.LAYOUTS]
    impls = {'floor', 'ours', 'ours+targets', 'ours cutmix_batch', 'composer', 'timm', 'torchvision'}
    for row in report['op']:
        assert set(row['median_s']) == impls
        assert all(_positive(v) for v in row['median_s'].values())
        assert all(len(v) == row['iters'] >= 2 for v in row['samples_s'].values())
        assert _positive(row['floor_gbps']) and set(row['faults_per_call']) == impls
        assert all(_positive(v) for v in row['ratio'].values())
        assert row['profile'] and all(name.startswith('aten::') for name, _ in row['profile'])
    assert '| 4x3x8x8 | channels_last |' in printed

    # op, per-sample boxes: ours, timm elem and our batch mode on the same draws, in every layout
    for row in report['op']:
        ps = row['per_sample']
        assert set(ps['median_s']) == set(ps['faults_per_call']) == set(bench_op.PS_IMPLS)
        assert all(_positive(v) for v in ps['median_s'].values())
        assert all(len(v) == row['iters'] for v in ps['samples_s'].values())
        assert set(ps['ratio']) == {'timm elem/ours per-sample', 'timm elem/ours per-sample+targets',
                                    'ours per-sample/ours batch (mean area)'}
        assert all(_positive(v) for v in ps['ratio'].values())
        assert 0 < ps['mean_box_share'] < 1 and 0 < ps['batch_box_share'] < 1
        assert ps['profile'] and all(name.startswith('aten::') for name, _ in ps['profile'])
    assert '### The op with per-sample boxes' in printed

    # exchange: one row per world size and shape; bytes are exact arithmetic
    rows = report['exchange']
    assert [(r['world'], r['shape']) for r in rows] == [(2, [4, 3, 8, 8]), (2, [2, 1, 6, 6])]
    for r in rows:
        b, c, h, w = r['shape']
        assert r['bytes_per_rank']['allgather'] == (r['world'] - 1) * b * (c * h * w * 4 + 8)
        assert 0 < r['bytes_per_rank']['ours'] < r['bytes_per_rank']['allgather']
        assert all(_positive(v) for v in r['median_s'].values())
        assert _positive(r['time_ratio']) and r['bytes_ratio'] > 1
        assert all(len(v) == 2 for v in r['step_s'].values())
        # per-sample: exactly the crops and labels that must cross, plus the handshake; batch mode at ~ the same λ
        ps = r['per_sample']
        handshake = (r['world'] - 1) * 3 * 8
        assert ps['payload_equals_required'] is True
        assert ps['bytes_per_rank']['ours per-sample'] == pytest.approx(ps['required_per_rank'] + handshake)
        assert ps['bytes_ratio'] == pytest.approx(1 + handshake / ps['required_per_rank'])
        assert ps['bytes_ratio_max'] >= ps['bytes_ratio'] > 1
        assert ps['max_lam_gap'] < 0.05
        assert all(_positive(v) for v in ps['median_s'].values()) and _positive(ps['time_ratio'])
        assert all(len(v) == 2 for v in ps['step_s'].values())
    assert '### The exchange with per-sample boxes' in printed

    # step: local on one rank, global on two, with and without CutMix; the default and inplace=True
    assert [(r['mode'], r['world'], r['variant'], r['inplace']) for r in report['step']] == [
        (mode, world, name, inplace) for mode, world in (('local', 1), ('global', 2))
        for name, inplace in (('default (copy)', None), ('inplace=True', True))]
    for r in report['step']:
        assert all(_positive(v) for v in r['median_step_s'].values())
        assert _positive(r['median_mix_s'])
        assert math.isfinite(r['share'])
        assert len(r['step_s']['with']) == len(r['step_s']['without']) == 2
        assert len(r['alternating_s']['plain']) == len(r['alternating_s']['mixed']) == 2
        assert math.isfinite(r['separate_runs_share']) and math.isfinite(r['null_share'])
    for default, inplace in zip(report['step'][0::2], report['step'][1::2], strict=True):  # the runs without are shared
        assert default['step_s']['without'] == inplace['step_s']['without']
        assert default['alternating_s'] != inplace['alternating_s']
    assert '| local | inplace=True |' in printed and '| global | default (copy) |' in printed

    # targets: every one listed; those this tiny run cannot measure say so
    assert [t['key'] for t in report['targets']] == list(bench.TARGETS)
    measured = {t['key']: t['measured'] for t in report['targets']}
    assert measured['op_vs_composer'] is None and measured['exchange_time'] is None
    assert measured['op_vs_floor'] is not None and measured['step_global'] is not None
    assert measured['op_ps_vs_timm'] is not None and measured['op_ps_vs_batch'] is not None
    assert measured['exchange_ps_bytes'] is None  # W = 4 only
    for header in ('### The op: median ms per call', '### The exchange', '### The training step', '### Targets'):
        assert header in printed


def test_part_picks_one_part(capsys, keep_threads):
    report = bench.main(['--part', 'op', '--quick', '--op-shapes', '2x3x4x4', '--layouts', 'bfloat16', '--iters', '1'])
    assert [r['layout'] for r in report['op']] == ['bfloat16']
    assert report['exchange'] == [] and report['step'] == []
    assert '### The exchange' not in capsys.readouterr().out


@pytest.mark.parametrize('argv', [['--iters', '0'], ['--worlds', '1'], ['--layouts', 'float64'],
                                  ['--op-shapes', '4x3x8'], ['--device', 'tpu']])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        bench._parse_args(argv)


def test_device_cuda_without_cuda_is_refused_clearly(monkeypatch, capsys, keep_threads):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert bench._parse_args(['--device', 'cuda']).device == 'cuda'  # the parser accepts it anywhere
    assert bench._parse_args([]).device == 'cpu'
    with pytest.raises(RuntimeError, match='--device cuda: CUDA is not available'):
        bench.main(['--device', 'cuda', '--part', 'op', '--quick'])
    assert capsys.readouterr().out == ''  # refused before anything ran
    with pytest.raises(RuntimeError, match='--device cuda'):
        bench.run_op([(2, 3, 4, 4)], 1, device='cuda')


def test_required_bytes_counts_each_crossing_crop_once():
    """Against a loop over samples: sample i on rank i // b takes its partner's pixels inside box i."""
    g = torch.Generator().manual_seed(3)
    b, world, c, h, w = 3, 3, 2, 7, 5
    params = bench_op.F.sample_params_per_sample(world * b, h, w, alpha=1.0, generator=g)
    for rank in range(world):
        expect = 0
        for i, (j, (y0, y1, x0, x1)) in enumerate(zip(params.indices.tolist(), params.boxes.tolist(), strict=True)):
            if j // b == rank != i // b:
                expect += c * (y1 - y0) * (x1 - x0) * 4 + 8
        assert bench_exchange.required_bytes(params, rank, b, c, 4, 8) == expect


@pytest.mark.parametrize('hw', [(32, 32), (224, 224), (6, 9)])
def test_mean_area_box_is_centred_and_close_to_the_mean_area(hw):
    h, w = hw
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        boxes = bench_op.F.sample_params_per_sample(16, h, w, alpha=1.0, generator=g).boxes
        mean = float(((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).double().mean())
        y0, y1, x0, x1 = bench_op._mean_area_box(boxes, h, w)
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
        assert abs((y1 - y0) * (x1 - x0) - mean) <= max(y1 - y0, x1 - x0, 1) + 2  # within a row or column, about
        assert abs((y0 + y1) - h) <= 1 and abs((x0 + x1) - w) <= 1


def _launched_rank(rank: int, world: int, out: str) -> dict:
    """As under ``composer -n 2``: the process group exists before the script starts."""
    return bench.main(['--part', 'exchange', *TINY, '--json', out])


def test_under_a_launcher_the_exchange_runs_on_its_process_group(tmp_path):
    out = tmp_path / 'launched.json'
    reports = run_ranks(_launched_rank, 2, tmp_path, str(out), deadline_s=120)
    assert [len(r['exchange']) for r in reports] == [2, 2]
    written = json.loads(out.read_text())  # rank 0 writes it
    assert [(r['world'], r['shape']) for r in written['exchange']] == [(2, [4, 3, 8, 8]), (2, [2, 1, 6, 6])]
    assert all(r['bytes_ratio'] > 1 for r in written['exchange'])


def _launched_wrong_part(rank: int, world: int) -> str:
    try:
        bench.main(['--part', 'op', '--quick'])
    except SystemExit as e:
        return str(e)
    return 'no error'


def test_under_a_launcher_other_parts_are_refused(tmp_path):
    messages = run_ranks(_launched_wrong_part, 2, tmp_path, deadline_s=60)
    assert all('only --part exchange' in m for m in messages)


# ---------------------------------------------------------------- launch/benchmarks/bench_memory.py


def test_memory_on_cpu_measures_what_the_formula_says(tmp_path, capsys):
    # N=4 samples of 3x8x8 float32 in microbatches of 2: B = 3,072 bytes, b = 1,536.
    from launch.benchmarks import bench_memory

    out = tmp_path / 'mem.json'
    report = bench_memory.main(['--batch', '4x3x8x8', '--microbatch', '2', '--steps', '1', '--json', str(out)])
    assert json.loads(out.read_text())['rows'] == report['rows']
    rows = {r['variant']: r for r in report['rows']}
    assert list(rows) == list(bench_memory.VARIANTS)
    big_b = 4 * 3 * 8 * 8 * 4
    # CPU: the loader's batch, Composer's deepcopy of a microbatch view (its whole storage), CutMix's copy
    assert {v: (r['formula'], r['formula_bytes']) for v, r in rows.items()} == {
        'without': ('2B', 2 * big_b), 'CutMix()': ('3B', 3 * big_b), 'CutMix(inplace=True)': ('2B', 2 * big_b),
        'CutMix(inplace=False)': ('3B', 3 * big_b)}
    for r in rows.values():
        assert r['batch_bytes'] == big_b and r['microbatch_bytes'] == big_b // 2
        assert r['input_bytes'] == r['formula_bytes'], r  # measured, storage by storage
        assert r['added_bytes'] == r['added_formula_bytes']
        assert r['microbatches_per_step'] == [2]  # the Trainer did split the batch
        assert all(b == big_b // 2 for s in r['steps'] for b in s['microbatch_bytes'])
        assert 'peak_bytes' not in r
    assert rows['CutMix()']['added_bytes'] == big_b and rows['CutMix(inplace=True)']['added_bytes'] == 0
    # between steps: the loader's batch (held by Composer's loop), and CutMix's copy where it made one
    assert {v: r['between_steps_bytes'] for v, r in rows.items()} == {
        'without': big_b, 'CutMix()': 2 * big_b, 'CutMix(inplace=True)': big_b, 'CutMix(inplace=False)': 2 * big_b}
    printed = capsys.readouterr().out
    assert '### Device memory with microbatching (cpu)' in printed
    assert '| CutMix(inplace=True) | 0.00614 | 2B |' in printed


def test_memory_counts_distinct_storages_of_input_shaped_tensors():
    from launch.benchmarks.bench_memory import input_bytes_alive

    shape = (3, 5, 7)  # no other live tensor in the test process has these trailing sizes
    before = input_bytes_alive('cpu', shape, torch.float32)
    batch = torch.zeros(6, *shape)
    views = list(batch.split(2))  # views: the batch's storage, counted once
    copy = views[0].clone()  # a copy: its own storage
    other = torch.zeros(6, *shape, dtype=torch.float64)  # another dtype: not the batch
    assert input_bytes_alive('cpu', shape, torch.float32) == (before[0] + batch.nbytes + copy.nbytes, before[1] + 2)
    excluded = frozenset({batch.untyped_storage().data_ptr()})
    assert input_bytes_alive('cpu', shape, torch.float32, excluded)[0] == before[0] + copy.nbytes
    del views, other


@pytest.mark.parametrize('argv', [['--microbatch', '0'], ['--batch', '4x3x8x8', '--microbatch', '5'],
                                  ['--batch', '4x3x8x8,2x3x8x8'], ['--steps', '0'], ['--device', 'tpu']])
def test_memory_bad_arguments_are_refused(argv):
    from launch.benchmarks import bench_memory

    with pytest.raises(SystemExit):
        bench_memory._parse_args(argv)


def test_memory_device_cuda_without_cuda_is_refused_clearly(monkeypatch, capsys):
    from launch.benchmarks import bench_memory

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(RuntimeError, match='--device cuda: CUDA is not available'):
        bench_memory.main(['--device', 'cuda', '--batch', '4x3x8x8', '--microbatch', '2'])
    assert capsys.readouterr().out == ''  # refused before anything ran
    with pytest.raises(RuntimeError, match='--device cuda'):
        bench_memory.measure('cuda', (4, 3, 8, 8), 2)


# ---------------------------------------------------------------- MixUp and MixUpCutMix rows


def test_mixup_part_reports_its_rows(capsys, keep_threads):
    report = bench.main(['--part', 'mixup', *TINY])
    assert report['op'] == [] and report['exchange'] == [] and report['step'] == []
    printed = capsys.readouterr().out

    # op: every implementation timed on the same draws (run_mixup_op checked that they give our pixels)
    assert [r['shape'] for r in report['mixup_op']] == [[4, 3, 8, 8]]
    for row in report['mixup_op']:
        assert set(row['median_s']) == set(row['faults_per_call']) == set(bench_op.MIXUP_IMPLS)
        assert all(_positive(v) for v in row['median_s'].values())
        assert all(len(v) == row['iters'] for v in row['samples_s'].values())
        assert set(row['ratio']) == {*(f'{k}/ours' for k in bench_op.MIXUP_PEERS), 'min peer/ours', 'ours/floor',
                                     'composer/ours mixup_batch'}
        assert all(_positive(v) for v in row['ratio'].values())
        assert 0 < row['mean_weight'] <= 0.5 and _positive(row['floor_gbps'])
        ps = row['per_sample']
        assert set(ps['median_s']) == set(bench_op.MIXUP_PS_IMPLS)
        assert all(_positive(v) for v in ps['median_s'].values())
        assert 0 < ps['cutmix_share'] < 1 and all(_positive(v) for v in ps['ratio'].values())
    assert '### MixUp, the op: median ms per call' in printed and '### MixUpCutMix per sample' in printed

    # exchange: W = 2 in the quick run; ours sends exactly the bytes the bare all_to_all_single moved
    rows = report['mixup_exchange']
    assert [(r['world'], r['shape'], r['mode']) for r in rows] == [
        (2, s, m) for s in ([4, 3, 8, 8], [2, 1, 6, 6]) for m in bench_exchange.MIXUP_MODES]
    for r in rows:
        b, c, h, w = r['shape']
        handshake = (r['world'] - 1) * 3 * 8
        assert r['bytes_per_rank']['allgather'] == (r['world'] - 1) * b * (c * h * w * 4 + 8)
        assert r['sent_equals_a2a'] is True
        assert r['bytes_per_rank']['ours'] == pytest.approx(r['required_per_rank'] + handshake)
        assert r['sent_over_required'] == pytest.approx(1 + handshake / r['required_per_rank'])
        assert all(_positive(v) for v in r['median_s'].values()) and _positive(r['a2a_ratio'])
        assert all(len(v) == 2 for v in r['step_s'].values())
    assert '### MixUp and MixUpCutMix, the exchange' in printed

    measured = {t['key']: t['measured'] for t in report['targets']}
    assert measured['mixupcutmix_ps_vs_timm'] is not None
    assert measured['mixup_vs_peers'] is None and measured['mixup_exchange_a2a'] is None  # 224 rows, W = 4 only


def test_mixup_same_work_check_catches_a_different_blend():
    """The pinned peers must give our pixels for their pairing: a peer that pairs otherwise is caught, by name."""
    n, h, w = 4, 8, 8
    x, y = torch.rand(n, 3, h, w), torch.arange(n)
    p = bench_op._draw_mixup(n, h, w, 1, 0)[0]
    holder: dict = {}
    with bench_op._pinned_timm(holder) as (timm_mixup, timm_elem):
        tv = bench_op._pinned_torchvision_mixup(holder)
        bench_op._check_same_mixup(x, y, p, timm_mixup, timm_elem, tv, holder)  # the same work: no error
        flipped = lambda a, t: timm_mixup(a.clone(), t)  # noqa: E731  pairs i with n-1-i, not torchvision's i-1
        with pytest.raises(RuntimeError, match='^torchvision does not reproduce our MixUp'):
            bench_op._check_same_mixup(x, y, p, timm_mixup, timm_elem, flipped, holder)
        with pytest.raises(RuntimeError, match='^timm elem does not reproduce'):
            bench_op._check_same_mixup(x, y, p, timm_mixup, tv, tv, holder)
        ps = bench_op._draw_mixupcutmix(n, h, w, 1, 0)[0]
        bench_op._check_same_mixupcutmix(x, y, ps, timm_elem, holder)


def test_mixup_split_bytes_count_each_region_and_label():
    """Against a loop: rank r sends each of its samples' pixels in the destination's region and a label."""
    from dist_cutmix import MixSpec, sample_mix

    b, world, c, h, w = 3, 3, 2, 7, 5
    g = torch.Generator().manual_seed(4)
    p = sample_mix(MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8), world * b, h, w, per_sample=True,
                   generator=g)
    for rank in range(world):
        send, recv = bench_exchange._split_bytes(p, rank, world, b, c * 4, 8)
        expect_send, expect_recv = [0] * world, [0] * world
        for i, (j, (y0, y1, x0, x1)) in enumerate(zip(p.indices.tolist(), p.boxes.tolist(), strict=True)):
            size = c * max(y1 - y0, 0) * max(x1 - x0, 0) * 4 + 8
            if j // b == rank:
                expect_send[i // b] += size
            if i // b == rank:
                expect_recv[j // b] += size
        assert (send, recv) == (expect_send, expect_recv)

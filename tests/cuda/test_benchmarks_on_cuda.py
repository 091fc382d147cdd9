"""The benchmarks on a GPU: ``--device cuda`` times the op with CUDA events against every peer, and
bench_memory.py trains on a GPU and measures the whole batch's move and the peak (on a fresh NCCL rank).

Skipped without a CUDA GPU, and without Composer (a peer of the op and the Trainer of the memory benchmark).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')
pytest.importorskip('timm', reason="the op benchmark compares against timm: pip install '.[bench]'")
pytest.importorskip('torchvision')

from launch.benchmarks import benchmark as bench  # noqa: E402
from tests.helpers.spawn import run_nccl_ranks  # noqa: E402


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA: --device cuda times the op on a GPU')
def test_device_cuda_times_the_op_on_the_gpu(capsys, keep_threads):
    report = bench.main(['--device', 'cuda', '--part', 'op', '--quick'])
    assert report['environment']['gpu'] and report['exchange'] == [] and report['step'] == []
    impls = {'floor', 'ours', 'ours+targets', 'ours cutmix_batch', 'composer', 'timm', 'torchvision'}
    assert [(r['shape'], r['layout']) for r in report['op']] == [(list(s), k) for s in bench.QUICK['op_shapes']
                                                                 for k in bench.LAYOUTS]
    for row in report['op']:
        assert row['device'] == 'cuda' and set(row['median_s']) == impls
        assert all(_positive(v) for v in row['median_s'].values())
        assert all(len(v) == row['iters'] for v in row['samples_s'].values())
        assert all(_positive(v) for v in row['ratio'].values()) and _positive(row['floor_gbps'])
    printed = capsys.readouterr().out
    assert 'timed with CUDA events' in printed and '### The op: median ms per call' in printed


def _memory_on_cuda_rank(rank: int, world_size: int) -> tuple[list, str]:
    from launch.benchmarks import bench_memory

    report = bench_memory.main(['--device', 'cuda', '--batch', '64x3x64x64', '--microbatch', '8', '--steps', '2'])
    return report['rows'], bench_memory.memory_markdown(report['rows'])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: bench_memory --device cuda trains on a GPU (Trainer device='gpu') and reads "
                           'torch.cuda.max_memory_allocated')
def test_memory_on_cuda_measures_the_whole_batch_move(tmp_path):
    # On a fresh NCCL rank: a CPU Trainer earlier in this pytest process left Composer's gloo group, and
    # Composer refuses the NCCL one a GPU Trainer needs in the same process.
    [(report_rows, printed)] = run_nccl_ranks(_memory_on_cuda_rank, 1, tmp_path)
    rows = {r['variant']: r for r in report_rows}
    big_b, small_b = 64 * 3 * 64 * 64 * 4, 8 * 3 * 64 * 64 * 4
    # one microbatch (and Composer's deepcopy of it) without CutMix; the whole batch moved with it
    assert {v: r['formula_bytes'] for v, r in rows.items()} == {
        'without': 2 * small_b, 'CutMix()': 2 * big_b, 'CutMix(inplace=True)': 2 * big_b,
        'CutMix(inplace=False)': 2 * big_b}
    for name, r in rows.items():
        assert r['device'] == 'cuda' and r['input_bytes'] == r['formula_bytes'], r
        assert r['microbatches_per_step'] == [8, 8]
        assert r['peak_bytes'] >= r['input_bytes'] > 0
        assert r['between_steps_bytes'] == (0 if name == 'without' else big_b)  # the last mixed batch stays
        if name != 'without':  # the peak grows by at least what the loop holds (1 MiB for allocator slack)
            assert r['peak_added_bytes'] >= 2 * (big_b - small_b) - 2**20
    assert 'peak allocated per step (MB)' in printed

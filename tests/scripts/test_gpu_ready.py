"""The suite and the scripts on a machine with GPUs: gloo ranks see no GPU, so nothing in them picks one by
itself; and the prepared GPU check, run here, stops only for want of CUDA and runs without Composer.

On a GPU machine, code that chooses its own device takes the GPU whenever torch sees one: Composer's
FSDP2 setup (``get_device()`` with no argument) and ``launch/train.py --device auto``. Inside a gloo
rank that is wrong (Composer then wants NCCL, or a GPU ordinal one GPU lacks). ``launch.tools.spawn``
starts gloo ranks, and the forkserver they fork from, with ``CUDA_VISIBLE_DEVICES=''``. These tests
check that environment where it is set, and the device choices it leads to; on a CPU-only host the
choices are the CPU anyway, so the environment checks are what can fail here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.tools.spawn import GLOO_RANK_ENV
from launch.train import _device_name
from tests.helpers.spawn import run_ranks


def _environment_of_rank(rank: int, world_size: int) -> dict:
    """What a gloo rank sees: its own CUDA_VISIBLE_DEVICES, its parent's (the forkserver's) and torch's GPU count."""
    parent = Path(f'/proc/{os.getppid()}')
    items = (parent / 'environ').read_bytes().decode(errors='replace').split('\0')
    parent_env = dict(item.split('=', 1) for item in items if '=' in item)
    return {
        'visible': os.environ.get('CUDA_VISIBLE_DEVICES'),
        'parent_visible': parent_env.get('CUDA_VISIBLE_DEVICES'),
        'parent_cmdline': (parent / 'cmdline').read_bytes().decode(errors='replace').replace('\0', ' '),
        'cuda_available': torch.cuda.is_available(),
        'device_count': torch.cuda.device_count(),
    }


@pytest.mark.skipif(not Path('/proc/self/environ').exists(), reason='reads the forkserver environment from /proc')
def test_gloo_ranks_and_their_forkserver_see_no_gpu(tmp_path: Path) -> None:
    assert GLOO_RANK_ENV == {'CUDA_VISIBLE_DEVICES': ''}
    before = os.environ.get('CUDA_VISIBLE_DEVICES')
    for rank, seen in enumerate(run_ranks(_environment_of_rank, 2, tmp_path, deadline_s=60)):
        assert seen['visible'] == '', f'rank {rank}: CUDA_VISIBLE_DEVICES={seen["visible"]!r}'
        # The server the rank forked from started without GPUs too: a device count it cached says 0.
        assert 'forkserver' in seen['parent_cmdline'], f'rank {rank} was not forked by the forkserver: {seen}'
        assert seen['parent_visible'] == '', f'rank {rank}: the forkserver has CUDA_VISIBLE_DEVICES={seen}'
        assert not seen['cuda_available'] and seen['device_count'] == 0, f'rank {rank}: {seen}'
    # The pytest process keeps its own environment (the variable was set only while the server started).
    assert os.environ.get('CUDA_VISIBLE_DEVICES') == before


def test_a_caller_may_still_show_a_gloo_rank_a_gpu(tmp_path: Path) -> None:
    # gloo can carry CUDA tensors: a caller that wants a GPU in a gloo rank says so, and its value wins.
    seen = run_ranks(_environment_of_rank, 1, tmp_path, env={'CUDA_VISIBLE_DEVICES': '0'}, deadline_s=60)
    assert seen[0]['visible'] == '0'


def _device_choices(rank: int, world_size: int) -> dict:
    from launch.train import _device_name

    return {choice: _device_name(choice, cuda_available=True) for choice in ('auto', 'cpu', 'gpu')}


def test_train_device_auto_takes_the_cpu_inside_a_gloo_group_even_with_cuda(tmp_path: Path) -> None:
    # Outside a process group, auto follows CUDA; inside a gloo rank it must not, whatever torch sees.
    assert _device_name('auto', cuda_available=True) == 'gpu'
    assert _device_name('auto', cuda_available=False) == 'cpu'
    for choices in run_ranks(_device_choices, 2, tmp_path, deadline_s=60):
        assert choices == {'auto': 'cpu', 'cpu': 'cpu', 'gpu': 'gpu'}
    with pytest.raises(ValueError, match='--device gpu'):
        _device_name('gpu', cuda_available=False)


def _composer_device(rank: int, world_size: int) -> str:
    from composer.utils import get_device

    return type(get_device(None)).__name__


def test_composer_picks_the_cpu_in_a_gloo_rank(tmp_path: Path) -> None:
    # Composer's FSDP2 setup calls get_device() with no argument: CUDA_VISIBLE_DEVICES='' makes it the CPU.
    pytest.importorskip('composer', reason='needs the composer extra')
    assert run_ranks(_composer_device, 2, tmp_path, deadline_s=60) == ['DeviceCPU', 'DeviceCPU']


# ----------------------------------------------------------------------------- the prepared GPU check

ROOT = Path(__file__).resolve().parents[2]


def _block_composer(folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import composer`` fail as where it is not installed."""
    (folder / 'composer').mkdir(parents=True)
    (folder / 'composer' / '__init__.py').write_text("raise ImportError('composer is blocked for this test')\n")
    return folder


def _run_gpu_check(outdir: Path, pythonpath: list[Path]) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, 'launch/tools/gpu_check.py', str(outdir), '--quick'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    report = json.loads((outdir / 'gpu_check.json').read_text())
    return proc, report


def _check_stopped_for_cuda_only(proc: subprocess.CompletedProcess, report: dict, outdir: Path) -> None:
    out = f'stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}'
    assert proc.returncode == 2, out
    steps = report['steps']
    assert [n for n, s in steps.items() if s['status'] == 'ok'] == ['environment', 'imports', 'cpu reference'], out
    assert steps['cuda']['status'] == 'failed' and steps['cuda']['reason'].startswith('needs CUDA: '), steps['cuda']
    assert all(steps[n] == {'status': 'not run', 'reason': 'needs CUDA', 'seconds': 0.0}
               for n in ('cuda tests', 'op benchmark', 'train step'))
    assert 'want of CUDA only' in report['verdict']
    # the CPU reference ran the op benchmark's peers and every train-step variant for real
    [row] = steps['cpu reference']['result']['op']['rows']
    for impl in ('ours', 'timm', 'torchvision', 'floor'):
        assert 0 < row['median_s'][impl] < 1, (impl, row['median_s'])
    step = steps['cpu reference']['result']['step']
    from launch.tools.gpu_check import STEP_VARIANTS

    assert list(step['median_ms']) == list(STEP_VARIANTS) and all(v > 0 for v in step['median_ms'].values())
    md = (outdir / 'gpu_check.md').read_text()
    assert 'needs CUDA: CUDA is not available here' in md and '| cpu reference | ok |' in md


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks what the GPU check does where CUDA is missing')
def test_gpu_check_here_stops_only_for_want_of_cuda_and_writes_what_it_can(tmp_path: Path) -> None:
    proc, report = _run_gpu_check(tmp_path / 'out', [ROOT])
    _check_stopped_for_cuda_only(proc, report, tmp_path / 'out')


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks what the GPU check does where CUDA is missing')
def test_gpu_check_runs_without_composer(tmp_path: Path) -> None:
    blocked = _block_composer(tmp_path / 'blocked')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocked), str(ROOT)]))
    probe = subprocess.run([sys.executable, '-c', 'import dist_cutmix.functional'], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0 and 'composer is blocked' in probe.stderr:
        pytest.skip('dist_cutmix/__init__.py imports Composer: the core must import without it')
    proc, report = _run_gpu_check(tmp_path / 'out', [blocked, ROOT])
    _check_stopped_for_cuda_only(proc, report, tmp_path / 'out')
    assert report['steps']['environment']['result']['composer'] is None
    assert report['steps']['imports']['result']['composer_imported'] is False
    [row] = report['steps']['cpu reference']['result']['op']['rows']
    assert 'composer' not in row['median_s']  # the peer is left out, the others timed

"""Run a function on W real gloo ranks, each in its own subprocess.

Ranks meet through a ``FileStore`` in the test's own temporary folder (no ports to collide
on), start from a ``forkserver`` with torch and composer preloaded (about 0.1 s a rank instead
of several seconds of imports), and run single-threaded. A rank's traceback travels back to
the parent; a rank that fails, hangs or never starts fails the test. Nothing here falls back to
one process.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

_PRELOAD = ['torch', 'torch.distributed', 'composer', 'composer.trainer', 'dist_cutmix', 'tests.spawn']
_CTX = mp.get_context('forkserver')
_CTX.set_forkserver_preload(_PRELOAD)

COLLECTIVE_TIMEOUT_S = 30.0


def _patch_cpuinfo() -> None:
    """Composer asks py-cpuinfo about the CPU in every Trainer (~1 s); answer from a constant."""
    import cpuinfo

    cpuinfo.get_cpu_info = lambda: {'brand_raw': 'test-cpu', 'count': os.cpu_count()}


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    workdir: str,
    env: dict[str, str],
    args: tuple[Any, ...],
    collective_timeout_s: float,
) -> None:
    out = Path(workdir) / f'rank{rank}.result'
    os.environ.update(env)
    os.environ.update({
        'RANK': str(rank),
        'WORLD_SIZE': str(world_size),
        'LOCAL_RANK': os.environ.get('LOCAL_RANK', str(rank)),
        'LOCAL_WORLD_SIZE': os.environ.get('LOCAL_WORLD_SIZE', str(world_size)),
        'NODE_RANK': os.environ.get('NODE_RANK', '0'),
        'OMP_NUM_THREADS': '1',
    })
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    _patch_cpuinfo()
    try:
        store = dist.FileStore(str(Path(workdir) / 'store'), world_size)
        dist.init_process_group(
            'gloo', store=store, rank=rank, world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
        result = fn(rank, world_size, *args)
        payload = ('ok', result)
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank attached
        payload = ('error', traceback.format_exc())
    with open(out, 'wb') as f:
        pickle.dump(payload, f)
    # Skip interpreter teardown: a process group torn down while a peer still talks can hang.
    os._exit(0 if payload[0] == 'ok' else 1)


class RankError(AssertionError):
    """A spawned rank failed, hung or never reported."""


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    workdir: str | os.PathLike[str],
    *args: Any,
    deadline_s: float = 120.0,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    env: dict[str, str] | None = None,
    per_rank_env: Callable[[int], dict[str, str]] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    ``fn`` must be importable (module level). Raises :class:`RankError` carrying every failing
    rank's traceback when any rank raises, exits non-zero, or runs past ``deadline_s``.
    """
    workdir = Path(workdir) / f'ranks-{time.monotonic_ns()}'
    workdir.mkdir(parents=True)
    procs = []
    for rank in range(world_size):
        rank_env = dict(env or {})
        if per_rank_env is not None:
            rank_env.update(per_rank_env(rank))
        p = _CTX.Process(
            target=_child,
            args=(fn, rank, world_size, str(workdir), rank_env, args, collective_timeout_s),
            daemon=True,
        )
        p.start()
        procs.append(p)

    stop_at = time.monotonic() + deadline_s
    first_failure: float | None = None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if any(p.exitcode not in (None, 0) for p in procs) and first_failure is None:
            first_failure = now
        # Once one rank failed, give its peers a moment to fail too, then stop them.
        if now > stop_at or (first_failure is not None and now > first_failure + collective_timeout_s + 5):
            break
        time.sleep(0.01)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()

    results, errors = [], []
    for rank, p in enumerate(procs):
        path = workdir / f'rank{rank}.result'
        if path.exists():
            with open(path, 'rb') as f:
                status, value = pickle.load(f)
        else:
            status, value = 'error', f'no result (exit code {p.exitcode}{", killed after deadline" if rank in hung else ""})'
        if status == 'ok' and p.exitcode == 0:
            results.append(value)
        else:
            errors.append(f'--- rank {rank} (exit code {p.exitcode}) ---\n{value}')
    if errors:
        raise RankError(f'{len(errors)} of {world_size} ranks failed:\n' + '\n'.join(errors))
    return results

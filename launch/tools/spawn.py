"""Run a function on W real ranks of this machine (gloo, or NCCL on GPUs), each in its own subprocess.

The one spawner of this repository: the benchmark's exchange and step parts use it, and so do the
tests (``tests/helpers/spawn.py`` adds what only tests want). Ranks meet through a ``FileStore`` in a
folder of the caller's (no ports to collide on) and by default start from a ``forkserver`` with
torch and Composer preloaded (about 0.1 s a rank instead of seconds of imports). CUDA ranks
(``backend='nccl'``) start from fresh ``spawn`` interpreters instead, one GPU each: the forkserver
has imported torch with CPU state and must not hand it to a process that initialises CUDA. A
rank's traceback travels back to the caller; a rank that fails, hangs or never starts raises there.
Nothing here falls back to one process.

Gloo ranks see no GPU: they start with ``CUDA_VISIBLE_DEVICES=''`` (unless the caller's ``env`` says
otherwise), and so does the forkserver they fork from, so a CUDA state the preloaded imports might
create there counts no device either. Code that picks its device itself (Composer's FSDP2 setup calls
``get_device()``, which takes the GPU whenever torch sees one; ``launch/train.py --device auto``)
then picks the CPU, as a gloo group needs, on a machine with GPUs too.
"""
from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import pickle
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ['FORKSERVER', 'GLOO_RANK_ENV', 'answer_cpuinfo_from_constant', 'run_ranks']

FORKSERVER = mp.get_context('forkserver')
# Composer is an extra: preload it only where it is installed.
COMPOSER_PRELOAD = ['composer', 'composer.trainer'] if importlib.util.find_spec('composer') else []
FORKSERVER.set_forkserver_preload(['torch', 'torch.distributed', *COMPOSER_PRELOAD, 'dist_cutmix'])


GLOO_RANK_ENV = {'CUDA_VISIBLE_DEVICES': ''}
"""Set in every gloo rank (before its body runs) and in the forkserver it forks from: no GPU in sight."""


def _ensure_forkserver_sees_no_gpu() -> None:
    """Start the forkserver, if it is not running, with ``GLOO_RANK_ENV`` in its environment.

    The server is an ``exec``'d interpreter that inherits this process's environment at start; a
    forked rank inherits the server's memory, including any CUDA device count cached there, which
    a later ``CUDA_VISIBLE_DEVICES`` in the rank would no longer change. Only gloo ranks use the server.
    """
    from multiprocessing import forkserver

    saved = {k: os.environ.get(k) for k in GLOO_RANK_ENV}
    os.environ.update(GLOO_RANK_ENV)
    try:
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def answer_cpuinfo_from_constant() -> None:
    """Composer asks py-cpuinfo about the CPU in every Trainer (~1 s a rank); answer from a constant.

    For ``run_ranks(..., setup=answer_cpuinfo_from_constant)`` where many short Trainers run. Without
    Composer (and its py-cpuinfo) there is no Trainer to ask, and nothing to do.
    """
    try:
        import cpuinfo
    except ImportError:
        return

    cpuinfo.get_cpu_info = lambda: {'brand_raw': 'cpu', 'count': os.cpu_count()}


def _check_on_host(value: Any, where: str = 'result') -> None:
    """Raise if ``value`` holds a tensor off the CPU: the caller must read results without a GPU context."""
    import torch

    if isinstance(value, torch.Tensor) and value.device.type != 'cpu':
        raise TypeError(f'{where} is a {value.device} tensor; return CPU tensors')
    if isinstance(value, dict):
        for k, v in value.items():
            _check_on_host(v, f'{where}[{k!r}]')
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_on_host(v, f'{where}[{i}]')


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    workdir: str,
    env: dict[str, str],
    threads: int,
    setup: Optional[Callable[[], None]],
    args: tuple[Any, ...],
    collective_timeout_s: float,
    backend: str,
) -> None:
    os.environ.update(env)
    os.environ.update({
        'RANK': str(rank),
        'WORLD_SIZE': str(world_size),
        'LOCAL_RANK': os.environ.get('LOCAL_RANK', str(rank)),
        'LOCAL_WORLD_SIZE': os.environ.get('LOCAL_WORLD_SIZE', str(world_size)),
        'NODE_RANK': os.environ.get('NODE_RANK', '0'),
        'OMP_NUM_THREADS': str(threads),
    })
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        if backend == 'gloo' and os.environ.get('CUDA_VISIBLE_DEVICES') == '' and torch.cuda.is_available():
            raise RuntimeError(
                "a gloo rank sees a GPU although CUDA_VISIBLE_DEVICES='': CUDA was initialised before the rank "
                'was forked (in the forkserver?), so code that picks its own device would take the GPU',
            )
        if backend == 'nccl':
            if not torch.cuda.device_count():
                raise RuntimeError("backend='nccl' needs a CUDA GPU; torch sees none in this rank")
            torch.cuda.set_device(rank % torch.cuda.device_count())
        if setup is not None:
            setup()
        store = dist.FileStore(str(Path(workdir) / 'store'), world_size)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout_s),
        )
        result = fn(rank, world_size, *args)
        if backend == 'nccl':
            _check_on_host(result)
            # NCCL collectives run asynchronously on the GPU: no rank leaves while a peer may still be in one.
            dist.barrier()
        payload = ('ok', result)
    except BaseException:  # noqa: BLE001 - the caller raises it with the rank attached
        payload = ('error', traceback.format_exc())
    with open(Path(workdir) / f'rank{rank}.result', 'wb') as f:
        pickle.dump(payload, f)
    # Skip interpreter teardown: a process group torn down while a peer still talks can hang.
    os._exit(0 if payload[0] == 'ok' else 1)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    workdir: str | os.PathLike[str],
    *args: Any,
    threads: int = 1,
    deadline_s: float = 120.0,
    collective_timeout_s: float = 30.0,
    env: Optional[dict[str, str]] = None,
    per_rank_env: Optional[Callable[[int], dict[str, str]]] = None,
    setup: Optional[Callable[[], None]] = None,
    error: type[Exception] = RuntimeError,
    backend: str = 'gloo',
    start_method: str = 'forkserver',
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks of one process group; return each rank's result.

    Args:
        fn: the rank's body; importable (module level), as are ``args``, ``setup`` and ``per_rank_env``.
        world_size: ranks to start.
        workdir: a folder for the store and the results (a fresh subfolder is made in it).
        threads: ``torch.set_num_threads`` and ``OMP_NUM_THREADS`` in every rank.
        deadline_s: ranks still running after this are killed.
        collective_timeout_s: the process group's timeout; once one rank failed, its peers get
            this long (plus 5 s) to fail too before they are killed.
        env: environment variables set in every rank (``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and
            ``NODE_RANK`` given here override the one-node defaults). Gloo ranks get
            ``GLOO_RANK_ENV`` (no GPU visible) first; a ``CUDA_VISIBLE_DEVICES`` given here wins.
        per_rank_env: more variables, per rank.
        setup: called in every rank before it joins the group.
        error: the exception type raised on failure.
        backend: the process group's backend, ``'gloo'`` or ``'nccl'``. With ``'nccl'`` rank ``r``
            first takes GPU ``r % torch.cuda.device_count()`` as its device, must return CPU tensors
            only (the caller reads results without a GPU context), and meets its peers at a barrier
            before it exits. A group of one serves a Composer ``Trainer`` on ``device='gpu'`` as the
            group it would make itself (Composer keeps a group whose backend is its device's).
        start_method: ``'forkserver'`` (the preloaded server, fast) or ``'spawn'`` (a fresh
            interpreter a rank, as CUDA needs; ``'nccl'`` requires it).

    Raises:
        ``error``, carrying every failing rank's traceback, when any rank raises, exits non-zero,
        or runs past ``deadline_s``.
        ValueError: an unknown ``backend`` or ``start_method``, or ``'nccl'`` from the forkserver.
    """
    if backend not in ('gloo', 'nccl'):
        raise ValueError(f"backend must be 'gloo' or 'nccl', not {backend!r}")
    if start_method not in ('forkserver', 'spawn'):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', not {start_method!r}")
    if backend == 'nccl' and start_method != 'spawn':
        raise ValueError("backend='nccl' needs start_method='spawn': a CUDA rank must start from a fresh interpreter")
    context = FORKSERVER if start_method == 'forkserver' else mp.get_context('spawn')
    if start_method == 'forkserver':
        _ensure_forkserver_sees_no_gpu()
    workdir = Path(workdir) / f'ranks-{time.monotonic_ns()}'
    workdir.mkdir(parents=True)
    procs = []
    for rank in range(world_size):
        rank_env = dict(GLOO_RANK_ENV) if backend == 'gloo' else {}
        rank_env.update(env or {})
        if per_rank_env is not None:
            rank_env.update(per_rank_env(rank))
        p = context.Process(
            target=_child,
            args=(fn, rank, world_size, str(workdir), rank_env, threads, setup, args, collective_timeout_s, backend),
            daemon=True,
        )
        p.start()
        procs.append(p)

    stop_at = time.monotonic() + deadline_s
    first_failure: Optional[float] = None
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
            killed = ', killed after deadline' if rank in hung else ''
            status, value = 'error', f'no result (exit code {p.exitcode}{killed})'
        if status == 'ok' and p.exitcode == 0:
            results.append(value)
        else:
            errors.append(f'--- rank {rank} (exit code {p.exitcode}) ---\n{value}')
    if errors:
        name = getattr(fn, '__name__', repr(fn))
        raise error(f'{len(errors)} of {world_size} ranks failed running {name}:\n' + '\n'.join(errors))
    return results

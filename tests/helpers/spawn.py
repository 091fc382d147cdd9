"""The tests' way to run a function on W real ranks: :func:`launch.tools.spawn.run_ranks`, plus what only
tests want.

Ranks run single-threaded in a folder of the test's own ``tmp_path``, answer Composer's CPU query
from a constant, and report failure as :class:`RankError` (an ``AssertionError``, so pytest shows
it as a failed test). A rank that fails, hangs or never starts fails the test; nothing falls back
to one process. :func:`run_ranks` starts gloo ranks from the preloaded forkserver;
:func:`run_nccl_ranks` starts NCCL ranks, one GPU each, in fresh ``spawn`` interpreters.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from launch.tools.spawn import COMPOSER_PRELOAD, FORKSERVER, answer_cpuinfo_from_constant
from launch.tools.spawn import run_ranks as _run_ranks

# Preload this module too: every test's rank body is pickled from a module that imports it.
FORKSERVER.set_forkserver_preload(['torch', 'torch.distributed', *COMPOSER_PRELOAD, 'dist_cutmix',
                                   'launch.tools.spawn', 'tests.helpers.spawn'])

COLLECTIVE_TIMEOUT_S = 30.0


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
    backend: str = 'gloo',
    start_method: str = 'forkserver',
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` single-threaded ranks; return their results.

    ``fn`` must be importable (module level). ``backend`` and ``start_method`` are
    :func:`launch.tools.spawn.run_ranks`'s (gloo from the forkserver unless told). Raises :class:`RankError`
    carrying every failing rank's traceback when any rank raises, exits non-zero, or runs past ``deadline_s``.
    """
    return _run_ranks(
        fn, world_size, workdir, *args, threads=1, deadline_s=deadline_s, collective_timeout_s=collective_timeout_s,
        env=env, per_rank_env=per_rank_env, setup=answer_cpuinfo_from_constant, error=RankError, backend=backend,
        start_method=start_method,
    )


def run_nccl_ranks(
    fn: Callable[..., Any],
    world_size: int,
    workdir: str | os.PathLike[str],
    *args: Any,
    deadline_s: float = 300.0,
    collective_timeout_s: float = 60.0,
) -> list[Any]:
    """:func:`run_ranks` on ``world_size`` NCCL ranks, rank ``r`` on GPU ``r``, each a fresh ``spawn`` interpreter.

    ``fn`` must return CPU tensors only. A group of one serves a Composer ``Trainer(device='gpu')``
    as the one it would make itself. The deadline allows for every rank importing torch and Composer.
    """
    return run_ranks(fn, world_size, workdir, *args, deadline_s=deadline_s, collective_timeout_s=collective_timeout_s,
                     backend='nccl', start_method='spawn')

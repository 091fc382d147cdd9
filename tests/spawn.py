"""The tests' way to run a function on W real gloo ranks: :func:`launch.spawn.run_ranks`, plus
what only tests want.

Ranks run single-threaded in a folder of the test's own ``tmp_path``, answer Composer's CPU query
from a constant, and report failure as :class:`RankError` (an ``AssertionError``, so pytest shows
it as a failed test). A rank that fails, hangs or never starts fails the test; nothing falls back
to one process.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from launch.spawn import FORKSERVER, answer_cpuinfo_from_constant
from launch.spawn import run_ranks as _run_ranks

# Preload this module too: every test's rank body is pickled from a module that imports it.
FORKSERVER.set_forkserver_preload(['torch', 'torch.distributed', 'composer', 'composer.trainer', 'dist_cutmix',
                                   'launch.spawn', 'tests.spawn'])

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
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` single-threaded gloo ranks; return their results.

    ``fn`` must be importable (module level). Raises :class:`RankError` carrying every failing
    rank's traceback when any rank raises, exits non-zero, or runs past ``deadline_s``.
    """
    return _run_ranks(
        fn, world_size, workdir, *args, threads=1, deadline_s=deadline_s, collective_timeout_s=collective_timeout_s,
        env=env, per_rank_env=per_rank_env, setup=answer_cpuinfo_from_constant, error=RankError,
    )

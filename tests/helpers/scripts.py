"""Running a launch/ script as a user types it: a subprocess from the repository root, one thread, the checkout
on ``PYTHONPATH``, outside any launcher's environment; a non-zero exit fails with the script's output."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def script_env() -> dict[str, str]:
    """The environment a script runs in: one thread, the checkout importable, no rank of a launcher."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    return env


def run_script(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; fail naming the command, its exit status and its output's tail."""
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f'{" ".join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n'
                                  f'--- stderr\n{proc.stderr[-5000:]}')
    return proc

"""A door whose framework is not installed says which extra to install, and ``import dist_cutmix`` needs none of them.

Each check runs in a fresh interpreter in which the framework cannot be imported (a meta-path finder refuses it),
so the test holds in both venvs, whether the framework is installed or not.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCK = '''
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] == {package!r}:
            raise ModuleNotFoundError(f'No module named {{name!r}} (blocked by the test)', name=name)
        return None

sys.meta_path.insert(0, _Blocked())
import dist_cutmix  # the core needs no door's framework
try:
    import {door}
except ImportError as e:
    print('ImportError:', e)
else:
    raise AssertionError('{door} imported without {package}')
'''


@pytest.mark.parametrize('door, package, extra', [
    ('dist_cutmix.lightning', 'lightning', 'lightning'),
    ('dist_cutmix.accelerate', 'accelerate', 'accelerate'),
])
def test_a_door_without_its_framework_names_the_extra_to_install(door: str, package: str, extra: str) -> None:
    proc = subprocess.run([sys.executable, '-c', BLOCK.format(door=door, package=package)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pip install 'dist_cutmix[{extra}]'" in proc.stdout, proc.stdout

"""The core without Composer: it imports, mixes, scores and trains with Composer made unimportable.

Each check runs in a fresh interpreter in which ``import composer`` fails (``sys.modules['composer']
= None``, and a finder that refuses ``composer.*``), so it holds in the Composer venv too: nothing
under the core may import Composer, and the Composer algorithms say which extra to install.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dist_cutmix

ROOT = Path(__file__).resolve().parents[2]

BLOCK_COMPOSER = '''
import sys

class _NoComposer:
    def find_spec(self, name, path=None, target=None):
        if name == 'composer' or name.startswith('composer.'):
            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)
        return None

sys.meta_path.insert(0, _NoComposer())
sys.modules['composer'] = None
'''

CORE = '''
import torch
import dist_cutmix
from dist_cutmix import *  # noqa: F403 - what a user may write
from dist_cutmix import randomness, distributed, functional, locate, metrics, mixer
from dist_cutmix.randomness import default_seed

x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 4
local = dist_cutmix.mix_batch_local(x, y, seed=3, batch=0, num_classes=4)
group = dist_cutmix.mix_batch_across_group(x, y, seed=3, batch=0, num_classes=4, per_sample=True)
assert local.target.shape == group.target.shape == (6, 4)
mixes = [dist_cutmix.mix_batch_local(x, y, seed=3, batch=b, num_classes=4).input for b in range(4)]
assert any(not torch.equal(m, x) for m in mixes)
accuracy = dist_cutmix.SoftTargetAccuracy(num_classes=4)(torch.eye(4)[y], local.target)
assert 0 < float(accuracy) <= 1
seeds = {default_seed() for _ in range(4)}
assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds), seeds
assert 'CutMix' not in dist_cutmix.__all__
try:
    dist_cutmix.CutMix
except ImportError as e:
    print('ImportError:', e)
else:
    raise AssertionError('dist_cutmix.CutMix did not raise without Composer')
import launch.train_plain  # the plain-PyTorch entry point
loaded = [m for m, v in sys.modules.items() if m.split('.')[0] == 'composer' and v is not None]
assert not loaded, loaded
print('core ok')
'''


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f'exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-5000:]}'
    return proc


def test_core_imports_mixes_and_scores_without_composer_and_cutmix_names_the_extra():
    out = _python(BLOCK_COMPOSER + CORE).stdout
    assert 'core ok' in out
    error = next(line for line in out.splitlines() if line.startswith('ImportError:'))
    assert "pip install 'dist_cutmix[composer]'" in error and 'dist_cutmix.CutMix' in error


def test_the_blocker_blocks():
    # The check above means something only if Composer really cannot be imported under the blocker.
    out = _python(BLOCK_COMPOSER + '''
try:
    import composer.core
except ImportError:
    print('blocked')
''').stdout
    assert out.strip() == 'blocked'


def test_an_import_error_of_our_own_is_not_blamed_on_the_extra(monkeypatch):
    # Only a missing Composer means "install the extra"; a broken module of ours must surface as it is.
    monkeypatch.setitem(dist_cutmix._COMPOSER_NAMES, 'Broken', 'dist_cutmix._no_such_module')
    with pytest.raises(ModuleNotFoundError, match="No module named 'dist_cutmix._no_such_module'") as info:
        dist_cutmix.Broken  # noqa: B018
    assert 'composer' not in str(info.value)
    with pytest.raises(AttributeError, match="module 'dist_cutmix' has no attribute 'Nothing'"):
        dist_cutmix.Nothing  # noqa: B018


@pytest.mark.composer
def test_with_composer_every_lazy_name_is_its_module_s_and_star_import_has_it():
    import importlib

    for name, module in dist_cutmix._COMPOSER_NAMES.items():
        assert getattr(dist_cutmix, name) is getattr(importlib.import_module(module), name)
        assert name in dist_cutmix.__all__ and name in dir(dist_cutmix)
    namespace: dict = {}
    exec('from dist_cutmix import *', namespace)  # noqa: S102
    assert namespace['CutMix'] is dist_cutmix.CutMix

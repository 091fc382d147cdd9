"""dist_cutmix: CutMix, MixUp and timm-style switching that own their randomness and mix across ranks,
for PyTorch and MosaicML Composer.

The mixing core (functional ops, the mix spec, mixers, metrics) needs only torch and torchmetrics. The
Composer algorithms come with the ``composer`` extra (``pip install 'dist_cutmix[composer]'``) and are
imported on first use, so ``import dist_cutmix`` works without Composer.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from dist_cutmix.distributed import BatchMismatchError, MissingRankError
from dist_cutmix.draw import MixParams, PerSampleMixParams, sample_mix
from dist_cutmix.functional import cutmix_batch, mixup_batch, sample_params
from dist_cutmix.loaders import GlobalBatchSampler, check_loader
from dist_cutmix.loop import Mixer
from dist_cutmix.loss import MixedCrossEntropy, MixedLabels, mixed_cross_entropy
from dist_cutmix.metrics import SoftTargetAccuracy, SoftTargetWrapper, prepare_train_metrics, soft_target_accuracy
from dist_cutmix.mixer import MixResult, mix_batch_across_group, mix_batch_local
from dist_cutmix.pixels import apply_mix
from dist_cutmix.randomness import batch_generator
from dist_cutmix.spec import MixSpec
from dist_cutmix.targets import mix_targets

# Former names, kept as aliases (CHANGELOG, 0.1.0): a mix's parameters are not CutMix's only.
CutMixParams = MixParams
apply_cutmix = apply_mix

if TYPE_CHECKING:
    from dist_cutmix.algorithm import CutMix as CutMix
    from dist_cutmix.algorithm import MixingAlgorithm as MixingAlgorithm
    from dist_cutmix.algorithm import MixUp as MixUp
    from dist_cutmix.algorithm import MixUpCutMix as MixUpCutMix

# The names that need Composer, and the module that defines each: imported on first access
# (PEP 562), so the core imports without Composer. A new Composer algorithm is one line here
# (and one in the TYPE_CHECKING block above, for type checkers); __all__ lists them when Composer is installed.
_COMPOSER_NAMES = {
    'CutMix': 'dist_cutmix.algorithm',
    'MixUp': 'dist_cutmix.algorithm',
    'MixUpCutMix': 'dist_cutmix.algorithm',
    'MixingAlgorithm': 'dist_cutmix.algorithm',
}
_COMPOSER_EXTRA = "pip install 'dist_cutmix[composer]'"

__all__ = [
    'BatchMismatchError',
    'CutMixParams',
    'GlobalBatchSampler',
    'MixParams',
    'MixResult',
    'MixSpec',
    'MissingRankError',
    'MixedCrossEntropy',
    'MixedLabels',
    'Mixer',
    'PerSampleMixParams',
    'SoftTargetAccuracy',
    'SoftTargetWrapper',
    'apply_cutmix',
    'apply_mix',
    'batch_generator',
    'check_loader',
    'cutmix_batch',
    'mix_batch_across_group',
    'mix_batch_local',
    'mix_targets',
    'mixed_cross_entropy',
    'mixup_batch',
    'prepare_train_metrics',
    'sample_mix',
    'sample_params',
    'soft_target_accuracy',
]


def _composer_installed() -> bool:
    try:
        return importlib.util.find_spec('composer') is not None
    except (ImportError, ValueError):
        return False


if _composer_installed():  # so that `from dist_cutmix import *` works without Composer too
    __all__ += sorted(_COMPOSER_NAMES)
__version__ = '0.1.0'


def __getattr__(name: str) -> Any:
    module_name = _COMPOSER_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        # Only a missing Composer is the user's missing extra; any other import error is ours: re-raise it.
        if e.name is None or e.name.partition('.')[0] != 'composer':
            raise
        raise ImportError(
            f'dist_cutmix.{name} is a Composer algorithm and needs MosaicML Composer, the composer extra: '
            f'{_COMPOSER_EXTRA} ({e}). The mixing core (dist_cutmix.mix_batch_across_group, '
            f'mix_batch_local, the metrics) works without it.',
            name=e.name,
        ) from e
    value = getattr(module, name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""dist_cutmix: CutMix, MixUp and timm-style switching that own their randomness and mix across ranks."""
from dist_cutmix.algorithm import CutMix, MixingAlgorithm, MixUp, MixUpCutMix
from dist_cutmix.functional import (
    CutMixParams,
    apply_cutmix,
    apply_mix,
    cutmix_batch,
    mix_targets,
    mixup_batch,
    sample_params,
)
from dist_cutmix.metrics import SoftTargetAccuracy, SoftTargetWrapper, prepare_train_metrics, soft_target_accuracy
from dist_cutmix.mixer import MixResult, mix_batch_across_group, mix_batch_local
from dist_cutmix.spec import MixSpec, sample_mix

__all__ = [
    'CutMix',
    'CutMixParams',
    'MixResult',
    'MixSpec',
    'MixUp',
    'MixUpCutMix',
    'MixingAlgorithm',
    'SoftTargetAccuracy',
    'SoftTargetWrapper',
    'apply_cutmix',
    'apply_mix',
    'cutmix_batch',
    'mix_batch_across_group',
    'mix_batch_local',
    'mix_targets',
    'mixup_batch',
    'prepare_train_metrics',
    'sample_mix',
    'sample_params',
    'soft_target_accuracy',
]
__version__ = '0.1.0'

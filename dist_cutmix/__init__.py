"""dist_cutmix: CutMix for MosaicML Composer that owns its randomness and mixes across ranks."""
from dist_cutmix.algorithm import CutMix
from dist_cutmix.functional import CutMixParams, apply_cutmix, cutmix_batch, mix_targets, sample_params
from dist_cutmix.metrics import SoftTargetAccuracy, SoftTargetWrapper, prepare_train_metrics, soft_target_accuracy
from dist_cutmix.mixer import MixResult, mix_batch_across_group, mix_batch_local

__all__ = [
    'CutMix',
    'CutMixParams',
    'MixResult',
    'SoftTargetAccuracy',
    'SoftTargetWrapper',
    'apply_cutmix',
    'cutmix_batch',
    'mix_batch_across_group',
    'mix_batch_local',
    'mix_targets',
    'prepare_train_metrics',
    'sample_params',
    'soft_target_accuracy',
]
__version__ = '0.1.0'

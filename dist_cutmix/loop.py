"""``Mixer``: the mixing of any training loop, as one stateful callable that counts its batches.

``input, target = mixer(input, target)`` mixes one batch with the draws of batch ``mixer.batch`` and
counts it. The count (with the seed) is all the state a resumed run needs: ``mixer.state_dict()`` goes
into the checkpoint and ``mixer.load_state_dict(...)`` brings it back, so every later batch mixes
exactly as in the uninterrupted run. The timm, torchvision, Lightning and Accelerate doors are thin
adapters over this class; it holds no mixing logic of its own (that is :mod:`dist_cutmix.mixer`).

Every rank of the mixing group must call the mixer once for every batch, in the same order: in
``'global'`` and ``'node'`` mode each call is a collective. A rank that calls for a batch the others
do not reach waits in that collective until the process group's timeout (by default 30 minutes on
gloo, 10 on NCCL), and then fails with the backend's timeout, which names neither the rank nor the
batch; with ``arrival_timeout=S`` it fails after ``S`` seconds instead, naming the missing ranks and
the batch. Ranks that call with different batch counts (one skipped a call) are an error on every
rank, naming each rank's count. :func:`dist_cutmix.loaders.check_loader` refuses, before the first
batch, loaders whose lengths differ between ranks.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Optional, Union

from torch import Tensor

from dist_cutmix.distributed import ProcessGroup, agree_on_seed, group_rank_and_size, node_group, wait_for_ranks
from dist_cutmix.loss import MixedLabels
from dist_cutmix.mixer import MixResult, mix_batch_across_group, mix_batch_local
from dist_cutmix.randomness import default_seed
from dist_cutmix.spec import MixSpec
from dist_cutmix.validation import check_choice, check_num_classes, check_pool, check_seconds, check_seed

__all__ = ['TARGETS', 'Mixer']

TARGETS = ('dense', 'labels')
# Names each mixer's arrival marks in the store: the n-th mixer to check on one rank meets the n-th on the others.
_ARRIVAL_TAGS = itertools.count()
_ARRIVAL_HINT = ('Every rank must call the mixer once for every batch: a rank whose loader is shorter, or that left '
                 'the loop early, leaves the others waiting (dist_cutmix.loaders.check_loader(loader) refuses loaders '
                 'of unequal length before the first batch)')

_STATE_VERSION = 1


class Mixer:
    """Mix the batches of a training loop: CutMix, MixUp or timm's switch, locally or across ranks, resumably.

    Configured as :class:`~dist_cutmix.MixUpCutMix` is (or by a ready :class:`~dist_cutmix.MixSpec`), called as
    ``input, target = mixer(input, target)`` once per batch on every rank.

    Args:
        mixup_alpha: MixUp's Beta concentration; 0 turns MixUp off.
        cutmix_alpha: CutMix's Beta concentration; 0 turns CutMix off.
        cutmix_minmax: ``(lo, hi)``: CutMix box sides uniform in ``[lo, hi)`` of the image sides (timm's).
        prob: probability that a batch (with ``per_sample``, a sample) is mixed.
        switch_prob: probability of CutMix rather than MixUp when both alphas are > 0.
        label_smoothing: ``ε``: soft targets are ``(1 - ε) * mixed + ε / C``.
        spec: a whole :class:`~dist_cutmix.MixSpec` instead of the six arguments above (giving both raises).
        mode: ``'local'`` pairs within this rank's batch; ``'global'`` within the group's global batch (the
            ranks' batches end to end); ``'node'`` within the ranks of this node (``LOCAL_WORLD_SIZE``).
        seed: seed of every draw. ``None``: a fresh one, the same on every rank (rank 0's, sent to the
            others at the first batch when a process group is up); kept in :meth:`state_dict`.
        group: the process group of ``'global'`` mode (default: all ranks).
        num_classes: class count for index targets (required to mix them).
        per_sample: every sample its own draw (timm's ``mode='elem'``) instead of one per batch.
        exclude_self: never pair a sample with itself when there is another.
        inplace: mix into the caller's ``input`` (its memory is yours to overwrite) instead of a copy.
        targets: what a call returns as the target: ``'dense'``, the mixed (and smoothed) soft targets ``(N, C)``;
            ``'labels'``, a :class:`~dist_cutmix.loss.MixedLabels` (own class, partner class, label weight, ε) for
            :class:`~dist_cutmix.loss.MixedCrossEntropy` and the soft-target metrics, no ``(N, C)`` target built.
            ``'labels'`` takes class-index targets only, and ``num_classes`` (the labels are checked against it
            on every rank before mixing); ``last.target`` then holds the unmixed labels.
        arrival_timeout: in ``'global'`` and ``'node'`` mode, seconds to wait at each batch for the other ranks
            to reach it before raising :class:`~dist_cutmix.distributed.MissingRankError` naming the missing
            ranks and the batch (checked in the process group's store, on any backend; in ``'node'`` mode over
            all ranks). ``None``: no check, a missing rank leaves the others in the exchange until the process
            group's timeout. Set it above the longest time one rank may run ahead of another (a checkpoint
            written by rank 0 alone, say).

    Attributes:
        batch: the index of the next batch to mix (batches mixed so far, plus a resumed count).
        enabled: ``False`` mixes nothing and still smooths the labels (timm's ``mixup_off_epoch``).
        last: the last batch's :class:`~dist_cutmix.MixResult` (partners, λ, bytes sent), or ``None``.

    Example:
        >>> import torch
        >>> from dist_cutmix import Mixer
        >>> mixer = Mixer(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10, seed=0)
        >>> x, y = mixer(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        >>> tuple(y.shape), mixer.batch
        ((8, 10), 1)
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        cutmix_minmax: Optional[tuple[float, float]] = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        *,
        spec: Optional[MixSpec] = None,
        mode: str = 'local',
        seed: Optional[int] = None,
        group: ProcessGroup = None,
        num_classes: Optional[int] = None,
        per_sample: bool = False,
        exclude_self: bool = True,
        inplace: bool = False,
        targets: str = 'dense',
        arrival_timeout: Optional[float] = None,
    ) -> None:
        given = dict(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax, prob=prob,
                     switch_prob=switch_prob, label_smoothing=label_smoothing)
        if spec is None:
            spec = MixSpec(**given)
        elif not isinstance(spec, MixSpec):
            raise TypeError(f'spec must be a dist_cutmix.MixSpec or None, got spec={spec!r}')
        else:
            defaults = dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                            label_smoothing=0.0)
            named = {k: v for k, v in given.items() if v != defaults[k]}
            if named:
                raise ValueError(f'Mixer takes spec= or the mixing arguments, not both: got spec={spec!r} and '
                                 + ', '.join(f'{k}={v!r}' for k, v in named.items()))
        check_pool(mode, group)
        if spec.pairs and not per_sample:
            raise ValueError('MixSpec(pairs=True) draws once per pair of samples: pass per_sample=True with it')
        check_seed(seed)
        check_num_classes(num_classes)
        check_choice(targets, 'targets', TARGETS)
        if targets == 'labels' and num_classes is None:
            raise ValueError("targets='labels' needs num_classes, to check the class-index targets on every rank "
                             'before mixing; got num_classes=None')
        check_seconds(arrival_timeout, 'arrival_timeout')
        self.spec = spec
        self.mode = mode
        self.seed = seed
        self.group = group
        self.num_classes = num_classes
        self.per_sample = bool(per_sample)
        self.exclude_self = bool(exclude_self)
        self.inplace = bool(inplace)
        self.targets = targets
        self.arrival_timeout = arrival_timeout
        self._arrival_tag: Optional[str] = None
        self.enabled = True
        self.batch = 0
        self.last: Optional[MixResult] = None
        self._group_ready = mode != 'node'

    # ------------------------------------------------------------------ mixing

    def __call__(self, input: Tensor, target: Tensor) -> tuple[Tensor, Union[Tensor, MixedLabels]]:
        """Mix one batch; return ``(mixed_input, mixed_target)`` (with ``targets='labels'``, ``(mixed_input,
        MixedLabels)``) and count the batch."""
        result = self.mix(input, target)
        if self.targets == 'labels':
            return result.input, MixedLabels.from_result(result, self.spec.label_smoothing)
        return result.input, result.target

    def mix(self, input: Tensor, target: Tensor, *, problem: Optional[Exception] = None) -> MixResult:
        """Mix one batch and count it; return the whole :class:`~dist_cutmix.MixResult` (also kept in ``last``).

        ``problem``: a door's own finding that this batch cannot be mixed. It is raised here (``'local'``) or on
        every rank of the group at once (``'global'``, ``'node'``), as the engine's own input errors are, so that
        the other ranks do not wait for this one in a collective; the batch is not counted. With
        ``targets='labels'`` the result's ``target`` is the unmixed labels (``mix_target=False``).
        """
        if problem is not None and self.mode == 'local':
            raise problem
        if self.arrival_timeout is not None and self.mode != 'local':
            self._wait_for_ranks()
        seed = self._resolve_seed()
        spec = self.spec if self.enabled else dataclasses.replace(self.spec, prob=0.0)
        kwargs: dict[str, Any] = dict(seed=seed, batch=self.batch, spec=spec, exclude_self=self.exclude_self,
                                      num_classes=self.num_classes, inplace=self.inplace, per_sample=self.per_sample,
                                      mix_target=self.targets == 'dense')
        if self.mode == 'local':
            result = mix_batch_local(input, target, rank=group_rank_and_size(None)[0], **kwargs)
        else:
            result = mix_batch_across_group(input, target, group=self._mixing_group(), caller='Mixer', problem=problem,
                                            **kwargs)
        if self.targets == 'labels' and result.kind != 'index':  # every rank: the ranks agreed on the kind
            raise ValueError(f"targets='labels' takes class-index targets (N,), got {result.kind} targets of shape "
                             f"{tuple(target.shape)}: use targets='dense' for them")
        self.last = result
        self.batch += 1
        return result

    def _mixing_group(self) -> ProcessGroup:
        if not self._group_ready:  # the node's group: every rank builds every node's group, at its first batch
            self._group_ready = True
            self.group = node_group(_local_world_size())
        return self.group

    def _wait_for_ranks(self) -> None:
        """Before any collective of this batch: every rank is here, or a clear error within ``arrival_timeout``."""
        if self._arrival_tag is None:
            # A restarted torchrun worker starts counting again: its attempt keeps its marks apart from the last one's.
            self._arrival_tag = f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.{next(_ARRIVAL_TAGS)}"
        group = self.group if self.mode == 'global' else None  # 'node': over all ranks, its group made or not
        wait_for_ranks(self._arrival_tag, self.batch, float(self.arrival_timeout), group, hint=_ARRIVAL_HINT)

    def _resolve_seed(self) -> int:
        if self.seed is None:
            self.seed = agree_on_seed(default_seed(), None)
        return self.seed

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the batch count and seed, and the configuration a resume must share.

        Plain Python values only (``torch.save(..., weights_only=True)`` and JSON take them). The seed is
        ``None`` if no batch was mixed yet with ``seed=None``.
        """
        return {
            'version': _STATE_VERSION,
            'batch': self.batch,
            'seed': self.seed,
            'enabled': self.enabled,
            'world_size': self._world_size(),
            'mode': self.mode,
            'per_sample': self.per_sample,
            'exclude_self': self.exclude_self,
            'num_classes': self.num_classes,
            'targets': self.targets,
            'spec': _spec_state(self.spec),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`: its batch count, seed and ``enabled``.

        Raises:
            ValueError: naming every difference, when the checkpointed mixer was configured differently
                (spec, mode, per_sample, exclude_self, num_classes, targets, an explicit other seed), or when the world
                size changed in ``'local'`` or ``'node'`` mode, whose draws are keyed by rank. In ``'global'``
                mode the world size may change: batch ``b``'s draws cover the global batch whatever the
                number of ranks, so the same global batch mixes the same way.
        """
        if not isinstance(state, dict) or 'batch' not in state:
            raise ValueError(f'state must be a Mixer.state_dict(), got {state!r}')
        mine = self.state_dict()
        # a checkpoint from before a MixSpec field (or the targets option) existed has its default
        saved = {'targets': 'dense', **state}
        if isinstance(state.get('spec'), dict):
            saved['spec'] = {**_spec_state(MixSpec()), **state['spec']}
        differ = [k for k in ('mode', 'per_sample', 'exclude_self', 'num_classes', 'targets', 'spec')
                  if saved.get(k) != mine[k]]
        if self.seed is not None and state.get('seed') is not None and state['seed'] != self.seed:
            differ.append('seed')
        if self.mode != 'global' and state.get('world_size') != mine['world_size']:
            differ.append('world_size')
        if differ:
            named = ', '.join(f'{k}={mine[k]!r} (checkpoint: {saved.get(k)!r})' for k in differ)
            hint = (" (mode='local' and 'node' draw by rank: resume on the same number of ranks, or mix in "
                    "mode='global', whose draws do not depend on it)" if 'world_size' in differ else '')
            raise ValueError(f'cannot resume this Mixer from the checkpoint: it differs in {named}{hint}')
        batch = state['batch']
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ValueError(f"state['batch'] must be an int >= 0, got {batch!r}")
        self.batch = batch
        if state.get('seed') is not None:
            self.seed = state['seed']
        self.enabled = bool(state.get('enabled', True))
        self.last = None

    def _world_size(self) -> int:
        return group_rank_and_size(self.group if self.mode == 'global' else None)[1]

    def __repr__(self) -> str:
        return (f'Mixer(spec={self.spec!r}, mode={self.mode!r}, seed={self.seed!r}, num_classes={self.num_classes!r}, '
                f'per_sample={self.per_sample!r}, targets={self.targets!r}, batch={self.batch}, '
                f'enabled={self.enabled})')


def _spec_state(spec: MixSpec) -> dict[str, Any]:
    state = dataclasses.asdict(spec)
    if state.get('cutmix_minmax') is not None:
        state['cutmix_minmax'] = list(state['cutmix_minmax'])  # a list, as JSON and torch.load give it back
    return state


def _local_world_size() -> int:
    value = os.environ.get('LOCAL_WORLD_SIZE')
    if value is None or not value.isdigit() or int(value) < 1:
        raise ValueError(f"mode='node' reads the node's rank count from LOCAL_WORLD_SIZE (torchrun and "
                         f'Composer set it), got LOCAL_WORLD_SIZE={value!r}')
    return int(value)

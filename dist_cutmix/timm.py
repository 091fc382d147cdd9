"""timm's ``Mixup``, mixing across ranks: ``from dist_cutmix.timm import Mixup`` in place of ``timm.data.Mixup``.

:class:`Mixup` takes every argument of timm's ``Mixup`` (1.0.x) by the same name, with the same default and
meaning, is called the same way (``x, target = mixup_fn(x, target)``) and honours ``mixup_fn.mixup_enabled =
False`` as timm's ``train.py`` sets it at ``--mixup-off-epoch``. What it adds are keyword-only arguments: the
pool a sample finds its partner in (``pool='global'``: the batches of all ranks), the ``seed`` of every draw,
the process ``group``, and ``inplace``. It is a thin adapter over :class:`dist_cutmix.Mixer`, which it keeps as
``mixup_fn.mixer``; timm is not imported here, so this module works without timm installed.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from dist_cutmix.distributed import ProcessGroup
from dist_cutmix.loop import Mixer
from dist_cutmix.spec import MixSpec
from dist_cutmix.validation import MODES as POOLS
from dist_cutmix.validation import check_pool

__all__ = ['MODES', 'POOLS', 'FastCollateMixup', 'Mixup']

MODES = ('batch', 'pair', 'elem')
"""timm's ``mode``: one draw per batch, per pair of samples, or per sample."""


def _fixed(name: str, read: Any, doc: str) -> property:
    """A timm attribute read from the configuration; setting it raises (it is fixed when the Mixup is built)."""

    def refuse(self: Mixup, value: object) -> None:
        raise AttributeError(
            f'Mixup.{name} is fixed when the Mixup is built (the draws, and the check of a resumed run, depend on '
            f'it); build a new Mixup(..., {name}={value!r}) instead',
        )

    return property(read, refuse, doc=doc)


class Mixup:
    """timm's ``Mixup`` (MixUp, CutMix or a switch between them, per batch, pair or sample), mixing across ranks.

    The ten arguments are timm's, by name, position, default and meaning. Every rank calls it once per batch
    (in ``pool='global'`` or ``'node'`` each call is a collective). Any batch size works, odd ones and one
    sample a rank included.

    Args:
        mixup_alpha: MixUp's Beta concentration; MixUp is on if > 0.
        cutmix_alpha: CutMix's Beta concentration; CutMix is on if > 0.
        cutmix_minmax: ``(lo, hi)``: CutMix box sides uniform in ``[lo, hi)`` of the image sides instead of from
            λ (CutMix is then on at alpha 1, as in timm).
        prob: probability that a batch (``mode='elem'``: a sample; ``'pair'``: a pair) is mixed.
        switch_prob: probability of CutMix rather than MixUp when both are on.
        mode: ``'batch'`` one draw for the batch; ``'elem'`` one per sample; ``'pair'`` one per pair of samples,
            each the other's partner (a random matching; in an odd batch one sample stays unmixed).
        correct_lam: a CutMix label weight is the clipped box's pixel share; ``False``: the drawn λ.
        label_smoothing: ``ε``: targets are ``(1 - ε) * mixed + ε / num_classes`` (``multi_label``: ``ε / 2``).
        num_classes: the class count of index targets.
        multi_label: targets are multi-hot ``(N, num_classes)`` rows, smoothed toward 1/2.
        pool: where partners come from: ``'local'`` this rank's batch (timm's behaviour), ``'global'`` the
            group's global batch (the ranks' batches end to end), ``'node'`` the ranks of this node.
        seed: seed of every draw; ``None`` draws one (rank 0's, shared with all ranks at the first batch).
            Pass a fixed one (timm's ``args.seed``) to resume by the batch count alone.
        group: the process group of ``pool='global'`` (default: all ranks).
        inplace: mix into the caller's ``x`` and return it, as timm does (the default); ``False`` returns a
            mixed copy and leaves ``x`` alone.

    Attributes:
        mixup_enabled: ``False`` mixes nothing and still smooths the labels (timm's ``--mixup-off-epoch``).
        batch: the index of the next batch to mix; a resumed run sets it (see :meth:`load_state_dict`).
        mixer: the :class:`~dist_cutmix.Mixer` doing the work (``mixer.last``: the last batch's partners and λ).

    Raises:
        ValueError: for a ``mode`` or ``pool`` that is not one of ours, both alphas 0 with no ``cutmix_minmax``
            (timm's ``Mixup`` asserts then), or an argument outside its range, naming it and what to use.

    Example:
        >>> import torch
        >>> from dist_cutmix.timm import Mixup
        >>> mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10, pool='global', seed=0)
        >>> x, target = mixup_fn(torch.rand(5, 3, 32, 32), torch.randint(0, 10, (5,)))
        >>> tuple(target.shape), target.dtype
        ((5, 10), torch.float32)
    """

    def __init__(
        self,
        mixup_alpha: float = 1.,
        cutmix_alpha: float = 0.,
        cutmix_minmax: Optional[Sequence[float]] = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = 'batch',
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        multi_label: bool = False,
        *,
        pool: str = 'local',
        seed: Optional[int] = None,
        group: ProcessGroup = None,
        inplace: bool = True,
    ) -> None:
        if mode not in MODES:  # timm mixes any other value per batch; we name it instead
            raise ValueError(f'mode is timm\'s: one of {MODES}, got mode={mode!r}'
                             + (f"; the pool across ranks is pool={mode!r}" if mode in POOLS else ''))
        check_pool(pool, group, name='pool')
        spec = MixSpec(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax,  # type: ignore[arg-type]
                       prob=prob, switch_prob=switch_prob, label_smoothing=label_smoothing, correct_lam=correct_lam,
                       multi_label=multi_label, pairs=mode == 'pair', box_sides='exact')
        if spec.mixup_alpha == 0 and spec.cutmix_alpha == 0:
            raise ValueError(
                f'Mixup mixes nothing with mixup_alpha={mixup_alpha!r}, cutmix_alpha={cutmix_alpha!r} and no '
                f'cutmix_minmax (timm\'s Mixup fails an assert at the first call): give mixup_alpha > 0, cutmix_alpha '
                f'> 0 or cutmix_minmax; for label smoothing alone, smooth in the loss (timm\'s train.py builds no '
                f'Mixup then)',
            )
        self.mixer = Mixer(spec=spec, mode=pool, seed=seed, group=group, num_classes=num_classes,
                           per_sample=mode != 'batch', inplace=inplace)
        self._mode = mode

    # timm's attributes, read-only: the configuration is fixed once the draws depend on it
    mixup_alpha = _fixed('mixup_alpha', lambda self: self.mixer.spec.mixup_alpha, "MixUp's Beta concentration.")
    cutmix_alpha = _fixed('cutmix_alpha', lambda self: self.mixer.spec.cutmix_alpha,
                          "CutMix's Beta concentration (1 with cutmix_minmax, as in timm).")
    cutmix_minmax = _fixed('cutmix_minmax', lambda self: self.mixer.spec.cutmix_minmax, 'CutMix box sides (lo, hi).')
    mix_prob = _fixed('mix_prob', lambda self: self.mixer.spec.prob, "timm's name of ``prob``.")
    switch_prob = _fixed('switch_prob', lambda self: self.mixer.spec.switch_prob, 'Probability of CutMix.')
    label_smoothing = _fixed('label_smoothing', lambda self: self.mixer.spec.label_smoothing, 'ε.')
    num_classes = _fixed('num_classes', lambda self: self.mixer.num_classes, 'Class count of index targets.')
    multi_label = _fixed('multi_label', lambda self: self.mixer.spec.multi_label, 'Multi-hot targets.')
    correct_lam = _fixed('correct_lam', lambda self: self.mixer.spec.correct_lam, "CutMix's label weight.")
    mode = _fixed('mode', lambda self: self._mode, "timm's mode: 'batch', 'pair' or 'elem'.")

    @property
    def mixup_enabled(self) -> bool:
        """``False`` mixes nothing and keeps the smoothing (timm's ``train.py`` sets it at ``--mixup-off-epoch``)."""
        return self.mixer.enabled

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        self.mixer.enabled = bool(value)

    @property
    def batch(self) -> int:
        """The index of the next batch to mix: every call mixes batch ``batch`` and counts it."""
        return self.mixer.batch

    @batch.setter
    def batch(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f'batch must be an int >= 0 (the number of batches mixed before), got batch={value!r}')
        self.mixer.batch = value
        self.mixer.last = None

    def __call__(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Mix one batch as timm does: ``x`` ``(N, C, H, W)``, ``target`` class indices ``(N,)`` (``multi_label``:
        multi-hot ``(N, num_classes)``); return ``(x, soft_target)``, the targets float32 on ``target``'s device."""
        if self.mixer.spec.multi_label and isinstance(target, Tensor) and target.ndim == 2:
            target = target.float()  # timm's first step: multi-hot rows of any dtype become float32
        x, mixed = self.mixer(x, target)
        # timm's dtype: float32; per sample or pair its λ is a tensor of x's dtype, so float64 images give float64
        dtype = torch.float32 if self._mode == 'batch' else torch.promote_types(torch.float32, x.dtype)
        kind = self.mixer.last.kind if self.mixer.last is not None else None
        if mixed.dtype != dtype and (kind == 'index' or (kind == 'soft' and self.mixer.spec.multi_label)):
            mixed = mixed.to(dtype)
        return x, mixed

    def state_dict(self) -> dict[str, Any]:
        """The batch count, seed and configuration (plain values) a checkpoint keeps: :meth:`Mixer.state_dict`."""
        return self.mixer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: later batches mix exactly as in the uninterrupted run.

        Raises:
            ValueError: naming every difference when the checkpoint's Mixup was configured differently.
        """
        self.mixer.load_state_dict(state)

    def __repr__(self) -> str:
        spec = self.mixer.spec
        return (f'Mixup(mixup_alpha={spec.mixup_alpha}, cutmix_alpha={spec.cutmix_alpha}, '
                f'cutmix_minmax={spec.cutmix_minmax}, prob={spec.prob}, switch_prob={spec.switch_prob}, '
                f'mode={self._mode!r}, correct_lam={spec.correct_lam}, label_smoothing={spec.label_smoothing}, '
                f'num_classes={self.mixer.num_classes}, multi_label={spec.multi_label}, pool={self.mixer.mode!r}, '
                f'seed={self.mixer.seed}, batch={self.mixer.batch}, mixup_enabled={self.mixer.enabled})')


class FastCollateMixup:
    """timm's collate-time ``FastCollateMixup`` has no cross-rank form: building one raises, naming what to use.

    It mixes in the DataLoader's collate function, in worker processes that have no process group. Import it from
    here together with :class:`Mixup` and a ``train.py`` left on timm's default prefetcher (which builds this one
    and never calls ``Mixup``) stops with that advice instead of quietly mixing within each rank.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            'FastCollateMixup mixes in the DataLoader\'s collate function, in worker processes that have no process '
            'group, so it cannot mix across ranks: use dist_cutmix.timm.Mixup on each batch once it is on the device '
            '(timm\'s train.py: run with --no-prefetcher, which builds mixup_fn = Mixup(...) instead)',
        )

"""The Lightning door: one callback mixes every training batch, and a loader that resumes mid-epoch exactly.

``Trainer(callbacks=[MixCallback(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10, mode='global')])`` mixes
each training batch on its device, after ``LightningModule.on_after_batch_transfer`` and before
``training_step``, through a :class:`dist_cutmix.Mixer` (this module holds no mixing logic). Where Lightning
calls it, and why there:

* ``on_train_batch_start``: Lightning has moved the batch to the device (``batch_to_device``, then the
  module's ``on_after_batch_transfer``) and passes this very object to ``training_step`` next. A callback's
  return value is ignored, so the callback writes the mixed images and targets into the batch (a list or a
  dict). It fires once per training batch (never for sanity-check, validation, test or predict batches) and
  once per batch under ``accumulate_grad_batches``, so :attr:`Mixer.batch` counts batches, not optimizer
  steps (``global_step`` repeats under accumulation).
* ``state_dict`` / ``load_state_dict``: Lightning keeps them in its checkpoint. They hold the mixer's batch
  count, seed and world size (:meth:`Mixer.load_state_dict` refuses a resume whose draws would differ) and
  the epoch position, which ``on_train_start`` uses to refuse a mid-epoch resume that would feed the restored
  draws other images than the uninterrupted run's.
* ``on_train_batch_end``: logs the label weight, the share of partners on another rank and the expected
  (soft-target) train accuracy of the logits that ``self(x)`` returned in ``training_step``.

Lightning 2.6 restarts a plain ``DataLoader``'s epoch from its first batch on a mid-epoch resume while its
batch index goes on, and with workers it draws the first resumed epoch's order before it sets the sampler's
epoch. :class:`ResumableDataLoader` is a ``DataLoader`` whose order is a pure function of (seed, epoch,
rank, world size), the order Lightning itself gives a shuffled loader under DDP, and whose position
Lightning saves and restores through its ``state_dict``: a resumed run sees exactly the uninterrupted run's
images. The optional extra: ``pip install 'dist_cutmix[lightning]'``.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, MutableMapping, MutableSequence
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, SequentialSampler

from dist_cutmix.loop import Mixer
from dist_cutmix.metrics import is_stock_classification, soft_target_accuracy

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_warn
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
except ImportError as e:  # only a missing Lightning is the user's missing extra
    if e.name is None or e.name.partition('.')[0] != 'lightning':
        raise
    raise ImportError(f"dist_cutmix.lightning needs Lightning, the lightning extra: pip install "
                      f"'dist_cutmix[lightning]' ({e})", name=e.name) from e

__all__ = ['MixCallback', 'ResumableDataLoader']

Key = Union[int, str]
_STATE_VERSION = 1


class MixCallback(pl.Callback):
    """Mix every training batch on its device, locally or across all ranks; resumable from Lightning's checkpoints.

    Add it to ``Trainer(callbacks=[...])``; nothing in the ``LightningModule`` changes. Each training batch is
    mixed after it reaches its device and after ``on_after_batch_transfer``, before ``training_step``; the
    mixed images and soft targets replace ``batch[input_key]`` and ``batch[target_key]``, so ``x, y = batch``
    in ``training_step`` sees them (``F.cross_entropy(logits, y)`` takes the soft targets as they are).

    Args:
        mixer: a ready :class:`dist_cutmix.Mixer`; or leave it out and give the Mixer's arguments
            (``mixup_alpha``, ``cutmix_alpha``, ``cutmix_minmax``, ``prob``, ``switch_prob``,
            ``label_smoothing``, ``spec``, ``mode``, ``seed``, ``group``, ``num_classes``, ``per_sample``,
            ``exclude_self``, ``inplace``) as keywords. ``seed=None`` takes the seed of
            ``lightning.seed_everything`` (``PL_GLOBAL_SEED``) when one is set, else one the ranks agree on; it is
            kept in the checkpoint either way.
        input_key: where the images are in the batch: an index of a list batch or a key of a dict batch.
        target_key: where the targets are, likewise.
        log_prefix: the prefix of the logged names ``<prefix>/lambda``, ``<prefix>/cross_rank_fraction`` and
            ``<prefix>/train_accuracy``.
        **mixer_args: :class:`dist_cutmix.Mixer`'s arguments, when ``mixer`` is not given.

    Logged (``LightningModule.log`` from the callback): ``<prefix>/lambda``, the label weight of each sample's own
    image (the pool's mean with ``per_sample``); ``<prefix>/cross_rank_fraction``, the share of the global batch
    whose partner is on another rank (``'global'`` and ``'node'`` modes); ``<prefix>/train_accuracy`` (per step
    and per epoch, synced across ranks), the expected accuracy under the soft target
    (:func:`dist_cutmix.soft_target_accuracy`) of the logits the ``LightningModule``'s ``forward`` returned during
    ``training_step`` (call ``self(x)``), or of ``training_step``'s returned ``{'loss': ..., 'logits': ...}``.

    Stock torchmetrics classification metrics held by the ``LightningModule`` are guarded: one updated with the
    mixed soft targets during a training batch raises ``ValueError``, naming it and its soft-target replacement
    (:class:`dist_cutmix.SoftTargetAccuracy` or :class:`dist_cutmix.SoftTargetWrapper`), before it reports a
    wrong number; metrics updated outside training batches are not touched.

    Raises:
        TypeError: for a batch that is not a list or dict (a tuple cannot be written into), or for a
            ``training_step`` that takes ``dataloader_iter`` (Lightning then moves no batch to the device).
        ValueError: on a resume whose mixing differs from the checkpoint's (:meth:`Mixer.load_state_dict`).
        RuntimeError: on a resume from a mid-epoch checkpoint with a train loader that cannot resume its epoch
            in place (a plain ``DataLoader``: use :class:`ResumableDataLoader`), before the first batch; or when a
            :class:`ResumableDataLoader`'s position disagrees with Lightning's batch index.

    Example:
        >>> from dist_cutmix.lightning import MixCallback
        >>> mixing = MixCallback(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10, seed=0)
        >>> mixing.mixer.batch
        0
    """

    def __init__(
        self,
        mixer: Optional[Mixer] = None,
        *,
        input_key: Key = 0,
        target_key: Key = 1,
        log_prefix: str = 'mix',
        **mixer_args: Any,
    ) -> None:
        if mixer is not None and not isinstance(mixer, Mixer):
            raise TypeError(f'mixer must be a dist_cutmix.Mixer or None, got mixer={mixer!r}')
        if mixer is not None and mixer_args:
            raise ValueError(f'MixCallback takes a ready mixer= or the Mixer arguments, not both: got mixer={mixer!r} '
                             f'and {", ".join(sorted(mixer_args))}')
        for name, key in (('input_key', input_key), ('target_key', target_key)):
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise TypeError(f'{name} must be an int (list batch) or a str (dict batch), got {name}={key!r}')
        self.mixer = mixer if mixer is not None else Mixer(**mixer_args)
        self.input_key = input_key
        self.target_key = target_key
        self.log_prefix = log_prefix
        self._position = (0, 0)  # (epoch, batches of that epoch mixed): where the checkpoint's data stands
        self._restored: Optional[tuple[int, int]] = None
        self._in_batch = False
        self._logits: Optional[Tensor] = None
        self._warned_no_logits = False
        self._undo: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ fit

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != 'fit':
            return
        if is_param_in_hook_signature(pl_module.training_step, 'dataloader_iter', explicit=True):
            raise TypeError('MixCallback mixes the batch Lightning moves to the device before training_step; a '
                            'training_step(dataloader_iter) fetches and moves its own batches, so there is none to mix')
        if self.mixer.mode == 'node':  # torchrun sets it; Lightning's own launchers do not
            os.environ.setdefault('LOCAL_WORLD_SIZE', str(trainer.num_devices))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        handle = pl_module.register_forward_hook(self._keep_logits)
        self._undo.append(handle.remove)
        for name, metric in pl_module.named_modules():
            if is_stock_classification(metric):
                self._guard(name, metric)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_batch_counts(trainer, pl_module)
        if self._restored is None:
            return
        epoch, done = self._restored
        loaders = _flatten(trainer.train_dataloader)
        if 0 < done < trainer.num_training_batches:
            blind = [type(dl).__name__ for dl in loaders if not _has_state(dl)]
            lost = [dl for dl in loaders if isinstance(dl, ResumableDataLoader) and dl.resume_at != (epoch, done)]
            if lost:
                raise RuntimeError(
                    f'MixCallback: this run resumes from a checkpoint taken after batch {done} of epoch {epoch}, but '
                    f'the checkpoint restored the ResumableDataLoader to {lost[0].resume_at} (None: no position; the '
                    f'checkpoint was taken with another loader), so its batches would not be the ones the restored '
                    f'draws belong to. Resume from a checkpoint taken with the ResumableDataLoader, or at the end of '
                    f'an epoch.')
            if blind:
                raise RuntimeError(
                    f'MixCallback: this run resumes from a checkpoint taken after batch {done} of epoch {epoch}, and '
                    f'the train loader ({", ".join(blind)}) cannot resume inside an epoch: Lightning would start the '
                    f'epoch again from its first batch while the batch index and the mixing go on, so the restored '
                    f'draws would mix other images than the uninterrupted run did. Use '
                    f'dist_cutmix.lightning.ResumableDataLoader (same arguments as DataLoader), or resume from a '
                    f'checkpoint taken at the end of an epoch.')
        else:
            odd = [why for dl in loaders if (why := _order_not_reproduced(dl))]
            if odd:
                rank_zero_warn(
                    f'MixCallback: resumed at epoch {epoch}, but the data order of the resumed epochs will differ from '
                    f'the uninterrupted run ({"; ".join(odd)}), so the mixing will too. '
                    f'dist_cutmix.lightning.ResumableDataLoader resumes the order exactly.')

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._check_position(trainer, batch_idx)
        if self.mixer.seed is None and os.environ.get('PL_GLOBAL_SEED', '').isdigit():
            self.mixer.seed = int(os.environ['PL_GLOBAL_SEED'])  # seed_everything's seed, the same on every rank
        input, target = _get(batch, self.input_key, 'input_key'), _get(batch, self.target_key, 'target_key')
        result = self.mixer.mix(input, target)
        batch[self.input_key] = result.input
        batch[self.target_key] = result.target
        self._position = (trainer.current_epoch, batch_idx + 1)
        self._in_batch, self._logits = True, None
        n = int(result.target.shape[0])
        pl_module.log(f'{self.log_prefix}/lambda', result.mean_label_lam, on_step=True, on_epoch=False, batch_size=n)
        if self.mixer.mode != 'local':
            pl_module.log(f'{self.log_prefix}/cross_rank_fraction', result.cross_rank_fraction, on_step=True,
                          on_epoch=False, batch_size=n)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._in_batch = False
        result, logits, self._logits = self.mixer.last, self._logits, None
        if isinstance(outputs, dict) and isinstance(outputs.get('logits'), Tensor):
            logits = outputs['logits'].detach()
        if result is None or result.kind not in ('index', 'soft'):
            return
        target = result.target
        if logits is None or logits.shape != target.shape:
            if not self._warned_no_logits:
                self._warned_no_logits = True
                rank_zero_warn(
                    f'MixCallback logs no {self.log_prefix}/train_accuracy: no logits of shape {tuple(target.shape)} '
                    f'came from the LightningModule\'s forward during training_step. Call self(x) there, or return '
                    f"{{'loss': loss, 'logits': logits}} from training_step.")
            return
        accuracy = soft_target_accuracy(logits.float(), target, validate_args=False)
        pl_module.log(f'{self.log_prefix}/train_accuracy', accuracy, on_step=True, on_epoch=True, sync_dist=True,
                      batch_size=int(target.shape[0]))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The mixer's state (batch count, seed, world size, configuration) and the epoch position of the data."""
        epoch, done = self._position
        return {'version': _STATE_VERSION, 'mixer': self.mixer.state_dict(), 'epoch': epoch, 'batches_in_epoch': done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; ``ValueError`` (from :meth:`Mixer.load_state_dict`) on a mismatch."""
        if not isinstance(state_dict, dict) or 'mixer' not in state_dict:
            raise ValueError(f'MixCallback.load_state_dict takes a MixCallback.state_dict(), got {state_dict!r}')
        self.mixer.load_state_dict(state_dict['mixer'])
        self._position = self._restored = (int(state_dict['epoch']), int(state_dict['batches_in_epoch']))

    # ------------------------------------------------------------------ pieces

    def _check_batch_counts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise on every rank, before the first batch, when the ranks' epochs have different batch counts.

        A rank that mixes a batch the others never reach would wait in the mixing collective until the process
        group's timeout (measured: 60 s, then gloo's 'Connection closed by peer', naming no batch).
        """
        if self.mixer.mode == 'local' or trainer.world_size == 1:
            return
        n = trainer.num_training_batches
        mine = torch.tensor(-1 if math.isinf(n) else int(n), dtype=torch.int64, device=pl_module.device)
        counts = [int(c) for c in trainer.strategy.all_gather(mine).flatten().tolist()]
        if len(set(counts)) > 1:
            raise ValueError(
                f"MixCallback(mode={self.mixer.mode!r}) mixes each batch in one collective over the ranks, so every "
                f"rank must train the same number of batches an epoch, but the ranks' train loaders give "
                + ', '.join(f'rank {r}: {"unknown" if c < 0 else c}' for r, c in enumerate(counts))
                + ". Lightning's DistributedSampler (use_distributed_sampler=True, the default) and "
                "ResumableDataLoader give every rank the same count; so do equal per-rank datasets.")
        if counts[0] < 0:
            rank_zero_warn(
                f"MixCallback(mode={self.mixer.mode!r}): the train loaders have no length, so it cannot check that "
                f"every rank trains the same number of batches; a rank that mixes a batch the others never reach "
                f"waits in the mixing collective until the process group's timeout.")

    def _check_position(self, trainer: pl.Trainer, batch_idx: int) -> None:
        """Raise unless every ResumableDataLoader has yielded exactly Lightning's batch ``batch_idx`` of this epoch."""
        want = (trainer.current_epoch, batch_idx + 1)
        for loader in _flatten(trainer.train_dataloader):
            if isinstance(loader, ResumableDataLoader) and loader.position != want:
                raise RuntimeError(
                    f'MixCallback: Lightning trains batch {batch_idx} of epoch {want[0]}, but the ResumableDataLoader '
                    f'has yielded {loader.position[1]} batches of epoch {loader.position[0]}: the batch in hand is not '
                    f'the one the mixing is counted for (is the loader shared, or iterated elsewhere?)')

    def _keep_logits(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # Only outputs shaped like the soft targets: under DDP, Lightning also calls the module (its forward
        # redirected to training_step) around training_step, and that call returns the loss.
        last = self.mixer.last
        if self._in_batch and isinstance(output, Tensor) and last is not None and output.shape == last.target.shape:
            self._logits = output.detach()

    def _guard(self, name: str, metric: Any) -> None:
        """Make ``metric.update`` raise on soft targets during a training batch (``forward`` calls it too)."""
        update = metric.update
        callback = self

        @functools.wraps(update)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            target = kwargs.get('target', args[1] if len(args) > 1 else None)
            if (callback._in_batch and isinstance(target, Tensor) and target.is_floating_point()
                    and target.ndim >= 2):
                raise ValueError(
                    f'MixCallback put soft targets into the batch, and the train metric {name!r} '
                    f'({type(metric).__name__}) got them (shape {tuple(target.shape)}): it would report a wrong number '
                    f'without an error. Use dist_cutmix.SoftTargetAccuracy(num_classes=...) for an accuracy (the '
                    f'expected accuracy under the soft target; on index labels it equals MulticlassAccuracy'
                    f"(average='micro')) or dist_cutmix.SoftTargetWrapper(metric) for any other classification "
                    f'metric; MixCallback logs {callback.log_prefix}/train_accuracy itself.')
            return update(*args, **kwargs)

        # An instance attribute, as torchmetrics' own wrapper is; its __getstate__ drops it, so copies are unguarded.
        metric.update = guarded
        self._undo.append(functools.partial(setattr, metric, 'update', update))

    def _release(self) -> None:
        """Remove the forward hook and the metric guards: the module leaves fit as it came."""
        while self._undo:
            self._undo.pop()()
        self._in_batch, self._logits = False, None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the trainer; hook handles and guards belong to one process's module.
        state = dict(self.__dict__)
        state['_undo'] = []
        return state

    def __repr__(self) -> str:
        return (f'MixCallback({self.mixer!r}, input_key={self.input_key!r}, target_key={self.target_key!r}, '
                f'log_prefix={self.log_prefix!r})')


def _get(batch: Any, key: Key, name: str) -> Any:
    """``batch[key]`` from a batch the callback can write back into; raise naming the fix otherwise."""
    writable = isinstance(batch, MutableMapping) if isinstance(key, str) else isinstance(batch, MutableSequence)
    if not writable:
        raise TypeError(
            f'MixCallback writes the mixed images and targets back into the batch, so the batch must be a list (with '
            f'an int {name}) or a dict (with a str {name}); got a {type(batch).__name__} batch and {name}={key!r}. '
            f'default_collate gives a list; a collate_fn or on_after_batch_transfer that returns a tuple can return '
            f'a list instead.')
    try:
        return batch[key]
    except (KeyError, IndexError):
        held = list(batch) if isinstance(batch, MutableMapping) else f'{len(batch)} items'
        raise KeyError(f'MixCallback: the batch has no {name}={key!r}; it holds {held}') from None


def _flatten(loaders: Any) -> list[Any]:
    """The loaders of ``trainer.train_dataloader`` (one, or a list/dict of them as CombinedLoader takes)."""
    if isinstance(loaders, dict):
        return [dl for value in loaders.values() for dl in _flatten(value)]
    if isinstance(loaders, (list, tuple)):
        return [dl for value in loaders for dl in _flatten(value)]
    return [] if loaders is None else [loaders]


def _has_state(loader: Any) -> bool:
    """Lightning saves and restores a loader's position when it has ``state_dict`` and ``load_state_dict``."""
    return callable(getattr(loader, 'state_dict', None)) and callable(getattr(loader, 'load_state_dict', None))


def _order_not_reproduced(loader: Any) -> Optional[str]:
    """Why a resumed run would see another epoch order than the uninterrupted one (measured on Lightning 2.6)."""
    if _has_state(loader) or not isinstance(loader, DataLoader):
        return None
    sampler = loader.sampler
    if isinstance(sampler, SequentialSampler):
        return None
    if isinstance(sampler, DistributedSampler):
        if loader.num_workers == 0:
            return None
        return ('with workers, Lightning starts the first resumed epoch before it sets the DistributedSampler\'s '
                'epoch, so that epoch repeats epoch 0\'s order')
    return (f'its {type(sampler).__name__} draws each epoch\'s order from the global random state, which a resumed '
            f'process does not share')


# ----------------------------------------------------------------------------- the loader


class _ResumableSampler(DistributedSampler):
    """The order Lightning injects under DDP (``DistributedSampler``, seed ``PL_GLOBAL_SEED``), decided when iterated.

    The ranks and the seed are read when the sampler is iterated, so a loader made before the process group
    (``trainer.fit(model, loader)`` under ``strategy='ddp'``) shards as one made in ``train_dataloader()``.
    ``start`` skips that many indices of this rank's order (whole batches: the loader sets it).
    """

    def __init__(self, dataset: Any, shuffle: bool, seed: Optional[int]) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=0 if seed is None else seed)
        self.fixed_seed = seed
        self.start = 0

    def layout(self) -> DistributedSampler:
        """This epoch's ``DistributedSampler`` for the ranks and seed of now."""
        grouped = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if grouped else (1, 0)
        seed = self.fixed_seed if self.fixed_seed is not None else int(os.environ.get('PL_GLOBAL_SEED', 0))
        self.num_replicas, self.rank, self.seed = world, rank, seed
        sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=self.shuffle, seed=seed)
        sampler.set_epoch(self.epoch)
        return sampler

    def __iter__(self) -> Iterator[int]:
        indices = list(self.layout())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return len(self.layout())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that a Lightning run resumes mid-epoch exactly: same order, same position, same batches.

    Takes ``DataLoader``'s arguments (``batch_size``, ``shuffle``, ``num_workers``, ``collate_fn``, ``drop_last``,
    ...) except ``sampler`` and ``batch_sampler``, plus ``seed``. Each epoch's order is what Lightning gives a
    shuffled ``DataLoader`` under DDP: ``DistributedSampler(shuffle=shuffle, seed=seed)`` with the epoch Lightning
    sets, over the ranks of the process group (one process: all samples). Lightning saves :meth:`state_dict`
    (epoch, batches yielded) in its checkpoint and calls :meth:`load_state_dict` on resume; the next epoch of the
    same number then skips the trained batches by index, loading none of them. Nothing starts (no worker, no order
    drawn) until the first batch is asked for, after Lightning has set the epoch.

    Args:
        dataset: a map-style dataset (``len`` and ``__getitem__``).
        batch_size: as ``DataLoader``.
        shuffle: shuffle each epoch (by ``seed`` and the epoch), as ``DataLoader``'s; ``None`` is ``False``.
        seed: the order's seed; ``None`` reads ``PL_GLOBAL_SEED`` (``lightning.seed_everything``), else 0, as
            Lightning's injected ``DistributedSampler`` does.
        *args, **kwargs: ``DataLoader``'s other arguments.

    Raises:
        TypeError: for ``sampler``, ``batch_sampler`` or an ``IterableDataset``.
        ValueError: from :meth:`load_state_dict`, for a mid-epoch state of another seed, world size, batch size,
            dataset size or shuffle setting (its batches would be other samples).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> loader = ResumableDataLoader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True, seed=0)
        >>> state = {**loader.state_dict(), 'batches': 3}  # as if a checkpoint was taken after 3 batches
        >>> loader.load_state_dict(state)
        >>> len(list(loader)), len(loader)
        (1, 4)
    """

    def __init__(self, dataset: Any, batch_size: Optional[int] = 1, shuffle: Optional[bool] = None,
                 sampler: Any = None, batch_sampler: Any = None, *args: Any, seed: Optional[int] = None,
                 **kwargs: Any) -> None:
        if sampler is not None or batch_sampler is not None:
            raise TypeError(f'ResumableDataLoader draws its own order (shuffle, seed); got sampler={sampler!r}, '
                            f'batch_sampler={batch_sampler!r}')
        if isinstance(dataset, IterableDataset):
            raise TypeError(f'ResumableDataLoader needs a map-style dataset, got the IterableDataset {dataset!r}')
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f'seed must be an int or None, got seed={seed!r}')
        super().__init__(dataset, batch_size, False, _ResumableSampler(dataset, bool(shuffle), seed), None, *args,
                         **kwargs)
        self._resume: Optional[dict[str, Any]] = None
        self._epoch, self._yielded = 0, 0

    @property
    def resume_at(self) -> Optional[tuple[int, int]]:
        """``(epoch, batches)`` restored by :meth:`load_state_dict` and not yet resumed from, else ``None``."""
        return None if self._resume is None else (self._resume['epoch'], self._resume['batches'])

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batches yielded in that epoch)``, counting a resumed run's skipped batches."""
        return self._epoch, self._yielded

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # A generator: this body runs at the first batch, after Lightning's set_epoch (it calls iter() before).
        sampler: _ResumableSampler = self.sampler  # type: ignore[assignment]
        resume, self._resume = self._resume, None
        skip = resume['batches'] if resume is not None and resume['epoch'] == sampler.epoch else 0
        sampler.start = skip * (self.batch_size or 1)  # whole batches: the skipped ones are never loaded
        self._epoch, self._yielded = sampler.epoch, skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, batches yielded) and what decides which samples a batch holds."""
        sampler: _ResumableSampler = self.sampler  # type: ignore[assignment]
        sampler.layout()
        return {'version': _STATE_VERSION, 'epoch': self._epoch, 'batches': self._yielded, **self._layout_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at :meth:`state_dict`'s position: the next iteration of that epoch skips its trained batches."""
        if not isinstance(state_dict, dict) or not {'epoch', 'batches'} <= set(state_dict):
            raise ValueError(f'ResumableDataLoader.load_state_dict takes a ResumableDataLoader.state_dict(), got '
                             f'{state_dict!r}')
        batches = state_dict['batches']
        if 0 < batches < len(self):  # mid-epoch: the skipped batches must be the same samples
            self.sampler.layout()  # type: ignore[attr-defined]
            mine = self._layout_state()
            differ = {k: (v, state_dict.get(k)) for k, v in mine.items() if state_dict.get(k) != v}
            if differ:
                raise ValueError(
                    'ResumableDataLoader cannot resume inside the epoch of this checkpoint: its batches would hold '
                    'other samples, as it differs in ' + ', '.join(f'{k}={v!r} (checkpoint: {c!r})'
                                                                   for k, (v, c) in differ.items()))
        self._resume = {'epoch': int(state_dict['epoch']), 'batches': int(batches)}

    def _layout_state(self) -> dict[str, Any]:
        sampler: _ResumableSampler = self.sampler  # type: ignore[assignment]
        return {'seed': sampler.seed, 'world_size': sampler.num_replicas, 'shuffle': sampler.shuffle,
                'batch_size': self.batch_size, 'drop_last': self.drop_last, 'dataset_size': len(self.dataset)}


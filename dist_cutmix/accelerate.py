"""The Hugging Face Accelerate door: a :class:`~dist_cutmix.Mixer` that Accelerate checkpoints and resumes.

:class:`AcceleratedMixer` is the loop mixer (``x, y = mixer(x, y)``, once per batch on every process), registered
with ``accelerator.register_for_checkpointing`` when it is made, so ``accelerator.save_state`` keeps its batch
count, seed and world size and ``accelerator.load_state`` brings them back. :meth:`AcceleratedMixer.resume` is the
one call a loop makes before its first batch: it gives the epoch to start from and a loader positioned at the
first batch not yet trained, and refuses, on every process at once, the loaders whose order a mid-epoch resume
cannot reproduce. A global mixer made in a single process that a launcher meant to be one of several warns.

What was measured on accelerate 1.16.0 (two CPU processes, gloo), and what this module does about it:

* A shuffled ``DataLoader`` draws each epoch's order from a generator seeded once, when ``prepare`` runs;
  ``save_state`` does not keep it, so after ``load_state``, ``set_epoch(e)`` and ``skip_first_batches`` a resumed
  epoch replays epoch 0's order (0 of 8 resumed batches equal the uninterrupted run's, in one process and in
  two). ``DataLoaderConfiguration(use_seedable_sampler=True)`` makes the order a function of the epoch (all
  equal). A ``WeightedRandomSampler`` fails the same way; a ``SequentialSampler``, a ``DistributedSampler``
  and an ``IterableDataset`` with ``set_epoch`` resume exactly. :meth:`~AcceleratedMixer.resume` accepts a
  sampler only if it is sequential or has ``set_epoch``.
* ``dispatch_batches=True`` on a map-style dataset with more than one process (and no ``split_batches``):
  ``skip_first_batches`` skips the underlying loader's batches, not the dispatched ones, which are
  ``num_processes`` of them each, so the resumed epoch starts at the wrong sample. Refused.
* A prepared loader iterated again starts the epoch it counts itself (``loader.iteration``, one more per pass),
  which ``set_epoch`` overwrites; ``skip_first_batches`` returns a new loader that copies it. So after a
  mid-epoch resume the original loader is set to the next epoch, and a loop that never calls ``set_epoch`` (as
  Accelerate's own examples) goes on in the uninterrupted order; one that calls it every epoch does too.
* ``accelerate launch --num_processes 2 --cpu`` starts one process (its CPU launcher leaves the others to
  ``mpirun``) with ``MASTER_ADDR`` set and no ``WORLD_SIZE``; ``accelerate launch --multi_gpu --num_processes 2``
  (or ``torchrun``) on a machine without GPUs starts two processes that each run alone, ``WORLD_SIZE=2``, unless
  ``Accelerator(cpu=True)`` (or ``ACCELERATE_USE_CPU=1``). Either way ``accelerator.num_processes`` is 1, and a
  global mixer would mix locally without a word: it warns instead.

Needs the ``accelerate`` extra (``pip install 'dist_cutmix[accelerate]'``); ``import dist_cutmix`` does not
import Accelerate.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch.utils.data import BatchSampler, IterableDataset, SequentialSampler

from dist_cutmix.loop import Mixer

try:
    from accelerate import Accelerator
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard, IterableDatasetShard
except ImportError as e:  # only a missing Accelerate is the user's missing extra
    if e.name is None or e.name.partition('.')[0] != 'accelerate':
        raise
    raise ImportError(f"dist_cutmix.accelerate needs Hugging Face Accelerate, the accelerate extra: pip install "
                      f"'dist_cutmix[accelerate]' ({e})", name=e.name) from e

__all__ = ['AcceleratedMixer']

# Environment variables in which a launcher (torchrun, accelerate launch, mpirun) says how many processes it started.
_WORLD_SIZE_VARS = ('WORLD_SIZE', 'PMI_SIZE', 'OMPI_COMM_WORLD_SIZE', 'MV2_COMM_WORLD_SIZE')


class AcceleratedMixer(Mixer):
    """A :class:`~dist_cutmix.Mixer` that Accelerate's ``save_state`` / ``load_state`` keep, and that resumes a loop.

    Made after the ``Accelerator`` (and before ``load_state``), it registers itself for checkpointing: the batch
    count, seed and world size travel in ``save_state``'s folder. Call it as the Mixer,
    ``x, y = mixer(x, y)``, once per batch on every process; call :meth:`resume` once, before the first batch.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        *args: :class:`~dist_cutmix.Mixer`'s arguments (``mixup_alpha``, ``cutmix_alpha``, ``mode``, ``seed``,
            ``num_classes``, ...), with its defaults and meaning; ``group=None`` (the default) mixes over all of
            Accelerate's processes in ``mode='global'``.
        **kwargs: the same, by name.

    Warns:
        UserWarning: in ``'global'`` or ``'node'`` mode when Accelerate runs one process but the launch asked for
            more (``WORLD_SIZE`` > 1, or ``accelerate launch --cpu --num_processes N``): such a mixer can only mix
            within its own batch.

    Example:
        >>> import torch
        >>> from accelerate import Accelerator
        >>> from dist_cutmix.accelerate import AcceleratedMixer
        >>> accelerator = Accelerator(cpu=True)
        >>> mixer = AcceleratedMixer(accelerator, mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10, mode='global')
        >>> x, y = mixer(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        >>> tuple(y.shape), mixer.state_dict()['batch']  # what save_state keeps, with the seed and world size
        ((8, 10), 1)
    """

    def __init__(self, accelerator: Accelerator, *args: Any, **kwargs: Any) -> None:
        if not isinstance(accelerator, Accelerator):
            raise TypeError(f'accelerator must be an accelerate.Accelerator, got accelerator={accelerator!r}')
        super().__init__(*args, **kwargs)
        self.accelerator = accelerator
        self._checkpoint_world_size: Optional[int] = None
        accelerator.register_for_checkpointing(self)
        if self.mode != 'local' and accelerator.num_processes == 1:
            asked = _launch_asked_for_more()
            if asked:
                warnings.warn(
                    f"AcceleratedMixer(mode={self.mode!r}) finds one process, but {asked}; so it mixes within this "
                    f"process's batch only. To run N processes on CPUs: accelerate launch --multi_gpu "
                    f"--num_processes N with Accelerator(cpu=True) (or ACCELERATE_USE_CPU=1), or torchrun "
                    f"--nproc_per_node N with Accelerator(cpu=True).", UserWarning, stacklevel=2,
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """:meth:`Mixer.load_state_dict`, remembering the checkpoint's world size for :meth:`resume`."""
        super().load_state_dict(state)
        self._checkpoint_world_size = state.get('world_size')

    def resume(self, loader: Any) -> tuple[int, Iterable[Any]]:
        """Give the epoch to start from and the batches of that epoch not yet trained; call once, before the loop.

        After ``accelerator.load_state``, the batch count says where the run stopped: epoch
        ``batch // len(loader)``, of which ``batch % len(loader)`` batches were trained. The loader is set to that
        epoch, and ``accelerator.skip_first_batches`` skips the trained ones; the loader itself is set to the next
        epoch, so later epochs iterate ``loader`` in the uninterrupted run's order. A fresh run gets ``(0, loader)``.
        Use it as::

            start, batches = mixer.resume(loader)
            for epoch in range(start, epochs):
                for x, y in (batches if epoch == start else loader):
                    x, y = mixer(x, y)

        Every process must call it (in ``'global'`` and ``'node'`` mode it compares the processes' loader lengths).

        Args:
            loader: the training loader as ``accelerator.prepare`` returned it; one batch per mixer call.

        Returns:
            ``(epoch, batches)``: the epoch to start from, and an iterable of its remaining batches.

        Raises:
            TypeError: for a loader that ``accelerator.prepare`` did not return, or one without a length.
            ValueError: on every process, before any batch: for a loader whose order a mid-epoch resume cannot
                reproduce (naming the setting and the fix), or a ``StatefulDataLoader``; for processes whose
                loaders have different lengths in ``'global'`` or ``'node'`` mode (each would wait for the others
                in a collective); for a checkpoint written by a different number of processes (the epoch's batches
                differ).
        """
        if not isinstance(loader, (DataLoaderShard, DataLoaderDispatcher)):
            raise TypeError(f'resume() takes the loader that accelerator.prepare returned (it positions it by epoch '
                            f'and skips batches the Accelerate way), got {type(loader).__name__}')
        if getattr(loader, 'use_stateful_dataloader', False):
            # load_state gives a StatefulDataLoader its position back itself, and Accelerate says not to use
            # skip_first_batches on one: skipping here would skip twice. Not supported (nor tested: needs torchdata).
            raise ValueError('resume() positions the loader with skip_first_batches, which Accelerate says not to use '
                             'with DataLoaderConfiguration(use_stateful_dataloader=True); use a seedable sampler '
                             '(use_seedable_sampler=True) without the stateful loader')
        problem = _order_problem(loader, self.accelerator.num_processes)
        if problem:
            raise ValueError(f'a run with this loader cannot resume mid-epoch in its own data order, so a resumed '
                             f'run would mix the right draws into the wrong images: {problem}')
        try:
            length = len(loader)
        except TypeError as e:
            raise TypeError(f'resume() positions the loader by its length, and this one has none ({e}); give its '
                            f'dataset a __len__') from e
        if length < 1:
            raise ValueError(f'resume() needs a loader with batches, got len(loader)={length}')
        self._check_lengths_agree(length)
        world = self.accelerator.num_processes
        if self.batch and self._checkpoint_world_size not in (None, world):
            raise ValueError(f'the checkpoint was written by {self._checkpoint_world_size} processes and this run has '
                             f'{world}: each process\'s loader has another number of batches per epoch, so batch '
                             f'{self.batch} does not name the same place in the data; resume on '
                             f'{self._checkpoint_world_size} processes')
        epoch, done = divmod(self.batch, length)
        loader.set_epoch(epoch)
        if not done:
            return epoch, loader
        batches = self.accelerator.skip_first_batches(loader, done)
        # The skipped loader copies the epoch; the loader itself starts the next one when iterated again (Accelerate
        # counts its passes in `iteration`). Set the count, not set_epoch: that would reach the sampler the two
        # share, and a DistributedSampler under the skipped loader takes its epoch from there only.
        loader.iteration = epoch + 1
        return epoch, batches

    def _check_lengths_agree(self, length: int) -> None:
        if self.mode == 'local' or self.accelerator.num_processes == 1:
            return
        lengths = self.accelerator.gather(torch.tensor([length], device=self.accelerator.device)).tolist()
        if len(set(lengths)) > 1:
            each = ', '.join(f'process {r}: {n}' for r, n in enumerate(lengths))
            raise ValueError(f"mode={self.mode!r} mixes every batch across processes, and their loaders have "
                             f"different lengths ({each}): the process with more batches would wait for the "
                             f"others in a collective until the timeout. Keep Accelerate's even_batches=True "
                             f"(the default) or drop_last=True on the DataLoader")


def _order_problem(loader: Any, num_processes: int) -> Optional[str]:
    """Why ``set_epoch`` and ``skip_first_batches`` would not bring back this loader's order, or ``None``."""
    dataset = loader.dataset
    if isinstance(dataset, IterableDatasetShard):
        dataset = dataset.dataset
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, 'set_epoch'):
            return None
        return (f'the IterableDataset {type(dataset).__name__} has no set_epoch(epoch), so nothing fixes the order '
                f'of an epoch; give it one that does')
    if isinstance(loader, DataLoaderDispatcher) and num_processes > 1 and not loader.split_batches:
        return (f'dispatch_batches=True with {num_processes} processes: skip_first_batches skips the underlying '
                f'loader\'s batches, not the dispatched ones ({num_processes} times as large), so a resumed epoch '
                f'starts at the wrong sample; use DataLoaderConfiguration(dispatch_batches=False) (or '
                f'split_batches=True)')
    sampler = _sampler(loader)
    if isinstance(sampler, SequentialSampler) or hasattr(sampler, 'set_epoch'):
        return None
    if sampler is None:
        return (f'its batch sampler {type(loader.batch_sampler).__name__} holds no sampler that Accelerate\'s '
                f'set_epoch reaches, so nothing sets the order of an epoch; use a batch sampler with a .sampler '
                f'that has set_epoch(epoch)')
    if isinstance(sampler, torch.utils.data.RandomSampler):
        return ('shuffle=True draws each epoch\'s order from a generator that save_state does not keep (a resumed '
                'epoch replays epoch 0\'s order); use Accelerator(dataloader_config=DataLoaderConfiguration('
                'use_seedable_sampler=True)), whose order is a function of the epoch')
    return (f'its sampler {type(sampler).__name__} has no set_epoch(epoch), so nothing fixes the order of an '
            f'epoch; use a sampler whose order set_epoch fixes (a DistributedSampler, or a RandomSampler with '
            f'DataLoaderConfiguration(use_seedable_sampler=True))')


def _sampler(loader: Any) -> Any:
    """The sampler under the prepared loader's batch samplers, where Accelerate's ``set_epoch`` looks for it."""
    holder = loader.sampler if isinstance(loader.sampler, BatchSampler) else loader.batch_sampler
    while holder is not None:  # BatchSamplerShard -> BatchSampler -> sampler (one process: BatchSampler -> sampler)
        sampler = getattr(holder, 'sampler', None)
        if sampler is not None:
            return sampler
        holder = getattr(holder, 'batch_sampler', None)
    return None


def _launch_asked_for_more() -> Optional[str]:
    """What in the environment says a launcher meant this process to be one of several, or ``None``."""
    for name in _WORLD_SIZE_VARS:
        value = os.environ.get(name, '')
        if value.isdigit() and int(value) > 1:
            return (f'the launcher started {name}={value} processes (on a machine without GPUs, an Accelerator '
                    f'without cpu=True runs each of them alone)')
    # `accelerate launch --cpu` with --num_processes > 1 runs one process and leaves the rest to mpirun; it sets
    # MASTER_ADDR only in that case, and ACCELERATE_USE_CPU always.
    if 'ACCELERATE_USE_CPU' in os.environ and 'MASTER_ADDR' in os.environ:
        return ('accelerate launch --cpu was asked for more than one process (MASTER_ADDR is set) and started this '
                'one only: its CPU launcher leaves the others to mpirun (--mpirun_hostfile)')
    return None

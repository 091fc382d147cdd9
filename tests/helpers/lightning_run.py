"""A tiny Lightning run with :class:`dist_cutmix.lightning.MixCallback`, for tests/doors/test_lightning_door.py.

In-process tests build it with :func:`make_run`; ``python -m tests.helpers.lightning_run STRATEGY OUT`` trains
it on two CPU ranks (gloo) under ``strategy='ddp'`` (Lightning re-launches this module for rank 1) or
``'ddp_spawn'`` (Lightning spawns both ranks), and under ``'ddp'`` resumes it once from a mid-epoch
checkpoint. Every rank writes what it saw to ``OUT/<tag>_rank<r>.pt`` (:class:`Record`).
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from dist_cutmix.lightning import MixCallback, ResumableDataLoader

C, H, W, K = 3, 8, 8, 4
RECIPE = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
MIX_SEED = 7
DDP_SAMPLES, DDP_BATCH, DDP_EPOCHS, DDP_RESUME_STEP = 32, 4, 2, 6  # 4 batches per rank and epoch


def dataset(n: int, seed: int = 0) -> TensorDataset:
    """``n`` random images with labels in ``[0, K)``, the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, C, H, W, generator=g), torch.randint(0, K, (n,), generator=g))


class Tiny(pl.LightningModule):
    """A conv net with SGD and momentum (so a resume must restore the optimizer too); it records its batches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(C, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                       torch.nn.Flatten(), torch.nn.Linear(4, K))
        self.mixed: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.evaluated: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.mixed.append((x.detach().clone(), y.detach().clone()))
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluated.append((self.trainer.state.stage.value, batch[0].clone(), batch[1].clone()))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluated.append(('test', batch[0].clone(), batch[1].clone()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Record(pl.Callback):
    """Put before MixCallback: keeps each training batch as it came, the draws after, and writes them at fit end."""

    def __init__(self, mixing: MixCallback, save_to: Optional[str] = None) -> None:
        self.mixing = mixing
        self.save_to = save_to
        self.raw: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.draws: list[dict[str, Any]] = []
        self.positions: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.raw.append((batch[self.mixing.input_key].clone(), batch[self.mixing.target_key].clone()))
        self.positions.append((trainer.current_epoch, batch_idx))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last = self.mixing.mixer.last
        self.draws.append({'lam': torch.as_tensor(last.lam).clone(), 'box': torch.as_tensor(last.box).clone(),
                           'partner_rank': last.partner_rank.clone(),
                           'partner_index': last.partner_index.clone()})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_to is not None:
            torch.save(self.result(trainer, pl_module), f'{self.save_to}_rank{trainer.global_rank}.pt')

    def result(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What a run saw: raw and mixed batches, draws, weights, counts and logged values."""
        return {'raw': self.raw, 'mixed': pl_module.mixed, 'draws': self.draws, 'positions': self.positions,
                'weights': {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                'batch': self.mixing.mixer.batch, 'seed': self.mixing.mixer.seed, 'global_step': trainer.global_step,
                'world_size': trainer.world_size,
                'logged': {k: float(v) for k, v in trainer.callback_metrics.items()}}


def make_run(*, callbacks: tuple = (), save_to: Optional[str] = None, mixing: Optional[MixCallback] = None,
             **trainer_args: Any) -> tuple[pl.Trainer, Tiny, Record, MixCallback]:
    """A seeded ``Tiny`` and a CPU ``Trainer`` with ``Record`` and ``MixCallback`` (global RECIPE by default)."""
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    mixing = mixing if mixing is not None else MixCallback(**RECIPE, mode='global', num_classes=K, seed=MIX_SEED)
    record = Record(mixing, save_to)
    args = dict(accelerator='cpu', devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False)
    args.update(trainer_args)
    if any(isinstance(c, ModelCheckpoint) for c in callbacks):
        args['enable_checkpointing'] = True
    trainer = pl.Trainer(callbacks=[record, mixing, *callbacks], **args)
    return trainer, model, record, mixing


def _ddp() -> DDPStrategy:
    # the timeout covers the rendezvous too: rank 1 imports Lightning first (20 s on a loaded 2-core machine)
    return DDPStrategy(timeout=timedelta(seconds=120))


def main(argv: list[str]) -> None:
    strategy, out = argv[0], Path(argv[1])
    ddp = _ddp() if strategy == 'ddp' else DDPStrategy(start_method='spawn', timeout=timedelta(seconds=120))
    loader = ResumableDataLoader(dataset(DDP_SAMPLES), batch_size=DDP_BATCH, shuffle=True)
    every_step = ModelCheckpoint(dirpath=out / 'ckpt', filename='{step}', every_n_train_steps=1, save_top_k=-1)
    trainer, model, _, mixing = make_run(callbacks=(every_step,), save_to=str(out / 'full'), strategy=ddp, devices=2,
                                         max_epochs=DDP_EPOCHS)
    trainer.fit(model, loader)
    if strategy != 'ddp':  # the launching process: ddp_spawn trained copies of its callback, not the callback
        (out / 'launcher.txt').write_text(f'mixer.batch {mixing.mixer.batch}')
        return
    # the same two ranks resume from a checkpoint inside epoch 1
    trainer, model, _, _ = make_run(save_to=str(out / 'resumed'), strategy=_ddp(), devices=2, max_epochs=DDP_EPOCHS)
    loader = ResumableDataLoader(dataset(DDP_SAMPLES), batch_size=DDP_BATCH, shuffle=True)
    trainer.fit(model, loader, ckpt_path=str(out / 'ckpt' / f'step={DDP_RESUME_STEP}.ckpt'))
    # ranks whose loaders differ in length (4 and 3 batches) are refused before the first batch
    trainer, model, _, _ = make_run(strategy=_ddp(), devices=2, use_distributed_sampler=False)
    rank = int(os.environ['LOCAL_RANK'])  # set on both ranks since the first fit
    uneven = DataLoader(dataset((4 if rank == 0 else 3) * DDP_BATCH), batch_size=DDP_BATCH)
    try:
        trainer.fit(model, uneven)
    except ValueError as e:
        (out / f'uneven_rank{rank}.txt').write_text(f'{e}\nmixed {len(model.mixed)}')


if __name__ == '__main__':
    main(sys.argv[1:])

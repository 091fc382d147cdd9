"""The ``step`` part of ``launch/benchmarks/benchmark.py``: CutMix's share of a Composer training step.

A Composer ``Trainer`` on ResNet-18 (CIFAR-sized input), with and without ``CutMix``, local
(one rank) and global (two ranks, same global batch). A step is timed from
``BEFORE_DATALOADER`` to ``BATCH_END``: CutMix mixes at ``AFTER_DATALOADER``, before
``BATCH_START``, so a ``BATCH_START`` -> ``BATCH_END`` window would never see it (that window
is recorded too). The share, (with - without) / without, is taken over neighbouring batches
of one run that mixes only odd batches; a run with against a run without is reported too,
but on a shared machine run-to-run load swings exceed the effect.

Each mode is measured for two variants of ``CutMix`` (one row each, same runs without CutMix):
the default (``inplace=None``), which on the CPU mixes a copy of the batch every step (the batch
never moves, so it may be the user's memory), and ``inplace=True``, which pastes into the
collated batch (the user promises it is theirs to overwrite). The difference between the two
rows is what the in-place path is worth.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

import torch

from launch.benchmarks.bench_common import NUM_CLASSES, md_table, median, spawn_ranks
from launch.tools.spawn import answer_cpuinfo_from_constant

__all__ = ['VARIANTS', 'run_step', 'step_markdown']

# Row name -> CutMix(inplace=...): the default first, so a lookup by mode finds what users get.
VARIANTS: dict[str, Optional[bool]] = {'default (copy)': None, 'inplace=True': True}


def _make_net(model: str) -> torch.nn.Module:
    if model == 'resnet18':
        import torchvision

        return torchvision.models.resnet18(num_classes=NUM_CLASSES)
    if model == 'tiny':
        nn = torch.nn
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, NUM_CLASSES))
    raise ValueError(f"model must be 'resnet18' or 'tiny', got {model!r}")


def _step_rank(rank: int, world: int, mode: str, batch_size: int, batches: int, warmup: int, rounds: int,
               model: str, seed: int) -> dict[str, Any]:
    """Train with and without CutMix on this rank; per-batch seconds of every run.

    Runs, each in a fresh ``Trainer`` on the same data and initial weights: ``rounds`` x
    (``without``, then ``with`` for every variant of :data:`VARIANTS`) of ``warmup + batches``
    batches, then per variant one ``alternating`` run of ``warmup + 2 * batches`` batches where
    CutMix mixes only the odd batches, so each mixed batch has an unmixed neighbour that ran under
    the same background load. Returns ``{'without': ..., 'variants': {name: {'with': ...,
    'alternating': ...}}}``.
    """
    from composer import Callback, Trainer
    from composer.core import Event
    from composer.models import ComposerClassifier
    from composer.utils import dist as composer_dist
    from torch.utils.data import DataLoader, TensorDataset

    from dist_cutmix import CutMix

    class StepTimer(Callback):
        """``BEFORE_DATALOADER`` -> ``BATCH_END`` (the whole step, CutMix included) and
        ``BATCH_START`` -> ``BATCH_END``."""

        def __init__(self) -> None:
            self.step: list[float] = []
            self.inner: list[float] = []
            self.batch: list[int] = []
            self._t0 = self._t1 = 0.0

        def before_dataloader(self, state: Any, logger: Any) -> None:
            self._t0 = time.perf_counter()

        def batch_start(self, state: Any, logger: Any) -> None:
            self._t1 = time.perf_counter()

        def batch_end(self, state: Any, logger: Any) -> None:
            now = time.perf_counter()
            self.step.append(now - self._t0)
            self.inner.append(now - self._t1)
            self.batch.append(int(state.timestamp.batch) - 1)  # BATCH_END comes after the counter moved on

    class TimedCutMix(CutMix):
        """Our ``CutMix``, timing its own work at ``AFTER_DATALOADER``; with ``odd_only``, it mixes odd batches only."""

        def __init__(self, *args: Any, odd_only: bool = False, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.odd_only = odd_only
            self.mix_s: list[float] = []

        def match(self, event: Event, state: Any) -> bool:
            if event == Event.AFTER_DATALOADER and self.odd_only and int(state.timestamp.batch) % 2 == 0:
                return False
            return super().match(event, state)

        def apply(self, event: Event, state: Any, logger: Any) -> None:
            t0 = time.perf_counter()
            super().apply(event, state, logger)
            if event == Event.AFTER_DATALOADER:
                self.mix_s.append(time.perf_counter() - t0)

    answer_cpuinfo_from_constant()  # Composer's CPU query costs ~1 s of start-up, no effect on steps
    logging.getLogger('dist_cutmix').setLevel(logging.ERROR)  # the metric-wrapping notice, once per Trainer
    g = torch.Generator().manual_seed(seed)
    start = warmup + warmup % 2  # alternating pairs (even: plain, odd: mixed) start on an even batch
    longest = start + 2 * batches
    n = world * batch_size * longest
    dataset = TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))

    def train(algorithms: list[Any], total: int) -> StepTimer:
        torch.manual_seed(seed)
        net = _make_net(model)
        loader = DataLoader(dataset, batch_size=batch_size, drop_last=True,
                            sampler=composer_dist.get_sampler(dataset, shuffle=False))
        timer = StepTimer()
        trainer = Trainer(
            model=ComposerClassifier(net, num_classes=NUM_CLASSES),
            train_dataloader=loader,
            max_duration=f'{total}ba',
            train_subset_num_batches=total,
            optimizers=torch.optim.SGD(net.parameters(), lr=0.01),
            algorithms=algorithms,
            callbacks=[timer],
            seed=seed,
            device='cpu',
            progress_bar=False,
            log_to_console=False,
            dist_timeout=120,
        )
        trainer.fit()
        trainer.close()
        return timer

    without: dict[str, list[Any]] = {'step': [], 'inner': []}
    variants: dict[str, dict[str, Any]] = {name: {'with': {'step': [], 'inner': [], 'mix': []}} for name in VARIANTS}
    for _ in range(rounds):
        timer = train([], warmup + batches)
        without['step'] += timer.step[warmup:]
        without['inner'] += timer.inner[warmup:]
        for name, inplace in VARIANTS.items():
            cutmix = TimedCutMix(mode=mode, num_classes=NUM_CLASSES, inplace=inplace)
            timer = train([cutmix], warmup + batches)
            variants[name]['with']['step'] += timer.step[warmup:]
            variants[name]['with']['inner'] += timer.inner[warmup:]
            variants[name]['with']['mix'] += cutmix.mix_s[warmup:]
    for name, inplace in VARIANTS.items():
        cutmix = TimedCutMix(mode=mode, num_classes=NUM_CLASSES, inplace=inplace, odd_only=True)
        timer = train([cutmix], start + 2 * batches)
        variants[name]['alternating'] = {'step': timer.step[start:], 'batch': timer.batch[start:]}
    return {'without': without, 'variants': variants}


def _combine_step(mode: str, world: int, batch_size: int, model: str,
                  per_rank: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant. Per batch, the slowest rank (ranks wait for each other in DDP); shares from medians."""
    def slowest(runs: Sequence[dict[str, list[float]]], key: str) -> list[float]:
        return [max(vals) for vals in zip(*(r[key] for r in runs), strict=True)]

    without = [r['without'] for r in per_rank]
    step_without, inner_without = slowest(without, 'step'), slowest(without, 'inner')
    base = median(step_without)
    rows = []
    for name, inplace in VARIANTS.items():
        runs = [r['variants'][name] for r in per_rank]
        with_ = [r['with'] for r in runs]
        step = {'without': step_without, 'with': slowest(with_, 'step')}
        inner = {'without': inner_without, 'with': slowest(with_, 'inner')}
        mix = slowest(with_, 'mix')
        alternating = slowest([r['alternating'] for r in runs], 'step')
        batch = runs[0]['alternating']['batch']
        plain = [t for t, b in zip(alternating, batch, strict=True) if b % 2 == 0]
        mixed = [t for t, b in zip(alternating, batch, strict=True) if b % 2 == 1]
        plain_median = median(plain)
        rows.append({
            'mode': mode, 'world': world, 'batch_per_rank': batch_size, 'model': model,
            'variant': name, 'inplace': inplace,
            'median_step_s': {v: median(s) for v, s in step.items()},
            'median_inner_s': {v: median(s) for v, s in inner.items()},
            'median_mix_s': median(mix),
            # (with - without) / without over neighbouring batches of one run: robust to slow load changes
            'share': median([m - p for p, m in zip(plain, mixed, strict=True)]) / plain_median,
            # the same estimate on the run without CutMix (odd vs even batches): what noise alone gives
            'null_share': median([b - a for a, b in zip(step['without'][0::2], step['without'][1::2],
                                                         strict=True)]) / base,
            # the same over separate runs: exposed to the load of a shared machine
            'separate_runs_share': (median(step['with']) - base) / base,
            'direct_share': median(mix) / base,
            'alternating_median_s': {'plain': plain_median, 'mixed': median(mixed)},
            'step_s': step, 'inner_s': inner, 'mix_s': mix, 'alternating_s': {'plain': plain, 'mixed': mixed},
        })
    return rows


def run_step(batch_size: int, batches: int, *, warmup: int = 2, rounds: int = 1, model: str = 'resnet18',
             seed: int = 0, threads: int = 1) -> list[dict[str, Any]]:
    """CutMix's share of a Composer training step: local on one rank, global on two (same global batch).

    One row per mode and variant (:data:`VARIANTS`), the default's row first in each mode.
    """
    rows = []
    for mode, world in (('local', 1), ('global', 2)):
        per_rank_batch = max(1, batch_size // world)
        per_rank = spawn_ranks(_step_rank, world, (mode, per_rank_batch, batches, warmup, rounds, model, seed),
                                threads=threads, deadline_s=1800.0)
        rows += _combine_step(mode, world, per_rank_batch, model, per_rank)
    return rows


def step_markdown(rows: Sequence[dict[str, Any]]) -> str:
    table = md_table(
        ['mode', 'CutMix', 'ranks x batch', 'model', 'step without (ms)', 'step with (ms)',
         'CutMix share, alternating batches', 'same estimate, no CutMix (noise)', 'CutMix share, separate runs',
         'CutMix own time (ms)',
         'own time / step', 'BATCH_START->END without / with (ms)'],
        [[r['mode'], r['variant'], f"{r['world']} x {r['batch_per_rank']}", r['model'],
          r['median_step_s']['without'] * 1e3,
          r['median_step_s']['with'] * 1e3, f"{r['share']:+.2%}", f"{r['null_share']:+.2%}",
          f"{r['separate_runs_share']:+.2%}",
          r['median_mix_s'] * 1e3, f"{r['direct_share']:.2%}",
          f"{r['median_inner_s']['without'] * 1e3:.0f} / {r['median_inner_s']['with'] * 1e3:.0f}"] for r in rows],
    )
    return '\n\n'.join([
        "### The training step: CutMix's share (Composer Trainer, CPU; median over batches, slowest rank)",
        'A step is timed `BEFORE_DATALOADER` -> `BATCH_END`; CutMix runs at `AFTER_DATALOADER`, before '
        '`BATCH_START`, so the `BATCH_START -> BATCH_END` window (last column) never sees it. '
        '"Alternating batches": one run that mixes only odd batches; the share is the median difference '
        'between each mixed batch and the unmixed one before it, over the unmixed median; the same estimate '
        'on the run without CutMix shows the noise. "Separate runs": '
        'median of a run with CutMix against a run without. "Own time": the algorithm\'s `AFTER_DATALOADER` '
        'call alone (in global mode it includes waiting for the other rank at the first collective). '
        '"CutMix": `default (copy)` is `CutMix()`, which on the CPU mixes a copy of the batch (it never moves to a '
        'device, so it may alias the dataset); `inplace=True` pastes into the collated batch. Both rows of a mode '
        'share the runs without CutMix.',
        table,
    ])

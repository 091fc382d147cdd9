#!/usr/bin/env python
"""What CutMix costs in training-device memory when the batch is split into microbatches.

Composer moves one microbatch at a time to the device (``_train_microbatches`` calls
``batch_to_device`` per microbatch). ``CutMix`` mixes once per batch at ``AFTER_DATALOADER`` and
moves the whole batch there, and by default on the CPU it mixes a copy. This script trains a
tiny model (average-pool to 4x4, then one linear layer, so activations stay small next to the
batch) in a real Composer ``Trainer`` with ``device_train_microbatch_size`` below the batch size,
without CutMix and with ``CutMix()``, ``CutMix(inplace=True)`` and ``CutMix(inplace=False)``,
and measures per step:

* **input bytes on the device during the microbatch loop**: at every ``BEFORE_FORWARD`` a
  Callback walks every live tensor (``gc.get_objects()``) on the training device whose trailing
  dimensions are one sample's ``(C, H, W)`` in the batch's dtype (the loader's batch, its
  microbatch views, a device copy, CutMix's mixed batch, whoever holds them), and sums the
  ``nbytes`` of their distinct storages; the step's figure is the largest over its microbatches.
  Nothing is assumed about who holds what: a view counts its whole storage once, a copy counts.
* **input bytes held between steps**: the same count at ``BEFORE_DATALOADER``, before the next
  batch is loaded (what the last step left: ``state.batch``, CutMix's last mixed batch).
* on CUDA also **the step's peak**: ``torch.cuda.reset_peak_memory_stats()`` at
  ``BEFORE_DATALOADER``, ``torch.cuda.max_memory_allocated()`` at ``BATCH_END`` (everything the
  step allocated: model, gradients, activations, the batch, CutMix's temporaries).

Next to each measurement it prints what a formula predicts, with B = N·C·H·W·(bytes per element)
the whole batch and b = M·C·H·W·(bytes per element) one microbatch of M samples. One term comes
from Composer itself: ``Trainer._train_microbatch`` keeps ``deepcopy(state.batch)`` of every
microbatch (for the train metrics), and ``deepcopy`` of a tensor view copies the view's whole
storage, so a microbatch that is a view of a batch of B bytes costs another B while it trains.

* CPU (the loader's batch already lies in device memory; Composer's loop keeps it until the next
  batch, and each microbatch is a view of it): without CutMix 2B (the batch, the deep copy);
  ``CutMix(inplace=True)`` 2B (pasted into the batch); ``CutMix()`` and ``CutMix(inplace=False)``
  3B (the loader's batch, the mixed copy, the deep copy of a view of the mixed copy).
* CUDA: without CutMix 2b (one microbatch moved at a time, a fresh tensor of b bytes, and its
  deep copy); with CutMix 2B (the whole batch moved at ``AFTER_DATALOADER``, and the deep copy of
  a microbatch view of it; ``CutMix()`` and ``inplace=True`` paste into the moved batch,
  ``inplace=False`` mixes a copy and drops the moved batch before the loop, so its extra B shows
  only in the peak).

Composer's ``Engine`` registers ``atexit`` to close each Trainer, which keeps every finished
Trainer's ``State`` (and its last batch) alive until the process exits; after each run this script
unregisters that hook (the Trainer is already closed), so one run's batch does not count in the next.

Run it::

    python launch/benchmarks/bench_memory.py                      # CPU: 64x3x224x224 float32, microbatch 8
    python launch/benchmarks/bench_memory.py --device cuda        # a GPU (Trainer device='gpu'), with the peak
    python launch/benchmarks/bench_memory.py --batch 8x3x16x16 --microbatch 2 --json mem.json
"""
from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run from a checkout that is not installed
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from launch.benchmarks.bench_common import (  # noqa: E402
    DEVICES,
    NUM_CLASSES,
    Shape,
    environment,
    md_table,
    parse_shapes,
    shape_str,
)
from launch.benchmarks.bench_common import check_device as common_check_device  # noqa: E402

__all__ = ['VARIANTS', 'check_device', 'input_bytes_alive', 'main', 'measure', 'memory_markdown', 'predicted_bytes']

# Row name -> (with CutMix, its inplace argument); 'without' trains with no algorithm.
VARIANTS: dict[str, tuple[bool, Optional[bool]]] = {
    'without': (False, None), 'CutMix()': (True, None), 'CutMix(inplace=True)': (True, True),
    'CutMix(inplace=False)': (True, False),
}


def check_device(device: str) -> torch.device:
    """``cpu``, or ``cuda`` where CUDA is available (see :func:`bench_common.check_device`)."""
    return common_check_device(device, 'bench_memory')


def input_bytes_alive(device_type: str, sample_shape: Sequence[int], dtype: torch.dtype,
                      exclude: frozenset[int] = frozenset()) -> tuple[int, int]:
    """Bytes and count of the distinct storages of live input-shaped tensors on ``device_type``.

    Every tensor the garbage collector tracks (every tensor a Python object refers to) whose
    trailing dimensions are ``sample_shape`` and whose dtype is ``dtype``; storages whose
    ``data_ptr`` is in ``exclude`` (the model's parameters, what was alive before the run) are left out.
    """
    storages = {ptr: s.nbytes() for ptr, s in _input_storages(device_type, sample_shape, dtype).items()
                if ptr not in exclude}
    return sum(storages.values()), len(storages)


def _input_storages(device_type: str, sample_shape: Sequence[int], dtype: torch.dtype) -> dict[int, Any]:
    """The storages of live input-shaped tensors on ``device_type``, by ``data_ptr``."""
    sample_shape = tuple(sample_shape)
    storages: dict[int, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # isinstance() on deprecated module attributes warns
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.device.type != device_type or obj.dtype != dtype:
                    continue
                if obj.dim() < len(sample_shape) or tuple(obj.shape[-len(sample_shape):]) != sample_shape:
                    continue
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
            except Exception:  # a tensor subclass or wrapper without plain storage: not a batch
                continue
            if ptr:
                storages[ptr] = storage
    return storages


def predicted_bytes(device: str, cutmix: bool, inplace: Optional[bool], batch: int, microbatch: int,
                    sample_bytes: int) -> tuple[int, str]:
    """What the formula says the microbatch loop holds on the device: (bytes, which formula)."""
    whole, micro = batch * sample_bytes, microbatch * sample_bytes
    # Composer's deepcopy of each microbatch copies the storage it views: the batch's, or its own
    if device == 'cpu':
        if not cutmix or inplace is True:
            return 2 * whole, '2B'  # the loader's batch (pasted into with inplace=True), the deep copy
        return 3 * whole, '3B'  # the loader's batch, the mixed copy, the deep copy
    if not cutmix:
        return 2 * micro, '2b'  # one microbatch moved at a time, its deep copy
    return 2 * whole, '2B'  # the whole batch moved at AFTER_DATALOADER (inplace=False: its copy), the deep copy


def _tiny_net(channels: int) -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, NUM_CLASSES))


class _Samples(torch.utils.data.Dataset):
    """Deterministic random samples made per index, so the dataset itself holds no input-shaped tensor."""

    def __init__(self, length: int, sample_shape: Sequence[int], seed: int) -> None:
        self.length, self.sample_shape, self.seed = length, tuple(sample_shape), seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.rand(self.sample_shape, generator=g), int(torch.randint(0, NUM_CLASSES, (), generator=g))


def _train_one(device: str, cutmix: bool, inplace: Optional[bool], shape: Shape, microbatch: int, steps: int,
               warmup: int, seed: int) -> dict[str, Any]:
    """One Trainer run; per measured step: input bytes alive on the device (max over microbatches), CUDA peak."""
    from composer import Callback, Trainer
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader

    from dist_cutmix import CutMix

    n, c, h, w = shape
    sample_shape = (c, h, w)
    cuda = device == 'cuda'
    # Input-shaped tensors alive before the run (a caller's, another test's module constants) are not the run's:
    # left out, and held until it ends so that no new batch can take their addresses.
    before = _input_storages(device, sample_shape, torch.float32)

    class Probe(Callback):
        def __init__(self) -> None:
            self.exclude: frozenset[int] = frozenset()
            self.steps: list[dict[str, Any]] = []
            self._step: dict[str, Any] = {}

        def fit_start(self, state: Any, logger: Any) -> None:
            params = frozenset(p.untyped_storage().data_ptr() for p in state.model.parameters())
            self.exclude = params | frozenset(before)

        def before_dataloader(self, state: Any, logger: Any) -> None:
            between, _ = input_bytes_alive(device, sample_shape, torch.float32, self.exclude)  # the last step's
            self._step = {'input_bytes': 0, 'input_storages': 0, 'microbatches': 0, 'microbatch_bytes': [],
                          'between_steps_bytes': between}
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self._step['start_bytes'] = torch.cuda.memory_allocated()

        def before_forward(self, state: Any, logger: Any) -> None:
            alive, count = input_bytes_alive(device, sample_shape, torch.float32, self.exclude)
            if alive > self._step['input_bytes']:
                self._step['input_bytes'], self._step['input_storages'] = alive, count
            self._step['microbatches'] += 1
            self._step['microbatch_bytes'].append(state.batch_get_item(0).nbytes)

        def batch_end(self, state: Any, logger: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
                self._step['peak_bytes'] = torch.cuda.max_memory_allocated()
            self.steps.append(self._step)

    torch.manual_seed(seed)
    net = _tiny_net(c)
    total = warmup + steps
    loader = DataLoader(_Samples(n * total, sample_shape, seed), batch_size=n, shuffle=False, drop_last=True,
                        pin_memory=cuda)
    probe = Probe()
    algorithms = [CutMix(num_classes=NUM_CLASSES, inplace=inplace, seed=seed)] if cutmix else []
    trainer = Trainer(
        model=ComposerClassifier(net, num_classes=NUM_CLASSES),
        train_dataloader=loader,
        max_duration=f'{total}ba',
        optimizers=torch.optim.SGD(net.parameters(), lr=0.01),
        algorithms=algorithms,
        callbacks=[probe],
        device_train_microbatch_size=microbatch,
        seed=seed,
        device='gpu' if cuda else 'cpu',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()
    atexit.unregister(trainer.engine._close)  # it holds the State, and so the last batch, until exit
    del trainer, algorithms
    before.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {'steps': probe.steps[warmup:]}


def measure(device: str = 'cpu', shape: Shape = (64, 3, 224, 224), microbatch: int = 8, *, steps: int = 2,
            warmup: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """One row per variant (:data:`VARIANTS`): measured input bytes (and CUDA peak) beside the formula's."""
    check_device(device)
    from launch.tools.spawn import answer_cpuinfo_from_constant

    answer_cpuinfo_from_constant()  # Composer's CPU query costs ~1 s a Trainer
    logging.getLogger('dist_cutmix').setLevel(logging.ERROR)  # the metric-wrapping notice, once per Trainer
    n, c, h, w = shape
    if not 1 <= microbatch <= n:
        raise ValueError(f'microbatch must be in 1..{n} (the batch), got {microbatch}')
    sample_bytes = c * h * w * torch.finfo(torch.float32).bits // 8  # the batch is float32
    rows = []
    for name, (cutmix, inplace) in VARIANTS.items():
        run = _train_one(device, cutmix, inplace, shape, microbatch, steps, warmup, seed)
        formula, which = predicted_bytes(device, cutmix, inplace, n, microbatch, sample_bytes)
        row = {
            'variant': name, 'cutmix': cutmix, 'inplace': inplace,
            'device': device, 'shape': list(shape), 'microbatch': microbatch, 'sample_bytes': sample_bytes,
            'batch_bytes': n * sample_bytes, 'microbatch_bytes': microbatch * sample_bytes,
            'input_bytes': max(s['input_bytes'] for s in run['steps']),
            'input_storages': max(s['input_storages'] for s in run['steps']),
            'between_steps_bytes': max(s['between_steps_bytes'] for s in run['steps']),
            'formula': which, 'formula_bytes': formula,
            'microbatches_per_step': [s['microbatches'] for s in run['steps']],
            'steps': run['steps'],
        }
        if device == 'cuda':
            row['peak_bytes'] = max(s['peak_bytes'] for s in run['steps'])
            row['start_bytes'] = max(s['start_bytes'] for s in run['steps'])
        rows.append(row)
    base = rows[0]
    for row in rows:
        row['added_bytes'] = row['input_bytes'] - base['input_bytes']
        row['added_formula_bytes'] = row['formula_bytes'] - base['formula_bytes']
        if device == 'cuda':
            row['peak_added_bytes'] = row['peak_bytes'] - base['peak_bytes']
    return rows


def memory_markdown(rows: Sequence[dict[str, Any]]) -> str:
    first = rows[0]
    cuda = first['device'] == 'cuda'
    n, mb = first['shape'][0], first['microbatch']

    def mb_(x: int) -> str:
        return f'{x / 1e6:.3g}'

    headers = ['variant', 'input bytes on the device in the microbatch loop (MB, measured)', 'formula',
               'formula (MB)', 'added by CutMix (MB, measured)', 'added (MB, formula)',
               'held between steps (MB, measured)']
    if cuda:
        headers += ['peak allocated per step (MB)', 'peak − without (MB)']
    table_rows = []
    for r in rows:
        cells = [r['variant'], mb_(r['input_bytes']), r['formula'], mb_(r['formula_bytes']), mb_(r['added_bytes']),
                 mb_(r['added_formula_bytes']), mb_(r['between_steps_bytes'])]
        if cuda:
            cells += [mb_(r['peak_bytes']), mb_(r['peak_added_bytes'])]
        table_rows.append(cells)
    device = 'a CUDA GPU (Trainer device=\'gpu\')' if cuda else "the CPU (Trainer device='cpu')"
    return '\n\n'.join([
        f"### Device memory with microbatching ({first['device']})",
        f"Batch {shape_str(first['shape'])} float32: B = {first['batch_bytes']:,} bytes "
        f"({mb_(first['batch_bytes'])} MB); microbatch of {mb}: b = {first['microbatch_bytes']:,} bytes "
        f"({mb_(first['microbatch_bytes'])} MB), {n // mb + (n % mb > 0)} microbatches a step; on {device}. "
        'Measured: the distinct storages of live input-shaped tensors on the device at each BEFORE_FORWARD, '
        'the largest over the step (B: the whole batch, b: one microbatch; Composer deep-copies each microbatch, '
        'and a deep copy of a view copies its whole storage); held between steps: the same at BEFORE_DATALOADER'
        + ('; peak: torch.cuda.max_memory_allocated() over the step.' if cuda else '.'),
        md_table(headers, table_rows),
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', choices=DEVICES, default='cpu',
                   help="cpu (Trainer device='cpu') or cuda (device='gpu'; also the step's CUDA peak)")
    p.add_argument('--batch', type=parse_shapes, default=None, help='NxCxHxW (default 64x3x224x224)')
    p.add_argument('--microbatch', type=int, default=8, help='device_train_microbatch_size (default 8)')
    p.add_argument('--steps', type=int, default=2, help='measured steps per variant, after one warm-up step')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', type=Path, default=None, help='write every measurement here')
    return p


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch is not None and len(args.batch) != 1:
        p.error(f'--batch is one shape, got {len(args.batch)}')
    args.batch = tuple(args.batch[0]) if args.batch else (64, 3, 224, 224)
    if not 1 <= args.microbatch <= args.batch[0]:
        p.error(f'--microbatch must be in 1..{args.batch[0]} (the batch), got {args.microbatch}')
    if args.steps < 1:
        p.error(f'--steps must be >= 1, got {args.steps}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Measure, print markdown, write JSON; return the report."""
    args = _parse_args(argv)
    check_device(args.device)  # before anything runs: --device cuda needs CUDA
    rows = measure(args.device, args.batch, args.microbatch, steps=args.steps, seed=args.seed)
    report = {'environment': environment(torch.get_num_threads(), args.device),
              'args': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, 'rows': rows}
    print(memory_markdown(rows), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == '__main__':
    main()

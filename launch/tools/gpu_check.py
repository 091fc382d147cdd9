"""The prepared GPU check: everything of ours that needs a GPU and no Composer, in one command.

    PYTHONPATH=. python launch/tools/gpu_check.py OUTDIR            # estimated 3-5 minutes on one GPU (not yet timed)
    PYTHONPATH=. python launch/tools/gpu_check.py OUTDIR --quick    # a smoke run of the same steps

Made for a machine with one GPU, Python, torch, torchmetrics, timm, torchvision, pytest, pytest-xdist
and hypothesis, no network and no Composer, the project passed on ``PYTHONPATH`` (nothing installed).
In order, each step recorded whatever happens to the others:

1. ``environment``: versions, the GPU, whether Composer is importable (it need not be).
2. ``imports``: the Composer-free core and the benchmark modules import without Composer.
3. ``cpu reference``: the op benchmark and the training step timing at a tiny size on the CPU, so the
   code of steps 5 and 6 is exercised before any GPU time is spent (and on a machine without one).
4. ``cuda``: CUDA is available; without it the check stops here, exit status 2, naming that reason.
5. ``cuda tests``: pytest on every ``tests/cuda/test_*.py`` (op equal to the CPU bit for bit in float32,
   bfloat16, uint8 and channels_last; per-sample; MixUp and the switch; the host-sync counts); a test
   that needs Composer or two GPUs skips with its reason.
6. ``op benchmark``: ``launch.benchmarks.bench_op.run_op(device='cuda')``: ours against timm's and torchvision's
   CutMix (Composer's too where installed) and the copy floor, batch and per-sample boxes.
7. ``train step``: one optimizer step of a small model (timm's resnet18, bf16 autocast), plain torch,
   with no mixing, with ours (batch and per-sample boxes), timm's ``Mixup`` and torchvision's ``CutMix``,
   round-robin, timed by CUDA events; the step-time ratios to no mixing.

Writes ``OUTDIR/gpu_check.json`` (every step's status, reason, seconds and results) and
``OUTDIR/gpu_check.md`` (the summary to paste into docs/benchmarks.md), also when a step fails.
Exit status: 0 every step passed, 2 only CUDA was missing, 1 anything else failed.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # ``python launch/tools/gpu_check.py`` puts launch/tools/ first, not the project
    sys.path.insert(0, str(ROOT))

__all__ = ['CUDA_TEST_GLOB', 'build_parser', 'main', 'time_train_steps']

CUDA_TEST_GLOB = 'tests/cuda/test_*.py'
NO_CUDA = 'needs CUDA'
CORE_MODULES = ('dist_cutmix.functional', 'dist_cutmix.randomness', 'dist_cutmix.distributed', 'dist_cutmix.mixer',
                'dist_cutmix.metrics', 'dist_cutmix.loss', 'dist_cutmix.loop', 'launch.benchmarks.bench_common',
                'launch.benchmarks.bench_op', 'launch.benchmarks.bench_loss',
                'tests.helpers.cuda', 'tests.cuda.test_cutmix_on_cuda')
STEP_VARIANTS = ('no mixing', 'ours', 'ours per-sample', 'timm Mixup', 'torchvision CutMix')
NUM_CLASSES = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('outdir', type=Path, help='folder for gpu_check.json and gpu_check.md (made if missing)')
    p.add_argument('--quick', action='store_true', help='small sizes and few iterations: a smoke run of every step')
    p.add_argument('--iters', type=int, default=None, help='op calls and train steps timed (default 50, quick 3)')
    p.add_argument('--op-shapes', default=None, help='op batch shapes, e.g. 256x3x32x32,64x3x224x224')
    p.add_argument('--step-batch', type=int, default=None, help='train step batch size (default 64, quick 8)')
    p.add_argument('--tests-timeout', type=float, default=300.0, help='seconds allowed to the CUDA tests')
    return p


class Check:
    """The steps' record: ``run`` one step, keep its status, reason, seconds and result."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            result = fn()
            self.steps[name] = {'status': 'ok', 'result': result}
        except Exception as e:  # noqa: BLE001 - a failed step is recorded; the next steps still run
            result = None
            self.steps[name] = {'status': 'failed', 'reason': f'{type(e).__name__}: {e}',
                                'traceback': traceback.format_exc()}
        self.steps[name]['seconds'] = round(time.perf_counter() - t0, 2)
        return result

    def not_run(self, name: str, reason: str) -> None:
        self.steps[name] = {'status': 'not run', 'reason': reason, 'seconds': 0.0}

    def failed(self) -> list[str]:
        return [n for n, s in self.steps.items() if s['status'] == 'failed']


# ----------------------------------------------------------------------------- steps


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {'python': platform.python_version(), 'torch': torch.__version__,
                           'torch_cuda': torch.version.cuda, 'cpus': os.cpu_count()}
    for name, dist in (('torchmetrics', 'torchmetrics'), ('timm', 'timm'), ('torchvision', 'torchvision'),
                       ('pytest', 'pytest'), ('xdist', 'pytest-xdist'), ('hypothesis', 'hypothesis')):
        try:  # the installed version, without the import's cost
            env[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[name] = None
    try:  # importable, not merely installed: the check must hold where it is not
        env['composer'] = importlib.import_module('composer').__version__
    except ImportError:
        env['composer'] = None
    env['cuda_available'] = torch.cuda.is_available()
    if env['cuda_available']:
        env['gpu'] = torch.cuda.get_device_name()
        env['gpu_count'] = torch.cuda.device_count()
    return env


def import_core() -> dict[str, Any]:
    for name in CORE_MODULES:
        importlib.import_module(name)
    return {'modules': list(CORE_MODULES), 'composer_imported': 'composer' in sys.modules}


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    from launch.benchmarks.bench_common import parse_shapes as parse

    return parse(text)


def run_op_benchmark(shapes: Sequence[tuple[int, int, int, int]], iters: int, device: str,
                     layouts: Sequence[str]) -> dict[str, Any]:
    from launch.benchmarks.bench_op import op_markdown, run_op

    rows = run_op(shapes, iters, device=device, layouts=layouts)
    for r in rows:  # the raw samples are large and say little in a summary
        r.pop('samples_s', None)
        if r.get('per_sample'):
            r['per_sample'].pop('samples_s', None)
    return {'rows': rows, 'markdown': op_markdown(rows)}


def run_loss_benchmark(device: str, iters: int, **sizes: Any) -> dict[str, Any]:
    """The loss benchmark's rows (ours without dense targets against dense soft targets) on ``device``."""
    from launch.benchmarks.bench_loss import loss_markdown, run_loss

    rows = run_loss(device, iters=iters, **sizes)
    for r in rows:
        r.pop('samples_ms', None)
    return {'rows': rows, 'markdown': loss_markdown(rows)}


def _model(kind: str, device: Any) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == 'resnet18':
        import timm

        return timm.create_model('resnet18', num_classes=NUM_CLASSES, pretrained=False).to(device)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, NUM_CLASSES)).to(device)


def time_train_steps(batch: int, size: int, iters: int, device: str, model_kind: str,
                     warmup: int = 3) -> dict[str, Any]:
    """Median seconds of one optimizer step per variant (``STEP_VARIANTS``), round-robin, and ratios to no mixing.

    Every variant trains the same model on the same device batch, with soft targets and a soft cross-entropy
    (bf16 autocast on CUDA). Ours mixes out of place with :func:`dist_cutmix.mixer.mix_batch_local`, a fresh
    draw each step; timm's ``Mixup(mixup_alpha=0, cutmix_alpha=1)`` and torchvision's ``v2.CutMix`` mix as
    they do (timm draws from numpy's global RNG, seeded here).
    """
    import numpy as np
    import torch
    import torch.nn.functional as TF
    from timm.data.mixup import Mixup
    from torchvision.transforms import v2

    from dist_cutmix.mixer import mix_batch_local
    from launch.benchmarks.bench_common import median, paired_ratio, time_round_robin

    dev = torch.device(device)
    cuda = dev.type == 'cuda'
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(dev)
    one_hot = TF.one_hot(y, NUM_CLASSES).float()
    model = _model(model_kind, dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    np.random.seed(0)
    timm_mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=NUM_CLASSES)
    tv_mix = v2.CutMix(num_classes=NUM_CLASSES)

    def step(mixed: Any, target: Any) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(mixed)
        loss = torch.sum(-target * TF.log_softmax(out.float(), dim=1), dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ours(per_sample: bool) -> Callable[[int], None]:
        def run(i: int) -> None:
            r = mix_batch_local(x, y, seed=0, batch=i, num_classes=NUM_CLASSES, per_sample=per_sample)
            step(r.input, r.target)
        return run

    entries = {
        'no mixing': lambda i: step(x, one_hot),
        'ours': ours(False),
        'ours per-sample': ours(True),
        'timm Mixup': lambda i: step(*timm_mix(x.clone(), y)),
        'torchvision CutMix': lambda i: step(*tv_mix(x, y)),
    }
    samples, _ = time_round_robin(entries, iters, warmup, cuda=cuda)
    base = samples['no mixing']
    return {
        'batch': batch, 'size': size, 'model': model_kind, 'device': dev.type, 'iters': iters,
        'median_ms': {k: median(v) * 1e3 for k, v in samples.items()},
        'ratio_to_no_mixing': {k: paired_ratio(v, base) for k, v in samples.items() if k != 'no mixing'},
    }


def run_cuda_tests(outdir: Path, timeout: float) -> dict[str, Any]:
    """pytest on every ``CUDA_TEST_GLOB`` file in a fresh interpreter; counts read from its JUnit XML."""
    files = sorted(glob.glob(str(ROOT / CUDA_TEST_GLOB)))
    if not files:
        raise RuntimeError(f'no test files match {CUDA_TEST_GLOB} under {ROOT}')
    xml = outdir / 'cuda_tests.xml'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    cmd = [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', f'--junitxml={xml}', *files]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    (outdir / 'cuda_tests.log').write_text(proc.stdout + proc.stderr)
    counts = {'tests': 0, 'failures': 0, 'errors': 0, 'skipped': 0}
    skipped: dict[str, int] = {}
    failed: list[str] = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter('testcase'):
            counts['tests'] += 1
            name = f"{case.get('classname')}::{case.get('name')}"
            for tag in ('failure', 'error', 'skipped'):
                el = case.find(tag)
                if el is not None:
                    counts['failures' if tag == 'failure' else tag + ('s' if tag == 'error' else '')] += 1
                    if tag == 'skipped':
                        reason = el.get('message', '')
                        skipped[reason] = skipped.get(reason, 0) + 1
                    else:
                        failed.append(name)
    counts['passed'] = counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']
    result = {'files': [os.path.relpath(f, ROOT) for f in files], 'exit_code': proc.returncode, **counts,
              'skipped_by_reason': skipped, 'failed': failed, 'tail': (proc.stdout + proc.stderr)[-3000:]}
    if proc.returncode != 0:
        raise RuntimeError(f'pytest exited {proc.returncode}: {counts}, failed {failed[:10]}; see cuda_tests.log')
    return result


# ----------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = ['# GPU check', '', f"Verdict: **{report['verdict']}**", '']
    env = report['steps'].get('environment', {}).get('result') or {}
    if env:
        lines += ['Environment: ' + ', '.join(f'{k} {v}' for k, v in env.items()), '']
    lines += ['| step | status | seconds | reason |', '|---|---|---|---|']
    for name, s in report['steps'].items():
        reason = (s.get('reason') or '').split('\n')[0]
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {reason} |")
    tests = report['steps'].get('cuda tests', {}).get('result')
    if tests:
        lines += ['', '## CUDA tests', '',
                  f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped, in {', '.join(tests['files'])}"]
        lines += [f'- skipped {n}: {reason}' for reason, n in tests['skipped_by_reason'].items()]
    for name in ('op benchmark', 'cpu reference'):
        res = report['steps'].get(name, {}).get('result')
        if res and res.get('op', res).get('markdown'):
            lines += ['', f'## {name}: the op', '', res.get('op', res)['markdown']]
    for name, res in (('loss benchmark', report['steps'].get('loss benchmark', {}).get('result')),
                      ('cpu reference', (report['steps'].get('cpu reference', {}).get('result') or {}).get('loss'))):
        if res and res.get('markdown'):
            lines += ['', f'## {name}: the loss without dense targets, forward and backward', '', res['markdown']]
    for name, res in (('train step', report['steps'].get('train step', {}).get('result')),
                      ('cpu reference', (report['steps'].get('cpu reference', {}).get('result') or {}).get('step'))):
        if res:
            from launch.benchmarks.bench_common import md_table

            lines += ['', f"## {name}: one optimizer step, {res['model']}, batch {res['batch']}x3x{res['size']}x"
                      f"{res['size']}, {res['device']}, median of {res['iters']}", '',
                      md_table(['variant', 'ms', 'ratio to no mixing'],
                               [[k, v, res['ratio_to_no_mixing'].get(k, 1.0)] for k, v in res['median_ms'].items()])]
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    outdir: Path = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    iters = args.iters or (3 if args.quick else 50)
    step_batch = args.step_batch or (8 if args.quick else 64)
    shapes_text = args.op_shapes or ('8x3x32x32' if args.quick else '256x3x32x32,64x3x224x224')
    t0 = time.perf_counter()
    check = Check()
    env = check.run('environment', environment)
    check.run('imports', import_core)

    def cpu_reference() -> dict[str, Any]:
        return {'op': run_op_benchmark(parse_shapes('8x3x16x16'), 2, 'cpu', ('float32',)),
                'step': time_train_steps(4, 16, 2, 'cpu', 'tiny', warmup=1),
                'loss': run_loss_benchmark('cpu', 2, n=8, classes=(5,))}

    check.run('cpu reference', cpu_reference)
    cuda = bool(env and env.get('cuda_available'))
    rest = ('cuda tests', 'op benchmark', 'loss benchmark', 'train step')
    if not cuda:
        import torch

        reason = (f'{NO_CUDA}: CUDA is not available here (torch.cuda.is_available() is False; torch '
                  f'{torch.__version__}, built for CUDA {torch.version.cuda})')
        check.steps['cuda'] = {'status': 'failed', 'reason': reason, 'seconds': 0.0}
        for name in rest:
            check.not_run(name, NO_CUDA)
    else:
        check.steps['cuda'] = {'status': 'ok', 'seconds': 0.0, 'result': env.get('gpu')}
        check.run('cuda tests', lambda: run_cuda_tests(outdir, args.tests_timeout))
        check.run('op benchmark', lambda: run_op_benchmark(parse_shapes(shapes_text), iters, 'cuda',
                                                           ('float32', 'bfloat16', 'channels_last')))
        loss_sizes = dict(n=8, classes=(5,)) if args.quick else {}
        check.run('loss benchmark', lambda: run_loss_benchmark('cuda', iters, **loss_sizes))
        check.run('train step', lambda: time_train_steps(step_batch, 32 if args.quick else 224, iters, 'cuda',
                                                         'tiny' if args.quick else 'resnet18'))
    failed = check.failed()
    if not failed:
        verdict, status = 'every step passed', 0
    elif failed == ['cuda']:
        verdict, status = f"stopped for want of CUDA only ({check.steps['cuda']['reason']})", 2
    else:
        verdict, status = f"failed: {', '.join(failed)}", 1
    report = {'verdict': verdict, 'exit_status': status, 'argv': list(argv if argv is not None else sys.argv[1:]),
              'seconds': round(time.perf_counter() - t0, 1), 'steps': check.steps}
    (outdir / 'gpu_check.json').write_text(json.dumps(report, indent=1, default=str))
    (outdir / 'gpu_check.md').write_text(markdown(report))
    print(markdown(report))
    print(f'gpu_check: {verdict}; wrote {outdir / "gpu_check.json"} and {outdir / "gpu_check.md"}', file=sys.stderr)
    for name in failed:
        if check.steps[name].get('traceback'):
            print(f'--- {name}\n{check.steps[name]["traceback"]}', file=sys.stderr)
    return status


if __name__ == '__main__':
    sys.exit(main())

"""``dist_cutmix.timm.Mixup`` against the real timm ``Mixup`` it replaces, and on its own.

With the draws pinned (timm runs under a fixed numpy seed; its λ, method and box, per batch, pair or sample, are
read off and handed to our door in place of our own draw, partners ``i <-> N - 1 - i`` as timm's ``flip``), the
door gives timm's pixels bit for bit and timm's targets: exactly up to float32 rounding when λ lies on the
``2**-10`` label grid (32x32 images, λ drawn on the grid), within the grid's ``2**-11`` otherwise. Every mode
(batch, pair, elem) and every argument: CutMix, MixUp, switching, ``prob``, smoothing, ``cutmix_minmax``,
``correct_lam`` both ways, ``multi_label``, ``mixup_enabled = False``. The tests that need timm skip, with the
reason, where it is not installed; the others (ranks, resume, odd batches, refusals, the door without timm) run
everywhere.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dist_cutmix.mixer
from dist_cutmix import MixSpec
from dist_cutmix.draw import MixParams, PerSampleMixParams
from dist_cutmix.timm import FastCollateMixup, Mixup
from tests.helpers.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[2]
HAS_TIMM = importlib.util.find_spec('timm') is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason='compares with timm.data.Mixup: timm is not installed')
K = 7
ONE_HOT = torch.nn.functional.one_hot

# timm's Mixup configurations (besides mode), each a case of the parity test
CASES = {
    'cutmix': dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    'mixup': dict(),  # timm's defaults: MixUp at alpha 1, label smoothing 0.1
    'switch': dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.4, prob=0.8),
    'minmax': dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8), label_smoothing=0.0),
    'cutmix_uncorrected': dict(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False),
    'switch_uncorrected': dict(mixup_alpha=0.8, cutmix_alpha=0.5, correct_lam=False, label_smoothing=0.2),
    'multi_label': dict(mixup_alpha=0.8, cutmix_alpha=1.0, multi_label=True),
}


def _spec(args: dict, mode: str) -> MixSpec:
    """The MixSpec the door must hand the engine for timm's arguments (what our draw is told to draw)."""
    a = {**dict(mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, correct_lam=True,
                label_smoothing=0.1, multi_label=False), **args}
    return MixSpec(pairs=mode == 'pair', box_sides='exact', **a)  # timm's rand_bbox: int(H·√(1−λ)) rows, odd too


def _batch(n: int, h: int, w: int, seed: int, multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g) * 4 - 1
    y = torch.randint(0, 2, (n, K), generator=g) if multi_label else torch.randint(0, K, (n,), generator=g)
    return x, y


# ---------------------------------------------------------------------------------------------- timm's draws


class _TimmDraws:
    """Runs timm's Mixup and records what it drew: the per-batch or per-element (λ, use_cutmix) and every box."""

    def __init__(self, mixup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        import timm.data.mixup as timm_mixup

        self.draws: list[tuple[Any, Any]] = []
        self.boxes: list[tuple[tuple[int, int, int, int], float]] = []
        self.mixup = mixup
        per_batch, per_elem, bbox = mixup._params_per_batch, mixup._params_per_elem, timm_mixup.cutmix_bbox_and_lam

        def params_per_batch() -> tuple[float, bool]:
            lam, use_cutmix = per_batch()
            self.draws.append((lam, use_cutmix))
            return lam, use_cutmix

        def params_per_elem(batch_size: int) -> tuple[np.ndarray, np.ndarray]:
            lam, use_cutmix = per_elem(batch_size)
            self.draws.append((lam.copy(), use_cutmix.copy()))  # timm writes the corrected λ into lam later
            return lam, use_cutmix

        def cutmix_bbox_and_lam(*args: Any, **kwargs: Any) -> Any:
            (yl, yh, xl, xh), lam = bbox(*args, **kwargs)
            self.boxes.append(((int(yl), int(yh), int(xl), int(xh)), float(lam)))
            return (yl, yh, xl, xh), lam

        mixup._params_per_batch, mixup._params_per_elem = params_per_batch, params_per_elem
        monkeypatch.setattr(timm_mixup, 'cutmix_bbox_and_lam', cutmix_bbox_and_lam)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.draws.clear()
        self.boxes.clear()
        np.random.seed(seed)
        return self.mixup(x, y)

    def params(self, mode: str, n: int, h: int, w: int) -> MixParams | PerSampleMixParams:
        """What timm drew, as our engine's parameters: partners flip(0), each draw's box, label λ and weight."""
        boxes = iter(self.boxes)
        flip = torch.arange(n - 1, -1, -1)

        def one(lam: float, use_cutmix: bool) -> tuple[tuple[int, int, int, int], float, float]:
            if lam == 1:
                return (0, 0, 0, 0), 1.0, 0.0
            if use_cutmix:
                box, label_lam = next(boxes)  # timm's box, and its λ: the box's share, or the drawn one
                return box, label_lam, 1.0
            return (0, h, 0, w), float(lam), 1.0 - float(lam)  # MixUp: the partner at 1 - λ over the whole image

        if mode == 'batch':
            ((lam, use_cutmix),) = self.draws
            box, label_lam, weight = one(lam, use_cutmix)
            return MixParams(box=box, lam=label_lam, indices=flip, weight=weight)
        ((lams, cuts),) = self.draws
        draws = [one(float(lam), bool(cut)) for lam, cut in zip(lams, cuts, strict=True)]
        if mode == 'pair':  # timm: pair (i, N - 1 - i) shares draw i
            draws = draws + draws[::-1]
        assert next(boxes, None) is None  # every box timm drew was used
        return PerSampleMixParams(boxes=torch.tensor([d[0] for d in draws], dtype=torch.long),
                                 lam=torch.tensor([d[1] for d in draws], dtype=torch.float64), indices=flip,
                                 weights=torch.tensor([d[2] for d in draws], dtype=torch.float64))


def _grid_beta(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm's λ draws rounded to the 2**-10 label grid (numpy's global Beta, which timm calls)."""
    beta = np.random.beta
    monkeypatch.setattr(np.random, 'beta', lambda a, b, size=None: np.round(beta(a, b, size) * 1024) / 1024)


@needs_timm
@pytest.mark.parametrize('grid', [True, False], ids=['on_grid', 'off_grid'])
@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('case', list(CASES))
def test_pinned_draws_give_timm_s_pixels_and_targets(monkeypatch, case: str, mode: str, grid: bool) -> None:
    from timm.data import Mixup as TimmMixup

    args = CASES[case]
    n, (h, w) = 6, ((32, 32) if grid else (10, 13))  # on a 32x32 image every box's share is on the 2**-10 grid
    if grid:
        _grid_beta(monkeypatch)
    timm_fn = _TimmDraws(TimmMixup(**args, mode=mode, num_classes=K), monkeypatch)
    ours = Mixup(**args, mode=mode, num_classes=K, seed=0)
    expected_spec = _spec(args, mode)
    pinned: dict[str, Any] = {}

    def pinned_draw(spec, n_, h_, w_, *, per_sample=False, exclude_self=True, generator):
        # the door told our draw what timm was told; it returns what timm drew
        assert spec == (expected_spec if pinned['enabled'] else dataclasses.replace(expected_spec, prob=0.0))
        assert (n_, h_, w_, per_sample) == (n, h, w, mode != 'batch')
        return pinned['params']

    monkeypatch.setattr(dist_cutmix.mixer, 'sample_mix', pinned_draw)
    atol = 1e-6 if grid else 2**-11 + 1e-6
    seen = set()
    for b in range(8):
        pinned['enabled'] = b < 6
        if b == 6:  # timm's train.py at --mixup-off-epoch
            timm_fn.mixup.mixup_enabled = ours.mixup_enabled = False
        x, y = _batch(n, h, w, seed=b, multi_label=args.get('multi_label', False))
        want_x, want_y = timm_fn(x.clone(), y.clone(), seed=b)
        pinned['params'] = params = timm_fn.params(mode, n, h, w)
        mine = x.clone()
        got_x, got_y = ours(mine, y.clone())
        assert got_x is mine  # in place, as timm
        assert torch.equal(got_x, want_x), (b, (got_x - want_x).abs().max())
        assert got_y.dtype == want_y.dtype == torch.float32 and got_y.device == want_y.device
        torch.testing.assert_close(got_y, want_y, rtol=0, atol=atol)
        lam = torch.as_tensor(params.lam).reshape(-1)
        weight = torch.as_tensor(params.weights if mode != 'batch' else [params.weight]).reshape(-1)
        seen |= {'unmixed' if float(v) == 1 else 'cutmix' if float(u) == 1 else 'mixup' for v, u in
                 zip(lam, weight, strict=True)}
        if b >= 6:
            assert torch.equal(got_x, x) and seen  # nothing mixed, targets smoothed as timm smooths them
    methods = {'cutmix'} if args.get('mixup_alpha') == 0 else {'mixup', 'cutmix'} if args.get('cutmix_alpha') \
        else {'mixup'}
    assert methods <= seen  # the case drew what it is named after


@needs_timm
def test_off_grid_targets_differ_from_timm_s_by_the_label_grid_only(monkeypatch) -> None:
    # the tolerance above is needed, and enough: a MixUp λ off the grid moves the label by up to 2**-11
    from timm.data import Mixup as TimmMixup

    timm_fn = _TimmDraws(TimmMixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=K), monkeypatch)
    ours = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=K, seed=0)
    pinned: dict[str, Any] = {}
    monkeypatch.setattr(dist_cutmix.mixer, 'sample_mix', lambda *a, **k: pinned['params'])
    worst = 0.0
    for b in range(6):
        x, y = _batch(6, 10, 13, seed=b)
        _, want_y = timm_fn(x.clone(), y.clone(), seed=b)
        pinned['params'] = timm_fn.params('batch', 6, 10, 13)
        worst = max(worst, float((ours(x.clone(), y)[1] - want_y).abs().max()))
    assert 0 < worst <= 2**-11 + 1e-7


@needs_timm
def test_the_signature_and_attributes_are_timm_s() -> None:
    from timm.data import Mixup as TimmMixup

    theirs = list(inspect.signature(TimmMixup.__init__).parameters.values())
    mine = list(inspect.signature(Mixup.__init__).parameters.values())
    assert [(p.name, p.default, p.kind) for p in mine[:len(theirs)]] == [(p.name, p.default, p.kind) for p in theirs]
    extra = mine[len(theirs):]
    assert [p.name for p in extra] == ['pool', 'seed', 'group', 'inplace']
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    for args in ({}, dict(cutmix_minmax=[0.3, 0.7], prob=0.5, mode='elem', correct_lam=False, multi_label=True),
                 dict(mixup_alpha=0.2, cutmix_alpha=0.5, switch_prob=0.3, label_smoothing=0.0, num_classes=3)):
        timm_fn, ours = TimmMixup(**args), Mixup(**args)
        for name, value in vars(timm_fn).items():  # every attribute timm keeps, by its name and value
            mine_value = getattr(ours, name)
            assert (tuple(mine_value) if name == 'cutmix_minmax' and value is not None else mine_value) == \
                (tuple(value) if name == 'cutmix_minmax' and value is not None else value), name


@needs_timm
def test_timm_asserts_an_even_batch_where_ours_takes_any() -> None:
    from timm.data import Mixup as TimmMixup

    with pytest.raises(AssertionError, match='even'):
        TimmMixup(num_classes=K)(*_batch(5, 8, 8, seed=0))
    assert Mixup(num_classes=K, seed=0)(*_batch(5, 8, 8, seed=0))[1].shape == (5, K)


@needs_timm
def test_multi_label_refuses_index_targets_as_timm_does() -> None:
    from timm.data import Mixup as TimmMixup

    x, y = _batch(4, 8, 8, seed=0)
    with pytest.raises(ValueError, match='Multi-label mixup expects dense targets'):
        TimmMixup(multi_label=True, num_classes=K)(x.clone(), y)
    with pytest.raises(ValueError, match=r'multi_label=True mixes multi-hot targets .*pass multi_label=False'):
        Mixup(multi_label=True, num_classes=K, seed=0)(x.clone(), y)


# ---------------------------------------------------------------------------------------------- on its own


@pytest.mark.parametrize('pool', ['local', 'global'])
@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('n', [1, 3, 5])
def test_odd_batches_mix_and_a_pair_leaves_exactly_one_sample_alone(n: int, mode: str, pool: str) -> None:
    mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=K, pool=pool, seed=1)
    for b in range(3):
        x, y = _batch(n, 8, 8, seed=b)
        out_x, out_y = mixup_fn(x.clone(), y)
        assert out_x.shape == x.shape and out_y.shape == (n, K)
        torch.testing.assert_close(out_y.sum(dim=1), torch.ones(n))
        partners = mixup_fn.mixer.last.partner_index
        if mode == 'pair':
            alone = partners == torch.arange(n)
            assert torch.equal(partners[partners], torch.arange(n)) and int(alone.sum()) == 1
            assert torch.equal(out_x[alone], x[alone])  # the odd one out: its own pixels and smoothed label
            torch.testing.assert_close(out_y[alone], ONE_HOT(y[alone], K) * 0.9 + 0.1 / K)
        elif n > 1:
            assert not bool((partners == torch.arange(n)).any())  # everyone has a partner, none itself
    assert mixup_fn.batch == 3


def test_inplace_false_leaves_the_caller_s_batch_alone_and_mixes_the_same() -> None:
    x, y = _batch(6, 8, 8, seed=0)
    keep = x.clone()
    for mode in ('batch', 'pair', 'elem'):
        copy_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=K, seed=3, inplace=False)
        into_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=K, seed=3)
        for _ in range(3):
            got_x, got_y = copy_fn(x, y)
            assert torch.equal(x, keep) and got_x is not x
            mine = x.clone()
            want_x, want_y = into_fn(mine, y)
            assert want_x is mine and torch.equal(got_x, want_x) and torch.equal(got_y, want_y)


@needs_timm
def test_target_dtype_and_device_are_timm_s() -> None:
    # timm: float32 targets; per sample or pair its λ is a tensor of x's dtype, so float64 images give float64
    from timm.data import Mixup as TimmMixup

    y_multi = torch.randint(0, 2, (4, K), dtype=torch.int32)
    for mode, x_dtype, y in [('batch', torch.float64, torch.arange(4)), ('elem', torch.float64, torch.arange(4)),
                             ('pair', torch.bfloat16, torch.arange(4)), ('batch', torch.float32, y_multi),
                             ('elem', torch.float16, y_multi.double()), ('pair', torch.float64, y_multi)]:
        x = torch.rand(4, 3, 8, 8).to(x_dtype)
        args = dict(mode=mode, num_classes=K, multi_label=y.ndim == 2)
        _, want = TimmMixup(**args)(x.clone(), y)
        out_x, got = Mixup(**args, seed=0)(x, y)
        assert (got.dtype, got.device, out_x.dtype) == (want.dtype, want.device, x_dtype), (mode, x_dtype, y.dtype)


def test_mixup_enabled_false_keeps_the_smoothing_and_counts_the_batch() -> None:
    mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=K, seed=0)
    mixup_fn.mixup_enabled = False
    x, y = _batch(4, 8, 8, seed=0)
    out_x, out_y = mixup_fn(x.clone(), y)
    assert torch.equal(out_x, x) and mixup_fn.batch == 1 and not mixup_fn.mixer.enabled
    torch.testing.assert_close(out_y, ONE_HOT(y, K) * 0.9 + 0.1 / K)
    mixup_fn.mixup_enabled = True
    assert not torch.equal(mixup_fn(x.clone(), y)[0], x)


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_a_stopped_and_resumed_loop_mixes_bit_for_bit_as_the_uninterrupted_one(tmp_path, mode: str) -> None:
    args = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=K, pool='global')
    data = [_batch(5, 8, 8, seed=b) for b in range(6)]

    def run(fn: Mixup, batches: list) -> list:
        out = []
        for b, (x, y) in batches:
            fn.mixup_enabled = b < 4  # as train.py does from --mixup-off-epoch on
            out.append(fn(x.clone(), y))
        return out

    straight = Mixup(**args)  # seed=None: drawn at the first batch, kept in the state
    want = run(straight, list(enumerate(data)))
    first = Mixup(**args, seed=straight.mixer.seed)
    got = run(first, list(enumerate(data[:3])))
    torch.save(first.state_dict(), tmp_path / 'mixup.pt')
    resumed = Mixup(**args)
    resumed.load_state_dict(torch.load(tmp_path / 'mixup.pt', weights_only=True))  # the documented line
    got += run(resumed, list(enumerate(data))[3:])
    # timm's train.py, with a fixed seed and its checkpoint at an epoch's end: the batch count is all the state
    by_count = Mixup(**args, seed=straight.mixer.seed)
    by_count.batch = 3
    counted = run(by_count, list(enumerate(data))[3:])
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(gx, wx) and torch.equal(gy, wy)
    for (gx, gy), (wx, wy) in zip(counted, want[3:], strict=True):
        assert torch.equal(gx, wx) and torch.equal(gy, wy)
    assert resumed.batch == by_count.batch == 6
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(want[:3], want[3:], strict=True))  # draws differ by batch
    with pytest.raises(ValueError, match='differs in spec='):
        Mixup(**{**args, 'correct_lam': False}).load_state_dict(straight.state_dict())


def test_every_refusal_names_what_to_use() -> None:
    with pytest.raises(ValueError, match=r"mode is timm's: one of \('batch', 'pair', 'elem'\), got mode='global'; "
                                         r"the pool across ranks is pool='global'"):
        Mixup(mode='global')
    with pytest.raises(ValueError, match=r"mode is timm's: one of .* got mode='element'$"):
        Mixup(mode='element')
    with pytest.raises(ValueError, match=r"pool must be one of \('local', 'global', 'node'\), got pool='all'"):
        Mixup(pool='all')
    with pytest.raises(ValueError, match=r"group is only used with pool='global', got pool='local'"):
        Mixup(group=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r'mixup_alpha=0.0, cutmix_alpha=0.0 .*give mixup_alpha > 0, cutmix_alpha > 0 '
                                         r'or cutmix_minmax; for label smoothing alone, smooth in the loss'):
        Mixup(mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match=r'prob must be a number in \[0, 1\], got prob=1.5'):
        Mixup(prob=1.5)
    with pytest.raises(ValueError, match=r'cutmix_minmax must be \(lo, hi\) with 0 <= lo < hi <= 1'):
        Mixup(cutmix_minmax=(0.8, 0.2))
    with pytest.raises(TypeError, match=r"correct_lam must be True or False, got correct_lam='no'"):
        Mixup(correct_lam='no')  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r'num_classes must be a positive int or None, got num_classes=0'):
        Mixup(num_classes=0)
    mixup_fn = Mixup(num_classes=K)
    with pytest.raises(AttributeError, match=r'Mixup.mixup_alpha is fixed .* new Mixup\(\.\.\., mixup_alpha=0.5\)'):
        mixup_fn.mixup_alpha = 0.5
    with pytest.raises(AttributeError, match=r"Mixup.mode is fixed .*Mixup\(\.\.\., mode='elem'\)"):
        mixup_fn.mode = 'elem'
    with pytest.raises(ValueError, match=r'batch must be an int >= 0 .*got batch=-1'):
        mixup_fn.batch = -1
    with pytest.raises(NotImplementedError, match=r'cannot mix across ranks: use dist_cutmix.timm.Mixup .*prefetcher'):
        FastCollateMixup(mixup_alpha=0.8, num_classes=K)
    with pytest.raises(ValueError, match=r'cutmix_minmax must be \(lo, hi\) .* got cutmix_minmax=0.5'):
        Mixup(cutmix_minmax=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r'index targets must lie in \[0, num_classes=7\), got values in \[0, 9\]'):
        Mixup(num_classes=K, seed=0)(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 9]))


# ---------------------------------------------------------------------------------------------- two ranks

SIZES = (3, 4)  # an odd global batch: pairs leave one sample alone, across ranks
SEED = 11


def _rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [_batch(SIZES[rank], 8, 8, seed=100 * rank + b) for b in range(3)]


def _global_rank(rank: int, world: int, mode: str) -> dict:
    mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=K, pool='global', seed=SEED)
    out, cross = [], []
    for x, y in _rank_batches(rank):
        out.append(mixup_fn(x, y))
        cross.append(mixup_fn.mixer.last.cross_rank_fraction)
    return dict(out=out, cross=cross)


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_two_ranks_in_the_global_pool_equal_one_process_on_the_concatenated_batch(tmp_path, mode: str) -> None:
    results = run_ranks(_global_rank, 2, tmp_path, mode)
    seed = SEED  # a fixed seed: whether a pair crosses ranks is then fixed too (seed=None's agreement: test_loop_mixer)
    one = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, num_classes=K, pool='global', seed=seed)
    for b in range(3):
        x = torch.cat([_rank_batches(r)[b][0] for r in range(2)])
        y = torch.cat([_rank_batches(r)[b][1] for r in range(2)])
        want_x, want_y = one(x, y)
        assert torch.equal(torch.cat([r['out'][b][0] for r in results]), want_x)
        assert torch.equal(torch.cat([r['out'][b][1] for r in results]), want_y)
    assert not torch.equal(want_x, torch.cat([_rank_batches(r)[2][0] for r in range(2)]))
    assert all(0 < c < 1 for c in results[0]['cross']), results[0]['cross']  # partners on both ranks, every batch


# ---------------------------------------------------------------------------------------------- without timm

BLOCK_TIMM = '''
import sys

class _NoTimm:
    def find_spec(self, name, path=None, target=None):
        if name == 'timm' or name.startswith('timm.'):
            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)
        return None

sys.meta_path.insert(0, _NoTimm())
sys.modules['timm'] = None
try:
    import timm.data
except ImportError:
    print('timm blocked')
'''

WITHOUT_TIMM = '''
import torch
from dist_cutmix.timm import Mixup

mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode='pair', num_classes=4, pool='global', seed=0)
x, y = mixup_fn(torch.rand(3, 3, 8, 8), torch.arange(3))
assert y.shape == (3, 4) and mixup_fn.state_dict()['batch'] == 1
loaded = [m for m, v in sys.modules.items() if m.split('.')[0] == 'timm' and v is not None]
assert not loaded, loaded
print('door ok')
'''


def test_the_door_imports_and_mixes_without_timm() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', BLOCK_TIMM + WITHOUT_TIMM], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, f'exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}'
    assert proc.stdout.split() == ['timm', 'blocked', 'door', 'ok']


# ---------------------------------------------------------------------------------------------- the box law


@needs_timm
def test_the_box_law_is_timms_box_for_box_with_lambda_and_centre_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    # timm's rand_bbox cuts int(H * sqrt(1 - λ)) rows, cy - cut // 2 to cy + (cut + 1) // 2, odd sides included;
    # the door draws with MixSpec(box_sides='exact'), and the engine's sampler reads its centre off two uniforms.
    from timm.data.mixup import rand_bbox

    from dist_cutmix.draw import sample_boxes

    assert Mixup(num_classes=K).mixer.spec.box_sides == 'exact'
    g = torch.Generator().manual_seed(0)
    lams = [0.0, 0.1, 0.25, 0.5, 0.75, 0.999, 1.0, *torch.rand(40, generator=g, dtype=torch.float64).tolist()]
    odd = 0
    for h, w in ((32, 32), (17, 23), (7, 5), (224, 160)):
        for k, lam in enumerate(lams):
            probe = torch.rand(2, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
            cy, cx = int(probe[0, 0] * h), int(probe[1, 0] * w)  # the centre sample_boxes draws from seed k
            ours = sample_boxes(torch.tensor([lam], dtype=torch.float64), h, w, exact_sides=True,
                                generator=torch.Generator().manual_seed(k))[0].tolist()
            centres = iter([cy, cx])
            monkeypatch.setattr(np.random, 'randint', lambda *a, _c=centres, **kw: next(_c))
            theirs = [int(v) for v in rand_bbox((3, h, w), lam)]
            assert ours == theirs, (h, w, lam, cy, cx)
            odd += int(h * (1 - lam) ** 0.5) % 2
    assert odd > 20  # the odd sides, where the even law would cut one row fewer, were exercised


def test_the_door_draws_timms_exact_sides() -> None:
    # correct_lam=False keeps each CutMix sample's drawn λ as its label weight: a box clear of the borders then
    # has exactly int(H * sqrt(1 - λ)) rows and columns, odd or even
    mixup_fn = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode='elem', correct_lam=False, num_classes=K, seed=3)
    sides, odd = 0, 0
    for _ in range(40):
        mixup_fn(torch.rand(16, 3, 31, 29), torch.randint(0, K, (16,)))
        last = mixup_fn.mixer.last
        for (y0, y1, x0, x1), lam in zip(last.box.tolist(), last.lam.tolist(), strict=True):
            if 0 < y0 and y1 < 31 and 0 < x0 and x1 < 29:
                assert (y1 - y0, x1 - x0) == (int(31 * (1 - lam) ** 0.5), int(29 * (1 - lam) ** 0.5))
                sides += 1
                odd += (y1 - y0) % 2
    assert sides > 50 and odd > 10

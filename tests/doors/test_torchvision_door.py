"""``dist_cutmix.torchvision`` against torchvision's own ``v2.CutMix``, ``v2.MixUp`` and ``v2.RandomChoice``.

With the draws pinned (torchvision run under ``torch.manual_seed``, its λ and box read off with its own
``make_params`` under the same seed, and our ``sample_mix`` made to return them with its partners, ``roll(1, 0)``),
the doors give torchvision's pixels bit for bit and its labels within the ``2**-10`` label grid (exactly when λ is on
it). Both run on the same inputs, good and bad: the doors accept what torchvision accepts, with the same output
structure and types, and refuse what it refuses with the same exception type, but for the few documented
differences, which are checked too. Over two gloo ranks the global pool equals one process on the concatenated batch;
in a real DataLoader the workers' draws differ between workers and epochs and repeat with the same seeds; without
torchvision the module imports and mixes plain tensors.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

torchvision = pytest.importorskip('torchvision', reason='the torchvision door is tested against torchvision')
from torch.utils.data import DataLoader, Dataset, default_collate  # noqa: E402
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import dist_cutmix.mixer  # noqa: E402
from dist_cutmix import MixSpec  # noqa: E402
from dist_cutmix.draw import MixParams, kept_share, sample_boxes  # noqa: E402
from dist_cutmix.torchvision import CutMix, MixInputError, MixUp, RandomChoice  # noqa: E402
from tests.helpers import torchvision_ranks as ranks  # noqa: E402
from tests.helpers.spawn import run_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K = 5
LABEL_GRID = 2.0**-10


def _data(n: int = 6, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g), torch.randint(0, K, (n,), generator=g)


# ---------------------------------------------------------------------------------------------- the draws


def test_cutmix_box_follows_torchvisions_size_law(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our box for a λ and a centre is torchvision's box for the same λ and centre: sides 2*int(sqrt(1-λ)*side/2)
    # (torchvision: half-sides int(0.5*sqrt(1-λ)*side)), centred, clipped; and λ the box's exact pixel share.
    tv = v2.CutMix(num_classes=K)
    g = torch.Generator().manual_seed(0)
    lams = [0.0, 1e-9, 0.1, 0.25, 0.5, 0.75, 0.999, 1.0, *torch.rand(40, generator=g, dtype=torch.float64).tolist()]
    for h, w in ((32, 32), (17, 23), (1, 5), (224, 160)):
        for k, lam in enumerate(lams):
            gen = torch.Generator().manual_seed(k)
            probe = torch.Generator().manual_seed(k)  # the same stream: the centre our sample_boxes draws
            u = torch.rand(2, 1, dtype=torch.float64, generator=probe)
            cy, cx = int(u[0, 0] * h), int(u[1, 0] * w)
            ours = tuple(sample_boxes(torch.tensor([lam], dtype=torch.float64), h, w, generator=gen)[0].tolist())
            with monkeypatch.context() as m:
                m.setattr(tv, '_dist', _Fixed(lam))
                centre = iter([torch.tensor([cx]), torch.tensor([cy])])  # torchvision draws x, then y
                m.setattr(torch, 'randint', lambda *a, _c=centre, **kw: next(_c))
                params = tv.make_params([torch.zeros(1, 1, h, w)])
            x1, y1, x2, y2 = params['box']
            assert ours == (y1, y2, x1, x2), (h, w, lam, cy, cx)
            assert float(kept_share(torch.tensor([ours]), h, w)[0]) == params['lam_adjusted']


class _Fixed:
    """Stands in for torchvision's Beta: ``sample()`` returns one given λ (float64: ``float()`` gives it back)."""

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def sample(self, shape: Any = ()) -> torch.Tensor:
        return torch.tensor(self.lam, dtype=torch.float64)


def test_the_doors_draw_torchvisions_laws() -> None:
    assert CutMix(alpha=0.5).mixer.spec == MixSpec(cutmix_alpha=0.5, mixup_alpha=0.0)
    assert MixUp(alpha=0.3).mixer.spec == MixSpec(cutmix_alpha=0.0, mixup_alpha=0.3, mixup_fold=False)
    # MixUp's λ unfolded, as torchvision's: the own share falls below 1/2 about half the time (folded: never)
    mixup = MixUp(alpha=0.4, num_classes=2, seed=0)
    x, y = torch.rand(2, 1, 1, 1), torch.tensor([0, 1])
    lams = []
    for _ in range(300):
        mixup(x, y)
        lams.append(mixup.last.lam)
    below = sum(lam < 0.5 for lam in lams) / len(lams)
    assert 0.4 < below < 0.6, below
    assert all(round(lam / LABEL_GRID) * LABEL_GRID == lam for lam in lams)  # on the label grid


# ---------------------------------------------------------------------------------------------- pinned parity


def _pin(monkeypatch: pytest.MonkeyPatch, params: Callable[[int, int, int], MixParams]) -> None:
    """Make our draw return ``params(n, h, w)``: torchvision's draw, read off for the test."""
    monkeypatch.setattr(dist_cutmix.mixer, 'sample_mix', lambda spec, n, h, w, **kw: params(n, h, w))


def _roll(n: int) -> torch.Tensor:
    return torch.arange(n).roll(1)  # torchvision's partners: sample i takes sample i - 1


def _cutmix_params(box_xyxy: tuple[int, int, int, int]) -> Callable[[int, int, int], MixParams]:
    x1, y1, x2, y2 = box_xyxy
    box = (y1, y2, x1, x2)
    return lambda n, h, w: MixParams(box=box, lam=float(kept_share(torch.tensor([box]), h, w)[0]), indices=_roll(n))


def _mixup_params(lam: float) -> Callable[[int, int, int], MixParams]:
    return lambda n, h, w: MixParams(box=(0, h, 0, w), lam=lam, indices=_roll(n), weight=1.0 - lam)


def _torchvisions_draw(tv: Any, images: Any, seed: int) -> dict:
    torch.manual_seed(seed)
    return tv.make_params([images])  # what its forward draws after torch.manual_seed(seed)


def _same_structure(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _same_structure(a, b)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _same_structure(got[key], want[key])
    elif isinstance(want, torch.Tensor):
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)


def _video(x: torch.Tensor) -> torch.Tensor:
    return tv_tensors.Video(x[:, None].expand(-1, 2, -1, -1, -1).contiguous())  # two frames


# How a test's batch is handed over: the call's arguments, and how to read (images, labels) back from its result.
INPUTS: dict[str, Callable[[Any, torch.Tensor], tuple[tuple, Callable[[Any], tuple]]]] = {
    'unpacked': lambda x, y: ((x, y), lambda out: out),
    'packed': lambda x, y: (((x, y),), lambda out: out),
    'Image': lambda x, y: ((tv_tensors.Image(x), y), lambda out: out),
    'dict': lambda x, y: (({'image': x, 'labels': y},), lambda out: (out['image'], out['labels'])),
    'channels_last': lambda x, y: ((x.contiguous(memory_format=torch.channels_last), y), lambda out: out),
    'uint8': lambda x, y: (((x * 255).to(torch.uint8), y), lambda out: out),
    'Video': lambda x, y: ((_video(x), y), lambda out: out),
}


@pytest.mark.parametrize('given', list(INPUTS))
@pytest.mark.parametrize('size', [(32, 32), (12, 20)])
def test_pinned_cutmix_gives_torchvisions_pixels_and_labels(monkeypatch: pytest.MonkeyPatch, given: str,
                                                            size: tuple[int, int]) -> None:
    x, y = _data(h=size[0], w=size[1])
    tv, ours = v2.CutMix(num_classes=K), CutMix(num_classes=K, seed=1)
    for seed in range(4):
        args, unpack = INPUTS[given](x, y)
        params = _torchvisions_draw(tv, x, seed)  # the box depends on the images' height and width only
        _pin(monkeypatch, _cutmix_params(params['box']))
        torch.manual_seed(seed)
        want = tv(*args)
        got = ours(*args)
        _same_structure(got, want)
        (got_x, got_y), (want_x, want_y) = unpack(got), unpack(want)
        assert torch.equal(got_x.as_subclass(torch.Tensor), want_x.as_subclass(torch.Tensor))  # bit for bit
        # labels: ours on the 2**-10 grid; a 32x32 box share is on it already, so there they are equal
        tol = 0.0 if size == (32, 32) else LABEL_GRID / 2
        torch.testing.assert_close(got_y, want_y, rtol=0, atol=tol)
        assert got_y.sum(1).tolist() == [1.0] * len(y)


@pytest.mark.parametrize('given', [g for g in INPUTS if g != 'uint8'])  # torchvision's MixUp refuses uint8
def test_pinned_mixup_gives_torchvisions_pixels_and_labels(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    x, y = _data(h=12, w=20)
    tv, ours = v2.MixUp(alpha=0.7, num_classes=K), MixUp(alpha=0.7, num_classes=K, seed=1)
    for seed in range(4):
        args, unpack = INPUTS[given](x, y)
        lam = _torchvisions_draw(tv, x, seed)['lam']
        _pin(monkeypatch, _mixup_params(lam))
        torch.manual_seed(seed)
        want = tv(*args)
        got = ours(*args)
        _same_structure(got, want)
        (got_x, got_y), (want_x, want_y) = unpack(got), unpack(want)
        # off the grid, 1 - (1 - λ) may differ from λ by an ulp of λ: equal within float32 rounding
        torch.testing.assert_close(got_x.as_subclass(torch.Tensor), want_x.as_subclass(torch.Tensor), rtol=0,
                                   atol=2e-7)
        torch.testing.assert_close(got_y, want_y, rtol=0, atol=LABEL_GRID / 2)  # our label weight: λ on the grid


@pytest.mark.parametrize('labels', ['index', 'soft float64', 'soft int'])
def test_pinned_mixup_on_the_grid_is_torchvisions_bit_for_bit(monkeypatch: pytest.MonkeyPatch, labels: str) -> None:
    x, y = _data(h=12, w=20)
    if labels != 'index':
        y = torch.nn.functional.one_hot(y, K)
        y = y.double() * torch.rand(y.shape, dtype=torch.float64) if labels == 'soft float64' else y
    for lam in (0.25 + 3 * LABEL_GRID, 0.5, 1 - LABEL_GRID, 17 * LABEL_GRID):
        tv = v2.MixUp(alpha=0.7, num_classes=K)
        tv._dist = _Fixed(lam)  # torchvision's draw, pinned on the grid
        _pin(monkeypatch, _mixup_params(lam))
        want = tv(tv_tensors.Image(x), y)
        got = MixUp(alpha=0.7, num_classes=K, seed=1)(tv_tensors.Image(x), y)
        _same_structure(got, want)
        assert torch.equal(got[0].as_subclass(torch.Tensor), want[0].as_subclass(torch.Tensor))
        assert got[1].dtype == want[1].dtype and torch.equal(got[1], want[1])


@pytest.mark.parametrize('p', [None, [0.3, 0.7]])
def test_pinned_random_choice_gives_torchvisions_pick_pixels_and_labels(monkeypatch: pytest.MonkeyPatch, p) -> None:
    x, y = _data()
    tvs = [v2.MixUp(alpha=0.7, num_classes=K), v2.CutMix(alpha=1.0, num_classes=K)]
    tv = v2.RandomChoice(tvs, p=p)
    ours = RandomChoice([MixUp(alpha=0.7, num_classes=K, seed=2), CutMix(alpha=1.0, num_classes=K, seed=2)], p=p)
    assert ours.mixer.spec.switch_prob == (0.5 if p is None else 0.7)
    picked = set()
    for seed in range(8):
        torch.manual_seed(seed)
        pick = int(torch.multinomial(torch.tensor(tv.p), 1))  # torchvision's pick, then its transform's draw
        params = tvs[pick].make_params([x])
        _pin(monkeypatch, _mixup_params(params['lam']) if pick == 0 else _cutmix_params(params['box']))
        torch.manual_seed(seed)
        want_x, want_y = tv(x, y)
        got_x, got_y = ours(x, y)
        torch.testing.assert_close(got_x, want_x, rtol=0, atol=0 if pick else 2e-7)
        torch.testing.assert_close(got_y, want_y, rtol=0, atol=LABEL_GRID / 2)
        picked.add(pick)
    assert picked == {0, 1}


# ---------------------------------------------------------------------------------------------- accept and refuse

X, Y = _data(n=4, h=8, w=8)
ONE_HOT = torch.nn.functional.one_hot(Y, K)
PIL_IMAGE = pytest.importorskip('PIL.Image').new('RGB', (8, 8))

CASES: dict[str, Callable[[], tuple]] = {
    'unpacked': lambda: (X, Y),
    'packed tuple': lambda: ((X, Y),),
    'packed list': lambda: ([X, Y],),
    'three items, the third passed through': lambda: (X, Y, torch.zeros(4)),
    'Image': lambda: (tv_tensors.Image(X), Y),
    'Video': lambda: (tv_tensors.Video(torch.rand(4, 2, 3, 8, 8)), Y),
    'two Images': lambda: ((tv_tensors.Image(X), tv_tensors.Image(torch.rand(4, 1, 8, 8))), Y),
    'dict with labels': lambda: ({'image': X, 'labels': Y},),
    'dict with a *label* key': lambda: ({'img': X, 'FooLaBeLBar': Y},),
    'tuple with a target dict': lambda: ((X, {'labels': Y}),),
    'Image after the labels in a dict': lambda: ({'label': Y, 'image': tv_tensors.Image(X)},),
    'soft labels float64': lambda: (X, ONE_HOT.double()),
    'soft labels int': lambda: (X, ONE_HOT),
    'float16 images': lambda: (X.half(), Y),
    'bfloat16 images': lambda: (X.bfloat16(), Y),
    'channels_last': lambda: (X.contiguous(memory_format=torch.channels_last), Y),
    'uint8 images': lambda: ((X * 255).to(torch.uint8), Y),
    'batch of one': lambda: (X[:1], Y[:1]),
    'empty batch': lambda: (X[:0], Y[:0]),
    # refused by both
    'PIL image': lambda: (PIL_IMAGE, Y),
    'mask': lambda: (X, Y, tv_tensors.Mask(torch.zeros(4, 8, 8))),
    'bounding boxes': lambda: (X, Y, tv_tensors.BoundingBoxes(torch.zeros(4, 4), format='XYXY', canvas_size=(8, 8))),
    'no labels key': lambda: ({'img': X, 'target': Y},),
    'labels a list': lambda: (X, [0, 1, 2, 3]),
    'labels a tv_tensor': lambda: (X, tv_tensors.Image(torch.zeros(4, 1, 1))),
    'images alone': lambda: (X,),
    'labels (N, 1, 1)': lambda: (X, torch.zeros(4, 5, 1)),
    'labels 0-d': lambda: (X, torch.tensor(1)),
    'soft labels of another width': lambda: (X, torch.nn.functional.one_hot(Y, K + 1).float()),
    'batch size mismatch': lambda: (X, Y[:3]),
    '3-D images': lambda: (X[0], Y),
    '5-D plain images': lambda: (X[None], Y),
    '4-D Video': lambda: (tv_tensors.Video(X), Y),
    'two Images of different sizes': lambda: ((tv_tensors.Image(X), tv_tensors.Image(torch.rand(4, 1, 6, 8))), Y),
    'int32 labels': lambda: (X, Y.int()),
    'float labels (N,)': lambda: (X, Y.float()),
    'bool labels': lambda: (X, Y > 1),
    'negative labels': lambda: (X, torch.tensor([0, -1, 2, 3])),
    'labels >= num_classes': lambda: (X, torch.tensor([0, K, 2, 3])),
    'labels first in a dict of plain tensors': lambda: ({'labels': Y, 'image': X},),
    'labels alone': lambda: ({'labels': Y},),
}

# Where the doors differ from torchvision on purpose (docs/compatibility.md): (transform, case) -> ours' outcome.
DIFFERENT = {
    ('MixUp', 'uint8 images'): 'accepts',  # torchvision's in-place float multiply fails on uint8; we blend and round
    ('MixUp', 'two Images of different sizes'): ValueError,  # one draw for the sample's images, mixed together
    ('MixUp', 'labels first in a dict of plain tensors'): TypeError,  # torchvision mixes the labels, not the images
    ('MixUp', 'labels alone'): TypeError,  # the same: no images to mix
}


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
        return e


@pytest.mark.parametrize('method', ['CutMix', 'MixUp'])
@pytest.mark.parametrize('case', list(CASES))
def test_accepts_and_refuses_what_torchvision_does(method: str, case: str) -> None:
    tv = getattr(v2, method)(num_classes=K)
    ours = {'CutMix': CutMix, 'MixUp': MixUp}[method](num_classes=K, seed=0)
    torch.manual_seed(0)
    want = _outcome(lambda: tv(*CASES[case]()))
    got = _outcome(lambda: ours(*CASES[case]()))
    expected = DIFFERENT.get((method, case))
    if expected == 'accepts':
        assert isinstance(want, Exception) and not isinstance(got, Exception), (want, got)
    elif expected is not None:
        assert not isinstance(want, Exception) and isinstance(got, expected), (want, got)
        assert 'images' in str(got)
    elif isinstance(want, Exception):
        assert isinstance(got, type(want)), f'torchvision raised {want!r}, we gave {got!r}'
        assert str(got), got
    else:
        assert not isinstance(got, Exception), f'torchvision accepted, we raised {got!r}'
        _same_structure(got, want)


def test_every_documented_difference_is_a_table_case_and_named_in_the_docs() -> None:
    assert {case for _, case in DIFFERENT} <= set(CASES)
    text = (ROOT / 'docs' / 'compatibility.md').read_text()
    for phrase in ('uint8', 'different sizes', 'labels first', 'num_classes=-1'):
        assert phrase in text, phrase


@pytest.mark.parametrize('kwargs', [
    dict(alpha=0), dict(alpha=-1.0), dict(alpha=float('nan')), dict(alpha='x'), dict(alpha='1.5'), dict(alpha=None),
    dict(alpha=True), dict(alpha=torch.tensor(0.5)), dict(labels_getter='labels'), dict(num_classes=0),
    dict(num_classes=2.5), dict(num_classes='a'),
])
@pytest.mark.parametrize('method', ['CutMix', 'MixUp'])
def test_constructor_arguments_are_refused_as_torchvision_refuses_them(method: str, kwargs: dict) -> None:
    # torchvision refuses some of these only when called (num_classes): we refuse them when built, with its type
    def build_and_call(cls: Any) -> Any:
        return cls(**{'num_classes': K, **kwargs})(X, Y)

    want = _outcome(lambda: build_and_call(getattr(v2, method)))
    got = _outcome(lambda: build_and_call({'CutMix': CutMix, 'MixUp': MixUp}[method]))
    if kwargs == dict(alpha=True):  # torchvision's Beta fails at the first call: RuntimeError (torch 2.7) or its
        assert isinstance(want, RuntimeError) and isinstance(got, MixInputError), (want, got)  # NotImplementedError
    elif isinstance(want, Exception):
        assert isinstance(got, type(want)), f'torchvision raised {want!r}, we gave {got!r}'
        name = next(iter(kwargs))
        assert name in str(got) or name == 'labels_getter' and 'labels_getter' in str(got), got
    else:
        assert not isinstance(got, Exception), got


def test_the_arguments_are_keyword_only_with_torchvisions_defaults() -> None:
    import inspect

    for ours, theirs in ((CutMix, v2.CutMix), (MixUp, v2.MixUp)):
        with pytest.raises(TypeError):
            ours(1.0)  # type: ignore[misc]
        mine = inspect.signature(ours).parameters
        for name, param in inspect.signature(theirs).parameters.items():
            assert mine[name].kind is inspect.Parameter.KEYWORD_ONLY and mine[name].default == param.default, name
        assert [n for n in mine if n not in inspect.signature(theirs).parameters] == ['pool', 'seed', 'group']


def test_bad_arguments_of_ours_name_the_argument_and_value() -> None:
    with pytest.raises(ValueError, match=r"pool must be one of .* got pool='world'"):
        CutMix(pool='world')
    with pytest.raises(ValueError, match=r"group is only used with pool='global', got pool='local'"):
        CutMix(group=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r'seed must be an int or None, got seed=1.5'):
        MixUp(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r'combines dist_cutmix.torchvision.CutMix and MixUp, got torchvision'):
        RandomChoice([v2.CutMix(num_classes=K)])
    with pytest.raises(ValueError, match=r'at most one CutMix and one MixUp'):
        RandomChoice([CutMix(num_classes=K), CutMix(alpha=0.5, num_classes=K)])
    with pytest.raises(ValueError, match=r'must agree on num_classes, got MixUp: 5, CutMix: 6'):
        RandomChoice([MixUp(num_classes=K), CutMix(num_classes=K + 1)])
    with pytest.raises(ValueError, match=r"Length of p doesn't match"):
        RandomChoice([MixUp(num_classes=K)], p=[0.5, 0.5])
    with pytest.raises(ValueError, match=r'p must be numbers >= 0 with a positive sum, got p=\[0, 0\]'):
        RandomChoice([MixUp(num_classes=K), CutMix(num_classes=K)], p=[0, 0])
    assert isinstance(_outcome(lambda: CutMix(num_classes=K)(X, Y.int())), RuntimeError)  # torchvision's type too
    assert issubclass(MixInputError, ValueError)


# ---------------------------------------------------------------------------------------------- our own behaviour


def test_a_single_method_choice_mixes_as_that_method_and_the_choice_switches() -> None:
    x, y = _data()
    alone = RandomChoice([CutMix(alpha=0.6, num_classes=K, seed=4)])
    assert alone.mixer.spec == CutMix(alpha=0.6).mixer.spec
    got = alone(x, y)
    want = CutMix(alpha=0.6, num_classes=K, seed=4)(x, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    choice = RandomChoice([MixUp(num_classes=K, seed=4), CutMix(num_classes=K, seed=4)], p=[1, 3])
    kinds = set()
    for _ in range(12):
        choice(x, y)
        kinds.add('CutMix' if choice.last.box != (0, 32, 0, 32) else 'MixUp')
    assert kinds == {'CutMix', 'MixUp'}


def test_a_refused_batch_is_not_counted_so_the_next_one_mixes_as_without_it() -> None:
    refused, straight = CutMix(num_classes=K, seed=0), CutMix(num_classes=K, seed=0)
    with pytest.raises(MixInputError, match='must be int64'):
        refused(X, Y.int())
    assert refused.mixer.batch == 0
    assert torch.equal(refused(X, Y)[0], straight(X, Y)[0]) and refused.mixer.batch == 1


def test_the_state_dict_resumes_the_draws() -> None:
    x, y = _data()
    first = RandomChoice([MixUp(num_classes=K), CutMix(num_classes=K)])  # seed=None: drawn, kept in the state
    for _ in range(3):
        first(x, y)
    state = first.state_dict()
    resumed = RandomChoice([MixUp(num_classes=K), CutMix(num_classes=K)])
    resumed.load_state_dict(state)
    for _ in range(3):
        a, b = first(x, y), resumed(x, y)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match='differs in spec='):
        CutMix(num_classes=K).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- two ranks


@pytest.mark.parametrize('kind', ['cutmix', 'mixup', 'choice'])
def test_two_ranks_with_the_global_pool_equal_one_process_on_the_concatenated_batch(tmp_path, kind: str) -> None:
    results = run_ranks(ranks.global_rank, 2, tmp_path, kind)
    one = ranks.door(kind)  # no process group: the global pool of one process, the same seed
    for b in range(3):
        x = torch.cat([ranks.batches(r)[b][0] for r in range(2)])
        y = torch.cat([ranks.batches(r)[b][1] for r in range(2)])
        want_x, want_y = one(x, y)
        assert torch.equal(torch.cat([r['out'][b][0] for r in results]), want_x)
        assert torch.equal(torch.cat([r['out'][b][1] for r in results]), want_y)
    assert results[0]['state'] == results[1]['state'] and results[0]['state']['batch'] == 3
    assert any(c > 0 for c in results[0]['cross'])  # partners did come from the other rank


def test_a_bad_batch_on_one_rank_raises_on_every_rank(tmp_path) -> None:
    messages = run_ranks(ranks.bad_labels_rank, 2, tmp_path)
    assert messages[0].startswith('None|') and messages[1].startswith('MixInputError|')
    for message in messages:
        assert 'rank 1: MixInputError: index labels (shape (N,)) must be int64' in message, message


# ---------------------------------------------------------------------------------------------- DataLoader workers


class _Indexed(Dataset):
    """Sample ``i``: an image of random pixels and label ``i``, so a mixed label row names both partners."""

    def __init__(self, n: int) -> None:
        self.images = torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i


class _Collate:
    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, batch: list) -> Any:
        return self.transform(*default_collate(batch))


N_DATA, BATCH = 32, 8


def _epochs(seed: int | None, loader_seed: int, workers: int, persistent: bool, epochs: int = 2) -> list[list[tuple]]:
    choice = RandomChoice([MixUp(alpha=1.0, num_classes=N_DATA, seed=seed),
                           CutMix(alpha=1.0, num_classes=N_DATA, seed=seed)])
    loader = DataLoader(_Indexed(N_DATA), batch_size=BATCH, num_workers=workers, collate_fn=_Collate(choice),
                        persistent_workers=persistent, generator=torch.Generator().manual_seed(loader_seed))
    return [[(x, y) for x, y in loader] for _ in range(epochs)]


def _draw(y: torch.Tensor, start: int) -> tuple:
    """A batch's draw, whatever its samples: each row's own label weight, and the position in the batch of the partner
    its other label came from (labels are sample indices; the batch holds samples ``start, start + 1, ...``)."""
    rows = torch.arange(len(y))
    weights = y[rows, start + rows]
    other = y.clone()
    other[rows, start + rows] = 0
    partners = torch.where(other.sum(1) > 0, other.argmax(1) - start, -1)
    return tuple(weights.tolist()), tuple(partners.tolist())


@pytest.mark.parametrize('workers, persistent', [(2, False), (2, True), (0, False)])
def test_dataloader_draws_differ_between_workers_and_epochs_and_repeat_with_the_seeds(workers: int,
                                                                                      persistent: bool) -> None:
    run = _epochs(seed=3, loader_seed=11, workers=workers, persistent=persistent)
    flat = [y for epoch in run for _, y in epoch]
    assert len(flat) == 2 * N_DATA // BATCH
    for y in flat:  # mixed labels: rows of at most two classes summing to 1
        assert y.shape == (BATCH, N_DATA) and y.sum(1).tolist() == [1.0] * BATCH
    # the draws differ between every two batches: between workers (batches 0 and 1 of an epoch come from
    # different workers), and between epochs for the same samples
    draws = [_draw(y, BATCH * (i % (N_DATA // BATCH))) for i, y in enumerate(flat)]
    assert len(set(draws)) == len(draws)
    again = _epochs(seed=3, loader_seed=11, workers=workers, persistent=persistent)
    for (x0, y0), (x1, y1) in zip([b for e in run for b in e], [b for e in again for b in e], strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    other = _epochs(seed=4, loader_seed=11, workers=workers, persistent=persistent, epochs=1)
    assert _draw(other[0][0][1], 0) != draws[0]  # our seed is part of the key


def test_dataloader_workers_without_our_seed_follow_the_loaders_seed_as_torchvisions_draws_do() -> None:
    a = _epochs(seed=None, loader_seed=5, workers=2, persistent=False, epochs=1)
    b = _epochs(seed=None, loader_seed=5, workers=2, persistent=False, epochs=1)
    c = _epochs(seed=None, loader_seed=6, workers=2, persistent=False, epochs=1)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(a[0], b[0], strict=True))
    assert _draw(a[0][0][1], 0) != _draw(c[0][0][1], 0)


def test_a_global_pool_refuses_to_run_in_a_dataloader_worker() -> None:
    loader = DataLoader(_Indexed(8), batch_size=4, num_workers=1, collate_fn=_Collate(CutMix(num_classes=8,
                                                                                             pool='global')))
    with pytest.raises(RuntimeError, match=r"pool='global'\) cannot mix in a DataLoader worker"):
        next(iter(loader))


# ---------------------------------------------------------------------------------------------- without torchvision

BLOCK_TORCHVISION = '''
import sys

class _NoTorchvision:
    def find_spec(self, name, path=None, target=None):
        if name == 'torchvision' or name.startswith('torchvision.'):
            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)
        return None

sys.meta_path.insert(0, _NoTorchvision())

# and no metadata either, as where it is not installed (torchmetrics asks the metadata, then imports torchvision)
import importlib.metadata as metadata

_from_name = metadata.Distribution.from_name.__func__

def _from_name_but_torchvision(cls, name):
    if name.lower() == 'torchvision':
        raise metadata.PackageNotFoundError(name)
    return _from_name(cls, name)

metadata.Distribution.from_name = classmethod(_from_name_but_torchvision)
'''

WITHOUT = '''
import torch
from torch.utils.data import default_collate
from dist_cutmix.torchvision import CutMix, MixUp, RandomChoice
x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 4
choice = RandomChoice([MixUp(alpha=0.2, num_classes=4, seed=0), CutMix(num_classes=4, seed=0)])
for t in (CutMix(num_classes=4, seed=0), MixUp(num_classes=4, seed=0), choice):
    a, b = t(x, y)
    assert b.shape == (6, 4) and not torch.equal(a, x)
    out = t({'image': x, 'labels': y})
    assert out['labels'].shape == (6, 4)
    a, b = t(*default_collate([(x[i], int(y[i])) for i in range(6)]))
    assert b.shape == (6, 4)
try:
    CutMix(num_classes=4)({'image': x, 'target': y})
except ValueError as e:
    print('refused:', e)
try:
    import torchvision
except ImportError:
    print('torchvision blocked')
assert not [m for m, v in sys.modules.items() if m.split('.')[0] == 'torchvision' and v is not None]
print('door ok')
'''


def test_the_door_imports_and_mixes_without_torchvision() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', BLOCK_TORCHVISION + WITHOUT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'door ok' in proc.stdout and 'torchvision blocked' in proc.stdout
    assert 'refused: Could not infer where the labels are' in proc.stdout


"""The three MixSpec options timm's Mixup needs, on the engine: ``correct_lam=False`` (a CutMix label keeps the
drawn λ), ``multi_label`` (multi-hot targets smoothed toward 1/2) and ``pairs`` (timm's ``mode='pair'``: a random
matching whose two members share one draw; in an odd batch one sample is left unmixed)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_cutmix import Mixer, MixSpec, mix_batch_local
from dist_cutmix.draw import box_areas, kept_share, on_label_grid, sample_mix, sample_pairs
from dist_cutmix.loop import _spec_state

H, W = 13, 11  # odd sides: CutMix boxes get clipped, and sides rounded to even, often


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- pairs


@pytest.mark.parametrize('n', [0, 1, 2, 5, 8, 9])
def test_sample_pairs_is_a_matching_with_one_sample_alone_in_an_odd_batch(n: int) -> None:
    draws = set()
    for seed in range(6):
        p = sample_pairs(n, generator=_g(seed))
        assert sorted(p.tolist()) == list(range(n))
        assert torch.equal(p[p], torch.arange(n))  # each is its partner's partner
        assert int((p == torch.arange(n)).sum()) == n % 2
        draws.add(tuple(p.tolist()))
    assert len(draws) == 1 if n <= 2 else len(draws) > 2  # drawn, not fixed (timm's flip is one pairing)


@pytest.mark.parametrize('correct_lam', [True, False])
@pytest.mark.parametrize('n', [6, 7])
def test_pairs_share_one_draw_and_the_odd_one_out_is_unmixed(n: int, correct_lam: bool) -> None:
    spec = MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.9, pairs=True, label_smoothing=0.1,
                   correct_lam=correct_lam)
    kinds = set()
    for seed in range(12):
        p = sample_mix(spec, n, H, W, per_sample=True, generator=_g(seed))
        own = torch.arange(n)
        assert torch.equal(p.indices[p.indices], own)
        mate = p.indices
        torch.testing.assert_close(p.boxes[mate], p.boxes, rtol=0, atol=0)
        torch.testing.assert_close(p.lam[mate], p.lam, rtol=0, atol=0)
        torch.testing.assert_close(p.weights[mate], p.weights, rtol=0, atol=0)
        alone = mate == own
        assert int(alone.sum()) == n % 2
        assert bool((p.lam[alone] == 1).all() and (p.weights[alone] == 0).all())
        assert bool((box_areas(p.boxes[alone]) == 0).all())
        for i in range(n):
            if not alone[i]:
                kinds.add('unmixed' if p.lam[i] == 1 else 'cutmix' if p.weights[i] == 1 else 'mixup')
    assert kinds == {'unmixed', 'cutmix', 'mixup'}


def test_pairs_need_per_sample() -> None:
    spec = MixSpec(pairs=True)
    with pytest.raises(ValueError, match='pairs=True.*per_sample=True'):
        sample_mix(spec, 4, H, W, generator=_g(0))
    with pytest.raises(ValueError, match='pairs=True.*per_sample=True'):
        Mixer(spec=spec, num_classes=3)


def test_paired_samples_swap_their_boxes_in_the_pixels() -> None:
    # each member of a CutMix pair shows the other's pixels in the same box; in place as out of place
    n, spec = 6, MixSpec(cutmix_alpha=1.0, pairs=True)
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 2, H, W).contiguous()
    for inplace in (False, True):
        out = mix_batch_local(x.clone(), torch.arange(n), seed=3, batch=0, spec=spec, num_classes=n, per_sample=True,
                              inplace=inplace)
        for i, (j, (y0, y1, x0, x1)) in enumerate(zip(out.partner_index.tolist(), out.box.tolist(), strict=True)):
            inside = torch.zeros(H, W, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert bool((out.input[i][:, inside] == j).all()) and bool((out.input[i][:, ~inside] == i).all())


# ---------------------------------------------------------------------------------------------- correct_lam


@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('base', [dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.9), dict(cutmix_alpha=1.0)],
                         ids=['switch', 'cutmix'])
def test_correct_lam_false_keeps_the_drawn_lambda_of_each_cutmix_box(per_sample: bool, base: dict) -> None:
    n, seen_clipped = 16, 0
    for seed in range(8):
        got = sample_mix(MixSpec(**base, correct_lam=False), n, H, W, per_sample=per_sample, generator=_g(seed))
        boxes = got.boxes if per_sample else torch.tensor([got.box])
        lam = torch.as_tensor(got.lam, dtype=torch.float64).reshape(-1)
        weight = torch.as_tensor(got.weights if per_sample else [got.weight], dtype=torch.float64).reshape(-1)
        cut = weight == 1
        # the drawn λ gives the box's sides (2 * (int(side * sqrt(1 - λ)) // 2), as boxes_for_lambda draws them):
        # a box inside the image has exactly them, a clipped one fewer
        ratio = torch.sqrt(1.0 - lam)
        sides = torch.stack([2 * ((H * ratio).long() // 2), 2 * ((W * ratio).long() // 2)], dim=1)
        have = torch.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], dim=1)
        assert bool((have[cut] <= sides[cut]).all())
        clipped = cut & (have != sides).any(dim=1)
        seen_clipped += int(clipped.sum())
        exact = kept_share(boxes, H, W)
        assert bool((lam[clipped] != exact[clipped]).all())  # the label does not follow the clipped box
        if 'mixup_alpha' in base:  # same draws as correct_lam=True, only the CutMix labels differ
            ref = sample_mix(MixSpec(**base), n, H, W, per_sample=per_sample, generator=_g(seed))
            assert torch.equal(ref.indices, got.indices)
            assert torch.equal(ref.boxes if per_sample else torch.tensor([ref.box]), boxes)
            ref_lam = torch.as_tensor(ref.lam, dtype=torch.float64).reshape(-1)
            assert torch.equal(ref_lam[~cut], lam[~cut]) and torch.equal(ref_lam[cut], exact[cut])
    assert seen_clipped > 0


def test_correct_lam_false_with_minmax_boxes_keeps_the_box_share_as_timm() -> None:
    spec = MixSpec(cutmix_minmax=(0.2, 0.8), mixup_alpha=0.0, correct_lam=False)
    p = sample_mix(spec, 8, H, W, per_sample=True, generator=_g(1))
    assert torch.equal(p.lam, kept_share(p.boxes, H, W))


def test_correct_lam_false_labels_the_mixed_targets_with_the_drawn_lambda() -> None:
    spec = MixSpec(cutmix_alpha=1.0, correct_lam=False)
    x, y = torch.rand(8, 3, H, W), torch.arange(8) % 4
    out = mix_batch_local(x, y, seed=2, batch=0, spec=spec, num_classes=4, per_sample=True)
    assert not torch.equal(out.lam, kept_share(out.box, H, W))
    keep = on_label_grid(out.lam).float()[:, None]
    one_hot = torch.nn.functional.one_hot
    want = keep * one_hot(y, 4) + (1 - keep) * one_hot(y[out.partner_index], 4)
    torch.testing.assert_close(out.target, want, rtol=0, atol=0)


def test_bad_flags_name_the_argument() -> None:
    for name in ('correct_lam', 'multi_label', 'pairs'):
        with pytest.raises(TypeError, match=rf"{name} must be True or False, got {name}='yes'"):
            MixSpec(**{name: 'yes'})


# ---------------------------------------------------------------------------------------------- multi_label


@pytest.mark.parametrize('per_sample', [False, True])
def test_multi_label_targets_are_mixed_then_smoothed_toward_one_half(per_sample: bool) -> None:
    n, k, eps = 6, 5, 0.2
    g = _g(4)
    x, y = torch.rand(n, 3, H, W, generator=g), torch.randint(0, 2, (n, k), generator=g).float()
    spec = MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=eps, multi_label=True)
    out = mix_batch_local(x, y, seed=1, batch=0, spec=spec, num_classes=k, per_sample=per_sample)
    lam = torch.as_tensor(on_label_grid(out.lam), dtype=torch.float32).reshape(-1, 1)
    want = (lam * y + (1 - lam) * y[out.partner_index]) * (1 - eps) + eps / 2
    torch.testing.assert_close(out.target, want, rtol=0, atol=1e-6)
    plain = mix_batch_local(x, y, seed=1, batch=0, spec=dataclasses.replace(spec, multi_label=False), num_classes=k,
                            per_sample=per_sample)
    torch.testing.assert_close(plain.target, (want - eps / 2) + eps / k, rtol=0, atol=1e-6)  # ε/C without it


def test_multi_label_refuses_index_targets_and_a_wrong_width_naming_what_to_pass() -> None:
    x = torch.rand(4, 3, H, W)
    spec = MixSpec(multi_label=True)
    with pytest.raises(ValueError, match=r'multi_label=True mixes multi-hot .* got index targets of shape \(4,\).*'
                                         r'multi_label=False'):
        mix_batch_local(x, torch.arange(4), seed=0, batch=0, spec=spec, num_classes=4)
    with pytest.raises(ValueError, match=r'num_classes=5 columns, got targets of shape \(4, 4\)'):
        mix_batch_local(x, torch.ones(4, 4), seed=0, batch=0, spec=spec, num_classes=5)


# ---------------------------------------------------------------------------------------------- Mixer state


def test_a_mixer_checkpoint_from_before_the_new_fields_still_resumes() -> None:
    saved = Mixer(mixup_alpha=0.8, num_classes=3, seed=1)
    state = saved.state_dict()
    state['spec'] = {k: v for k, v in state['spec'].items() if k not in ('correct_lam', 'multi_label', 'pairs')}
    state['batch'] = 4
    resumed = Mixer(mixup_alpha=0.8, num_classes=3, seed=1)
    resumed.load_state_dict(state)
    assert resumed.batch == 4
    other = Mixer(spec=MixSpec(mixup_alpha=0.8, correct_lam=False), num_classes=3, seed=1)
    with pytest.raises(ValueError, match='differs in spec='):  # a missing field is its default, not a wildcard
        other.load_state_dict(state)
    assert set(_spec_state(MixSpec())) >= {'correct_lam', 'multi_label', 'pairs'}

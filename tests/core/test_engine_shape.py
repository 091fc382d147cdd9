"""The engine's seams: one drawing path, one check per rule, ownership computed where the exchange plan is built,
and the former names that still resolve."""
from __future__ import annotations

import itertools

import pytest
import torch

import dist_cutmix
from dist_cutmix import MixSpec, mix_batch_across_group, mix_batch_local
from dist_cutmix.distributed import ExchangePlan
from dist_cutmix.draw import sample_mix, sample_partners
from dist_cutmix.randomness import batch_generator

K = 5


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, 3, 8, 9, generator=g), torch.randint(0, K, (n,), generator=g)


@pytest.mark.parametrize('mix', [mix_batch_local, mix_batch_across_group])
def test_spec_with_a_conflicting_alpha_or_uniform_sampling_raises_naming_both(mix) -> None:
    x, y = _batch()
    conflict = r'not both: got spec=MixSpec\(cutmix_alpha=0\.0, mixup_alpha=0\.2.*alpha=0\.5'
    with pytest.raises(ValueError, match=conflict):
        mix(x, y, seed=0, batch=0, spec=MixSpec.mixup(0.2), alpha=0.5, num_classes=K)
    with pytest.raises(ValueError, match=r'not both: .*uniform_sampling=True'):
        mix(x, y, seed=0, batch=0, spec=MixSpec.cutmix(1.0), uniform_sampling=True, num_classes=K)
    # the same values twice are no conflict, and the spec is what is drawn
    agreed = mix(x, y, seed=0, batch=0, spec=MixSpec.cutmix(0.5, True), alpha=0.5, uniform_sampling=True,
                 num_classes=K)
    plain = mix(x, y, seed=0, batch=0, alpha=0.5, uniform_sampling=True, num_classes=K)
    assert torch.equal(agreed.input, plain.input)


@pytest.mark.parametrize('sizes', [[3, 5], [4, 0, 2], [1, 1, 1, 1], [7]])
def test_the_exchange_plan_says_who_owns_every_partner_as_a_loop_over_ranks_would(sizes) -> None:
    total = sum(sizes)
    perm = sample_partners(total, generator=batch_generator(1, total))
    starts = list(itertools.accumulate([0] + sizes[:-1]))
    owner = [r for r, n in enumerate(sizes) for _ in range(n)]
    cross = sum(owner[int(perm[g])] != owner[g] for g in range(total)) / total
    for rank, (start, n) in enumerate(zip(starts, sizes, strict=True)):
        plan = ExchangePlan.build(perm, sizes, rank)
        partners = [int(perm[g]) for g in range(start, start + n)]
        assert plan.partner_rank.tolist() == [owner[p] for p in partners]
        assert plan.partner_index.tolist() == [p - starts[owner[p]] for p in partners]
        assert plan.cross_rank_fraction == pytest.approx(cross, abs=1e-12)
        # per-rank totals of per-row sizes: rows are grouped by destination (sent) and by source (received)
        sent = torch.arange(1, len(plan.send_order) + 1)
        expected = [0] * len(sizes)
        for size, dest in zip(sent.tolist(), plan.send_dest.tolist(), strict=True):
            expected[owner[dest]] += size
        assert plan.sent_per_rank(sent) == expected


def test_sample_mix_is_the_path_of_every_composer_style_draw() -> None:
    g = batch_generator(3, 4)
    drawn = sample_mix(MixSpec.mixup(0.4), 6, 8, 9, generator=g)
    _, _, mixing = dist_cutmix.mixup_batch(*_batch(), alpha=0.4, generator=batch_generator(3, 4))
    assert mixing == drawn.weight
    params = dist_cutmix.sample_params(6, 8, 9, alpha=1.0, generator=batch_generator(3, 5))
    again = sample_mix(MixSpec.cutmix(1.0), 6, 8, 9, generator=batch_generator(3, 5))
    assert (params.box, params.lam) == (again.box, again.lam) and torch.equal(params.indices, again.indices)


def test_former_names_still_resolve_to_the_new_ones() -> None:
    from dist_cutmix import functional, pixels_per_sample
    from dist_cutmix.draw import MixParams, on_label_grid
    from dist_cutmix.validation import check_input

    assert dist_cutmix.CutMixParams is MixParams and dist_cutmix.apply_cutmix is dist_cutmix.apply_mix
    assert functional.CutMixParams is MixParams and functional.label_lambda is on_label_grid
    assert functional.validate_input is check_input
    assert functional.apply_cutmix_per_sample is pixels_per_sample.apply_per_sample
    with pytest.raises(AttributeError, match='no attribute'):
        functional.sample_lambda  # noqa: B018 - gone: one Beta draw remains, draw.sample_beta
    result = mix_batch_across_group(*_batch(), seed=0, batch=0, num_classes=K, per_sample=True)
    assert result.pool_lam is result.group_lam and result.group_lam.shape == (6,)

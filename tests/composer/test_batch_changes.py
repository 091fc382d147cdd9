"""Partner labels stay with their samples when another algorithm prunes or replaces the batch after mixing.

Composer's passes always run ``SelectiveBackprop`` last at ``AFTER_DATALOADER`` (first in the list,
then reversed for ``AFTER_*`` events), so it prunes the batch CutMix has just mixed. With
``interpolate_loss=True`` each kept sample must still be scored against its own partner's label.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

pytest.importorskip('composer', reason='needs the composer extra')
from composer.algorithms import SelectiveBackprop
from composer.core import Algorithm, Event

from dist_cutmix import CutMix
from dist_cutmix import functional as F
from dist_cutmix.pixels import apply_mix
from dist_cutmix.randomness import batch_generator
from tests.helpers.compat_models import make_data, run_cell

SEED, BATCH_SIZE = 17, 8


def _full_mixed_batch(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Batch ``b`` as CutMix mixed it before any pruning: images, own ids, partner ids, label weight."""
    x, _ = make_data('classifier')
    ids = torch.arange(b * BATCH_SIZE, (b + 1) * BATCH_SIZE)
    params = F.sample_params(BATCH_SIZE, x.shape[-2], x.shape[-1], generator=batch_generator(SEED, b, 'local', 0))
    mixed = apply_mix(x[ids], params)
    return mixed, ids, ids[params.indices], round(params.lam * 1024) / 1024


def test_selective_backprop_after_cutmix_keeps_each_samples_partner():
    sb = SelectiveBackprop(start=0, end=1, keep=0.5, scale_factor=1, interrupt=0)
    out = run_cell('classifier', 'tuple', 'interpolate', 'local', batch_size=BATCH_SIZE, microbatch=2, batches=3,
                   algorithms=[CutMix(interpolate_loss=True), sb])
    _, y = make_data('classifier')
    pruned = False
    for b, mbs in out['batches'].items():
        mixed, own, partner, weight = _full_mixed_batch(b)
        pruned |= sum(len(mb['input']) for mb in mbs) < BATCH_SIZE
        for mb in mbs:
            # each kept sample, found among the mixed batch by its pixels
            rows = [next(j for j in range(BATCH_SIZE) if torch.equal(mixed[j], row)) for row in mb['input']]
            assert torch.equal(mb['target'], y[own[rows]])
            expected = weight * TF.cross_entropy(mb['outputs'], y[own[rows]]) \
                + (1 - weight) * TF.cross_entropy(mb['outputs'], y[partner[rows]])
            torch.testing.assert_close(mb['loss'], expected)
    assert pruned, 'SelectiveBackprop pruned nothing: the test would not test anything'


class Dim(Algorithm):
    """Replaces the images with a darker copy at AFTER_DATALOADER: the samples are no longer CutMix's."""

    def match(self, event: Event, state) -> bool:
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state, logger) -> None:
        state.batch = (state.batch[0] * 0.5, state.batch[1])


def test_an_algorithm_that_replaces_the_mixed_images_is_an_error_naming_the_order():
    # AFTER_DATALOADER runs in reverse list order: [Dim, CutMix] runs Dim after CutMix.
    with pytest.raises(RuntimeError, match=r'cannot tell which mixed samples.*Put CutMix before that algorithm'):
        run_cell('classifier', 'tuple', 'interpolate', 'local', algorithms=[Dim(), CutMix(interpolate_loss=True)])
    # the order the message names trains
    run_cell('classifier', 'tuple', 'interpolate', 'local', algorithms=[CutMix(interpolate_loss=True), Dim()])

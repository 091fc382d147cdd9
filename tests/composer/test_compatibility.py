"""The drop-in table: every model kind x batch layout x mode x target handling trains in a real Trainer.

One spawn per (world size, mode) runs all 30 cells of that row on its ranks (the spawn is shared by
the row's tests through a file cache, safe under pytest-xdist). Each cell is then checked against a
reference built here, by hand, from the pixels the model saw: the box is where channel 0 is not the
sample's own index, the partner is the index read inside it. Targets handed to the loss, the loss
itself (interpolated or not) and the logged train metric must all match that reference.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip('composer', reason='needs the composer extra')
from tests.helpers.compat_models import (
    LAYOUTS,
    MODELS,
    NUM_CLASSES,
    TARGETS,
    H,
    N,
    W,
    make_data,
    reference_loss,
    reference_metric,
    reference_partners,
    table_on_rank,
)
from tests.helpers.spawn import run_ranks

BATCH_SIZE, BATCHES = 4, 2
CELLS = list(itertools.product(MODELS, LAYOUTS, TARGETS))
ROWS = [(1, 'global'), (2, 'local'), (2, 'global'), (2, 'node')]


def _node_env(rank: int) -> dict[str, str]:
    # Two nodes of one rank each: node mode builds real subgroups, and partners must stay on their node.
    return {'LOCAL_WORLD_SIZE': '1', 'LOCAL_RANK': '0', 'NODE_RANK': str(rank)}


@pytest.fixture(scope='session')
def table(tmp_path_factory: Any) -> Any:
    # Under pytest-xdist the workers' temp dirs share a parent: the row's result is cached there once.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
    memo: dict[tuple[int, str], list[dict]] = {}

    def rows(world: int, mode: str) -> list[dict]:
        if (world, mode) not in memo:
            path = Path(shared) / f'compat-{world}-{mode}.pkl'
            with open(f'{path}.lock', 'w') as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one xdist worker runs the row; the others read its result
                if not path.exists():
                    results = run_ranks(table_on_rank, world, tmp_path_factory.mktemp('compat'), mode, CELLS,
                                        deadline_s=600, per_rank_env=_node_env if mode == 'node' else None)
                    path.write_bytes(pickle.dumps(results))
                memo[(world, mode)] = pickle.loads(path.read_bytes())
        return memo[(world, mode)]

    return rows


def _ids(rank: int, world: int, batch: int) -> torch.Tensor:
    return torch.arange(N)[rank::world][batch * BATCH_SIZE:(batch + 1) * BATCH_SIZE]


def _groups(world: int, mode: str) -> list[list[int]]:
    return [list(range(world))] if mode == 'global' else [[r] for r in range(world)]


def _expected_target(model: str, targets: str, own: torch.Tensor, partner: torch.Tensor, box: tuple, weight: float):
    if model == 'segmentation':  # pasted, with or without interpolate_loss
        y0, y1, x0, x1 = box
        out = own.clone()
        out[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        return out
    if targets == 'interpolate':
        return own
    if model == 'binary':
        return weight * own + (1 - weight) * partner
    eye = torch.eye(NUM_CLASSES)
    return weight * eye[own] + (1 - weight) * eye[partner]


@pytest.mark.parametrize('targets', TARGETS)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('world, mode', ROWS)
def test_cell_trains_and_matches_the_reference(table: Any, world: int, mode: str, model: str, layout: str,
                                               targets: str) -> None:
    per_rank = table(world, mode)
    cell = (model, layout, targets)
    failures = [r[cell] for r in per_rank if isinstance(r[cell], str)]
    if failures:
        pytest.fail(f'the cell did not train:\n{failures[0]}')
    results = [r[cell] for r in per_rank]
    x_all, y_all = make_data(model)
    assert torch.equal(x_all[:, 0, 0, 0], torch.arange(N, dtype=torch.float32))
    mixed_any = False
    for b in range(BATCHES):
        all_outputs, all_targets = [], []
        for group in _groups(world, mode):
            mbs = {r: results[r]['batches'][b] for r in group}
            ids = torch.cat([_ids(r, world, b) for r in group])
            images = torch.cat([mb['input'] for r in group for mb in mbs[r]])
            box, partners = reference_partners(images, ids)
            assert set(partners.tolist()) <= set(ids.tolist()), 'a partner from outside the mixing group'
            if box != (0, 0, 0, 0):
                mixed_any = True
                assert sorted(partners.tolist()) == sorted(ids.tolist()), 'partners are not a permutation'
                if len(ids) > 1:
                    assert not (partners == ids).any()
            y0, y1, x0, x1 = box
            lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
            weight = round(lam * 1024) / 1024  # the documented label weight
            expected = _expected_target(model, targets, y_all[ids], y_all[partners], box, weight)
            seen = torch.cat([mb['target'] for r in group for mb in mbs[r]])
            torch.testing.assert_close(seen, expected, rtol=0, atol=0)
            if model in ('classifier', 'bare', 'metric') and targets == 'soft':
                assert float(seen.sum()) == len(ids)  # exactly N: no soft cross-entropy warning, no rescale
            # the loss of every microbatch, from its outputs and the reference targets
            offset = 0
            for r in group:
                for mb in mbs[r]:
                    n = len(mb['outputs'])
                    rows = slice(offset, offset + n)
                    offset += n
                    if targets == 'interpolate' and model != 'segmentation':
                        want = weight * reference_loss(model, mb['outputs'], y_all[ids][rows]) \
                            + (1 - weight) * reference_loss(model, mb['outputs'], y_all[partners][rows])
                    else:
                        want = reference_loss(model, mb['outputs'], expected[rows])
                    torch.testing.assert_close(mb['loss'], want)
                    all_outputs.append(mb['outputs'])
                    all_targets.append(mb['target'])
        logged = {k: v for k, v in results[0]['logged'].items() if k.startswith('metrics/train/')}
        if model != 'bare':
            assert len(logged) == 1, f'expected one train metric, got {sorted(logged)}'
            (values,) = logged.values()
            # Composer syncs train metrics over ranks: the reference is over every rank's samples.
            want = reference_metric(model, torch.cat(all_outputs), torch.cat(all_targets))
            assert values[b] == pytest.approx(want, abs=1e-6)
        else:
            assert not logged
    assert mixed_any, 'no batch of the cell was mixed'
    lams = [r['logged']['cutmix/lambda'] for r in results]
    assert all(len(v) == BATCHES for v in lams)

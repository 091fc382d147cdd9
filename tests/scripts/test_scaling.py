"""launch/benchmarks/scaling.py: its vectorised counts are ExchangePlan's, and the script keeps running."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dist_cutmix.distributed import ExchangePlan
from dist_cutmix.functional import sample_params, sample_partners
from dist_cutmix.randomness import batch_generator
from launch.benchmarks import scaling


def _perms(n: int):
    g = torch.Generator().manual_seed(n)
    yield sample_partners(n, exclude_self=True, generator=g)
    yield sample_partners(n, exclude_self=False, generator=g)  # may keep fixed points
    yield torch.arange(n)  # everything stays home
    yield torch.arange(n).roll(1)


@pytest.mark.parametrize('world', range(2, 9))
@pytest.mark.parametrize('uneven', [False, True])
def test_counts_equal_exchange_plan_for_every_rank(world, uneven):
    sizes = [1 + (r * 3) % 4 for r in range(world)] if uneven else [3] * world
    for perm in _perms(sum(sizes)):
        matrix = scaling.send_count_matrix(perm, sizes)
        rows, peers = scaling.rank_stats(perm, sizes)
        for rank in range(world):
            plan = ExchangePlan.build(perm, sizes, rank)
            assert matrix[rank].tolist() == plan.send_counts, (world, sizes, perm, rank)
            assert int(rows[rank]) == plan.cross_rank_rows_sent(rank)
            others = [c for q, c in enumerate(plan.send_counts) if q != rank]
            assert int(peers[rank]) == sum(c > 0 for c in others)


def test_node_mode_counts_each_node_with_its_own_draw():
    # Node groups draw from (seed, batch, 'group', lowest rank of the node), as mix_batch_across_group does.
    world, node, per_rank, shape = 16, 4, 3, (2, 8, 8)
    sent, rows, peers, _ = scaling._exchange(world, per_rank, node, shape, 4, seed=5, batch=2, alpha=1.0)
    for first in range(0, world, node):
        params = sample_params(node * per_rank, 8, 8, alpha=1.0, generator=batch_generator(5, 2, 'group', first))
        y0, y1, x0, x1 = params.box
        row_bytes = scaling.LABEL_BYTES + (2 * (y1 - y0) * (x1 - x0) * 4 if params.lam < 1 else 0)
        for local in range(node):
            plan = ExchangePlan.build(params.indices, [per_rank] * node, local)
            r = first + local
            assert int(rows[r]) == plan.cross_rank_rows_sent(local)
            assert int(peers[r]) == sum(c > 0 for q, c in enumerate(plan.send_counts) if q != local)
            assert float(sent[r]) == plan.cross_rank_rows_sent(local) * row_bytes + scaling.HANDSHAKE_BYTES * (node - 1)


def test_script_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / 'scaling.json'
    rows = scaling.main(['--worlds', '8,16', '--per-rank', '4', '--image', '3x16x16', '--draws', '3',
                         '--node-size', '8', '--json', str(out)])
    printed = capsys.readouterr().out
    assert sum(line.startswith('|') for line in printed.splitlines()) == 2 + 6 and '| 16 | all-gather |' in printed
    assert json.loads(out.read_text())['rows'] == rows
    by = {(r['world'], r['mode']): r for r in rows}
    assert by[16, 'all-gather']['bytes_mean'] == 15 * 4 * (3 * 16 * 16 * 4 + 8)
    assert by[16, 'all-gather']['peers_max'] == 15
    # at W = node size one node is the world: the same group, the same draw, the same numbers
    assert {k: v for k, v in by[8, 'global'].items() if k != 'mode'} == \
        {k: v for k, v in by[8, 'node'].items() if k != 'mode'}
    for r in rows:
        if r['mode'] != 'all-gather':
            assert r['peers_max'] <= min(4, 7 if r['mode'] == 'node' else r['world'] - 1)
            assert r['bytes_mean'] < by[r['world'], 'all-gather']['bytes_mean']


def test_rejects_a_world_that_is_not_whole_nodes():
    with pytest.raises(ValueError, match='multiple of node_size=8'):
        scaling.scaling_rows([12])


def test_design_doc_shows_what_the_script_computes():
    # The docs' scaling table is this script's output; its small rows are cheap to recompute.
    design = (Path(__file__).resolve().parents[2] / 'docs' / 'design.md').read_text()
    shown = [line for line in design.splitlines() if re.match(r'\| (8|64) \| ', line)]
    computed = scaling.markdown(scaling.scaling_rows([8, 64])).splitlines()[2:]
    assert shown == computed
    header = scaling.markdown([]).splitlines()[0]
    assert header in design

"""launch/benchmarks/bench_arrival.py at a tiny size: it times the arrival check, and it shows what a missing rank
costs without the check (the group's timeout, an error naming neither rank nor batch) and with it."""
from __future__ import annotations

from launch.benchmarks import bench_arrival


def test_the_benchmark_measures_the_check_and_a_missing_rank_with_and_without_it(tmp_path, capsys):
    result = bench_arrival.main(['--batches', '3', '--shape', '2x3x8x8', '--group-timeout', '3',
                                 '--arrival-timeout', '1', '--json', str(tmp_path / 'out.json')])
    cost = result['cost']
    assert cost['store'] == 'FileStore' and all(cost[k] > 0 for k in ('checked', 'plain', 'check alone'))
    without, with_check = result['missing']
    # Without the check: the ranks wait out the group's timeout and get gloo's words, no rank, no batch. The first
    # to time out closes its pairs, so the other may read 'Connection closed by peer' a moment before its own.
    errors = [without[rank]['error'] for rank in ('rank 0', 'rank 1')]
    timed_out = [r for r in ('rank 0', 'rank 1') if 'Timed out waiting 3000ms' in without[r]['error']]
    assert timed_out and all(without[r]['after_s'] >= 3 for r in timed_out), without
    assert all(('Timed out waiting 3000ms' in e or 'closed by peer' in e) and 'MissingRankError' not in e
               for e in errors), without
    # With it: rank 0 is told who and where after the arrival timeout; rank 1 fails when rank 0's process ends.
    assert with_check['rank 0']['error'].startswith('MissingRankError: rank 1 reached batch 1 but not batch 2')
    assert with_check['rank 0']['after_s'] >= 1  # the bound, then the error (its type shows it is not gloo's)
    assert 'missing rank, arrival_timeout=1.0' in capsys.readouterr().out
    assert (tmp_path / 'out.json').exists()

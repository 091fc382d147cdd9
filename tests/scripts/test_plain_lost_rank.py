"""A rank of launch/train_plain.py killed mid-epoch under torchrun's elastic agent costs nothing in the result.

Two gloo ranks run under ``torchrun --max-restarts 1``, checkpointing every 3 batches with ``--resume auto``;
rank 1 kills itself with SIGKILL before batch 7 (``--fail-at``, first attempt only). The agent restarts the
group, the script resumes by itself from its latest checkpoint (batch 6, mid-epoch 2), and the final
weights, optimizer state and mixer state equal, bit for bit, those of the same run uninterrupted (two gloo
ranks of the test's own). The restart's timings are printed (``pytest -s``), not asserted.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from launch import train_plain
from tests.helpers.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = shutil.which('torchrun', path=str(Path(sys.executable).parent))
# 64 training images, 8 a rank a step: 4 batches an epoch on 2 ranks, 8 in the run.
ARGS = ['--batch-size', '8', '--train-samples', '64', '--eval-samples', '40', '--threads', '1', '--device', 'cpu',
        '--epochs', '2']
SAVE_EVERY, FAIL_AT = 3, 7  # checkpoints after batches 3, 4 (epoch end), 6, 8; rank 1 dies before batch 7


def _train_on_rank(rank: int, world: int, argv: list[str]) -> dict:
    return train_plain.main(argv)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    # torchrun's agent otherwise serves the restarted group from the failed attempt's store, where gloo's set-up
    # can read the dead rank's address and fail to connect (pytorch/pytorch#135712; measured on torch 2.7 and 2.14).
    env['TORCH_DISABLE_SHARE_RDZV_TCP_STORE'] = '1'
    return env


def _agent_time(line: str) -> float:
    """The wall-clock time of a torchrun agent log line (``E1206 03:54:20.932000 ...``, local time, no year)."""
    month, day, clock = re.match(r'[IWE](\d\d)(\d\d) (\d\d:\d\d:\d\d\.\d+)', line).groups()
    stamp = datetime.strptime(f'{datetime.now().year}-{month}-{day} {clock}', '%Y-%m-%d %H:%M:%S.%f')
    return stamp.timestamp()


@pytest.mark.skipif(TORCHRUN is None, reason='torchrun is not installed beside this Python')
def test_a_rank_killed_mid_epoch_is_restarted_and_the_run_ends_bit_for_bit_as_the_uninterrupted_one(tmp_path):
    reference = tmp_path / 'reference.pt'
    uninterrupted = run_ranks(_train_on_rank, 2, tmp_path, [*ARGS, '--save', str(reference)], deadline_s=240)[0]

    checkpoint, summary = tmp_path / 'run' / 'last.pt', tmp_path / 'summary.json'
    cmd = [TORCHRUN, '--standalone', '--nproc_per_node', '2', '--max-restarts', '1', 'launch/train_plain.py', *ARGS,
           '--save', str(checkpoint), '--save-every', str(SAVE_EVERY), '--resume', 'auto', '--fail-at', str(FAIL_AT),
           '--json', str(summary)]
    began = time.time()
    # Its own session: past the deadline the agent and every worker it started go, none left behind.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f'torchrun ran past 300 s\n{(stdout + stderr)[-6000:]}')
    out = stdout + stderr
    assert proc.returncode == 0, f'torchrun exited {proc.returncode}\n{out[-6000:]}'

    # It did die and come back: the kill, the agent seeing it, and a second attempt that resumed by itself.
    killed = re.search(rf'rank 1 kills itself \(SIGKILL\) before batch {FAIL_AT} at ([\d.]+)', out)
    detected = [line for line in out.splitlines() if 'exitcode: -9' in line and 'local_rank: 1' in line]
    assert killed and len(detected) == 1, out[-6000:]
    assert re.search(r'attempt 0: .* resumed from scratch', out)
    result = json.loads(summary.read_text())
    assert result['attempt'] == 1 and result['resumed_from'] == str(checkpoint)
    assert result['resumed_at'] == 6 and result['steps'] == result['total_steps'] == 8

    # ... and the run ends as if nothing had happened.
    got, want = (torch.load(p, weights_only=True) for p in (checkpoint, reference))
    assert got['model'].keys() == want['model'].keys()
    for name, tensor in want['model'].items():
        assert torch.equal(got['model'][name], tensor), f'weights differ in {name}'
    for index, state in want['optimizer']['state'].items():
        assert torch.equal(got['optimizer']['state'][index]['momentum_buffer'], state['momentum_buffer'])
    assert got['mixer'] == want['mixer'] and got['mixer']['batch'] == 8
    assert result['eval_accuracy'] == uninterrupted['eval_accuracy']

    t_kill = float(killed.group(1))
    timeline = result['timeline']
    print(f"\nrestart timings (wall clock; a loaded 2-core machine, noisy): torchrun ran {time.time() - began:.1f} s; "
          f"kill -> agent saw exit -9 {_agent_time(detected[0]) - t_kill:.2f} s; "
          f"kill -> attempt 1 in main() {timeline['started'] - t_kill:.2f} s (agent stop, new rendezvous, spawn, "
          f"imports); main() -> group up {timeline['group_up'] - timeline['started']:.2f} s; "
          f"group up -> checkpoint loaded {timeline['resumed'] - timeline['group_up']:.2f} s (data, model, "
          f"checkpoint); -> first batch trained {timeline['first_batch'] - timeline['resumed']:.2f} s; "
          f"kill -> training again {timeline['first_batch'] - t_kill:.2f} s")


@pytest.mark.parametrize('argv, match', [
    (['--save-every', '3'], '--save-every and --resume auto need --save PATH'),
    (['--resume', 'auto'], '--save-every and --resume auto need --save PATH'),
    (['--save', 'x.pt', '--save-every', '0'], '--save-every must be >= 1, got 0'),
    (['--arrival-timeout', '-1'], '--arrival-timeout must be >= 0 seconds, got -1.0'),
    (['--fail-at', '-1'], '--fail-at must be >= 0, got -1'),
])
def test_the_restart_flags_refuse_bad_values_naming_them(argv, match, capsys):
    with pytest.raises(SystemExit):
        train_plain.parse_args(argv)
    assert match in capsys.readouterr().err


def test_resume_auto_starts_fresh_without_a_checkpoint_and_fail_at_needs_two_ranks(tmp_path):
    args = train_plain.parse_args(['--save', str(tmp_path / 'none.pt'), '--resume', 'auto'])
    assert train_plain._resume_path(args) is None
    (tmp_path / 'none.pt').write_bytes(b'')
    assert train_plain._resume_path(args) == str(tmp_path / 'none.pt')
    with pytest.raises(ValueError, match='--fail-at 2 kills rank 1: it needs 2 ranks or more, got 1'):
        train_plain.main([*ARGS, '--fail-at', '2'])

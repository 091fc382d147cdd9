"""``dist_cutmix.accelerate.AcceleratedMixer`` under the real ``accelerate launch``, two CPU processes (gloo).

Each launch runs tests/helpers/accelerate_loop.py in fresh processes and is shared by the tests that read it (one
launch per pytest session, also across xdist workers). Two processes mix as one process mixing the concatenated
batch; ``save_state`` / ``load_state`` resume bit for bit (mixed batches and final weights) from mid-epoch 0,
mid-epoch 1 and an epoch end; the loader settings that cannot resume in order are refused on every process; a
global mixer that a launcher left alone warns. What starts two CPU processes here:
``accelerate launch --multi_gpu --num_processes 2`` with ``Accelerator(cpu=True)`` (``--cpu --num_processes 2``
starts one).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

pytest.importorskip('accelerate', reason='needs the accelerate extra')

import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from dist_cutmix import Mixer, SoftTargetAccuracy  # noqa: E402
from tests.helpers import accelerate_loop as loop  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 240  # one launch: three processes importing torch and Accelerate, on two cores shared with others
PER_EPOCH = loop.N // (loop.BATCH * 2)  # batches per process and epoch, with two processes
TOTAL = PER_EPOCH * loop.EPOCHS
TWO_CPU_PROCESSES = ('--multi_gpu', '--num_processes', '2', '--main_process_port', '0')


def _launch(out: Path, phase: str, launcher: tuple[str, ...], *script_args: str) -> None:
    """Run accelerate_loop.py ``phase`` under ``accelerate launch <launcher>``; fail with its output if it fails."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('ACCELERATE_', 'TORCHELASTIC_')) and k not in (
               'WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1',
               HF_HOME=str(out / 'hf'))  # no user's default_config.yaml changes the launch
    command = [sys.executable, '-m', 'accelerate.commands.launch', *launcher, '--num_machines', '1',
               # as a module: run as a path, tests/helpers/ would come first on sys.path and its cuda.py shadow torch's
               '--mixed_precision', 'no', '--dynamo_backend', 'no', '--module', loop.__name__, phase, str(out),
               *script_args]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: it and the processes it started
        output, _ = proc.communicate()
        pytest.fail(f'{" ".join(command)} ran past {DEADLINE_S} s:\n{output[-6000:]}')
    if proc.returncode != 0:
        pytest.fail(f'{" ".join(command)} exited {proc.returncode}:\n{output[-6000:]}')


def _once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None],
          folder: str | None = None) -> Path:
    """``make(folder)`` once per session, whichever xdist worker comes first; the others wait and share it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # the session's folder, shared by its workers
    out = root / f'accelerate_door_{folder or name}'
    with FileLock(str(root / f'accelerate_door_{name}.lock')):
        if not (out / f'{name}.done').exists():
            if folder is None:
                shutil.rmtree(out, ignore_errors=True)
            out.mkdir(exist_ok=True)
            make(out)
            (out / f'{name}.done').touch()
    return out


def _read(out: Path, phase: str) -> list[dict]:
    files = sorted(out.glob(f'{phase}_*.pt'))
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope='session')
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = _once(tmp_path_factory, 'train', lambda o: _launch(o, 'train', TWO_CPU_PROCESSES))
    ranks = _read(out, 'train')
    assert [(r['rank'], r['world']) for r in ranks] == [(0, 2), (1, 2)], 'two processes did not start'
    return out, ranks


@pytest.fixture(scope='session')
def resumed(tmp_path_factory: pytest.TempPathFactory, trained) -> list[dict]:
    out = _once(tmp_path_factory, 'resume', lambda o: _launch(o, 'resume', TWO_CPU_PROCESSES), folder='train')
    ranks = _read(out, 'resume')
    assert [(r['rank'], r['world']) for r in ranks] == [(0, 2), (1, 2)], 'two processes did not start'
    return ranks


def _mixer(seed: int) -> Mixer:
    args = {k: v for k, v in loop.RECIPE.items() if k != 'mode'}
    return Mixer(**args, mode='global', seed=seed)


def test_two_processes_mix_as_one_process_mixing_the_concatenated_batch(trained) -> None:
    _, ranks = trained
    seed = ranks[0]['seed']
    assert ranks[1]['seed'] == seed  # seed=None: process 0's, agreed at the first batch
    one = _mixer(seed)  # no process group here: one process, the two batches end to end
    dataset = loop.data().tensors[0].flatten(1)
    for b in range(TOTAL):
        seen = [r['seen'][b] for r in ranks]
        assert [s['batch'] for s in seen] == [b, b]
        want_x, want_y = one(torch.cat([s['x'] for s in seen]), torch.cat([s['y'] for s in seen]))
        torch.testing.assert_close(torch.cat([s['mixed_x'] for s in seen]), want_x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([s['mixed_y'] for s in seen]), want_y, rtol=0, atol=0)
    assert any(0 < s['cross'] < 1 for s in ranks[0]['seen'])  # images did cross between the processes
    for epoch in range(loop.EPOCHS):  # the processes shared each epoch's samples out, each sample once
        xs = torch.cat([s['x'] for r in ranks for s in r['seen'] if s['epoch'] == epoch]).flatten(1)
        index = [int((dataset == row).all(dim=1).nonzero()) for row in xs]
        assert sorted(index) == list(range(loop.N))
    assert ranks[0]['state'] == ranks[1]['state']
    assert (ranks[0]['state']['batch'], ranks[0]['state']['world_size']) == (TOTAL, 2)


def test_the_synced_soft_accuracy_equals_one_process_scoring_both_processes_batches(trained) -> None:
    _, ranks = trained
    differs_from_local = False
    for epoch in range(loop.EPOCHS):
        both, local = SoftTargetAccuracy(loop.K), SoftTargetAccuracy(loop.K)
        for r in ranks:
            for s in r['seen']:
                if s['epoch'] == epoch:
                    both.update(s['logits'], s['mixed_y'])
                    if r['rank'] == 0:
                        local.update(s['logits'], s['mixed_y'])
        for r in ranks:
            assert r['accuracies'][epoch] == pytest.approx(float(both.compute()), rel=1e-6)
        differs_from_local |= float(local.compute()) != pytest.approx(float(both.compute()), rel=1e-6)
    assert differs_from_local  # compute() did sync: process 0's own batches alone score otherwise


def test_save_state_keeps_the_mixers_batch_count_seed_and_world_size(trained) -> None:
    out, ranks = trained
    state = torch.load(out / 'ck_7' / 'custom_checkpoint_0.pkl', weights_only=True)  # plain values only
    assert (state['batch'], state['seed'], state['world_size'], state['mode']) == (7, ranks[0]['seed'], 2, 'global')


@pytest.mark.parametrize('stop', [7, 2, 10], ids=['mid-epoch-1', 'mid-epoch-0', 'end-of-epoch-1'])
def test_a_run_resumed_by_load_state_mixes_and_trains_bit_for_bit_as_the_uninterrupted_one(trained, resumed,
                                                                                           stop: int) -> None:
    _, straight = trained
    for rank in (0, 1):
        want, got = straight[rank], resumed[rank][stop]
        assert got['start'] == stop // PER_EPOCH
        assert [s['batch'] for s in got['seen']] == list(range(stop, TOTAL))  # none skipped, none repeated
        for s in got['seen']:
            w = want['seen'][s['batch']]
            assert s['epoch'] == w['epoch']
            for key in ('x', 'y', 'mixed_x', 'mixed_y', 'logits'):  # the same images, mixed the same way
                torch.testing.assert_close(s[key], w[key], rtol=0, atol=0, msg=f'batch {s["batch"]}: {key}')
        assert got['seed'] == want['seed'] and got['state'] == want['state']
        for name, value in want['weights'].items():
            torch.testing.assert_close(got['weights'][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize('setting, said', [
    ('shuffle', 'use_seedable_sampler=True'),
    ('weighted', 'its sampler WeightedRandomSampler has no set_epoch'),
    ('dispatch', 'dispatch_batches=True with 2 processes'),
    ('uneven', 'different lengths (process 0: 6, process 1: 5)'),
    ('sequential', 'accepted: epoch 0'),
    ('seedable', 'accepted: epoch 0'),
])
def test_loader_settings_that_cannot_resume_in_order_are_refused_on_every_process(trained, setting: str,
                                                                                  said: str) -> None:
    _, ranks = trained
    for r in ranks:
        assert said in r['refusals'][setting], r['refusals'][setting]


def test_a_global_mixer_warns_when_accelerate_launch_cpu_starts_one_of_two_processes(tmp_path_factory,
                                                                                    trained) -> None:
    checkpoint = str(trained[0] / 'ck_7')
    out = _once(tmp_path_factory, 'one',
                lambda o: _launch(o, 'one', ('--cpu', '--num_processes', '2'), '--checkpoint', checkpoint))
    (result,) = _read(out, 'one')  # measured: one process, though two were asked for
    assert result['num_processes'] == 1 and result['env']['WORLD_SIZE'] is None
    (warning,) = result['global']
    assert "AcceleratedMixer(mode='global') finds one process" in warning and 'accelerate launch --cpu' in warning
    assert result['local'] == []  # a local mixer mixes the same either way: no warning
    assert 'resume() takes the loader that accelerator.prepare returned' in result['plain loader']
    assert 'accelerator must be an accelerate.Accelerator, got accelerator=None' in result['no accelerator']
    # and a checkpoint of two processes, loaded in one, is refused: its batch 7 is another place in the data
    assert 'written by 2 processes and this run has 1' in result['other world']


def test_a_global_mixer_warns_in_each_process_that_a_gpu_launch_without_gpus_left_alone(tmp_path_factory) -> None:
    out = _once(tmp_path_factory, 'alone',
                lambda o: _launch(o, 'one', ('--multi_gpu', '--num_processes', '2', '--main_process_port', '0'),
                                  '--no-cpu'))
    results = _read(out, 'one')
    assert len(results) == 2  # measured: two processes, each its own world of one
    for result in results:
        assert result['num_processes'] == 1 and result['env']['WORLD_SIZE'] == '2'
        (warning,) = result['global']
        assert 'WORLD_SIZE=2' in warning and 'cpu=True' in warning
        assert result['local'] == []


def test_import_dist_cutmix_does_not_import_accelerate() -> None:
    code = 'import sys, dist_cutmix; assert "accelerate" not in sys.modules, sorted(sys.modules)'
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, check=True, timeout=120)

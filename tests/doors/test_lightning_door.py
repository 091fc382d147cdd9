"""The Lightning door on the real ``lightning`` package: ``MixCallback`` mixes every training batch on its device,
over two DDP ranks as one process mixes the concatenated batch; a run resumed from Lightning's own checkpoint
(mid-epoch, in a later epoch, at an epoch end, with workers, under gradient accumulation) equals the
uninterrupted one bit for bit with ``ResumableDataLoader``, and a plain loader's mid-epoch resume is refused
before the first batch; sanity-check, validation and test batches are left alone; stock train metrics are
refused with the fix named; the soft-target train accuracy it logs is the true one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip('lightning', reason='needs the lightning extra')

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from dist_cutmix import Mixer, SoftTargetAccuracy
from dist_cutmix.lightning import MixCallback, ResumableDataLoader
from tests.helpers.lightning_run import (
    DDP_BATCH,
    DDP_EPOCHS,
    DDP_RESUME_STEP,
    DDP_SAMPLES,
    MIX_SEED,
    RECIPE,
    K,
    Tiny,
    dataset,
    make_run,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLES, BATCH, EPOCHS = 16, 4, 3  # 4 batches an epoch, 12 in all
DEADLINE_S = 240


@pytest.fixture(autouse=True)
def _own_seed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # seed_everything writes PL_GLOBAL_SEED into os.environ; keep it from leaking into later tests.
    monkeypatch.delenv('PL_GLOBAL_SEED', raising=False)
    monkeypatch.delenv('PL_SEED_WORKERS', raising=False)


def _equal_batches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for b, ((gx, gy), (wx, wy)) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(gx, wx) and torch.equal(gy, wy), f'batch {b} differs'


def _equal_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f'{name} differs'


def _reference_mix(raw: list, **mixer_args: Any) -> list:
    """One Mixer in this process (no process group), fed the raw batches in order."""
    mixer = Mixer(**{**RECIPE, 'mode': 'global', 'num_classes': K, 'seed': MIX_SEED, **mixer_args})
    return [mixer(x, y) for x, y in raw]


def _fit(ckpt_path: str | None = None, loader: Any = None, callbacks: tuple = (), **trainer_args: Any) -> dict:
    trainer_args.setdefault('max_epochs', EPOCHS)
    trainer, model, record, _ = make_run(callbacks=callbacks, **trainer_args)
    loader = loader if loader is not None else ResumableDataLoader(dataset(SAMPLES), batch_size=BATCH, shuffle=True)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return record.result(trainer, model)


def _every_step(path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=path, filename='{step}', every_n_train_steps=1, save_top_k=-1)


def _epoch_end(path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=path, filename='end-{epoch}', every_n_epochs=1, save_top_k=-1,
                           save_on_train_epoch_end=True)


# ----------------------------------------------------------------------------- two DDP ranks


def _run_script(strategy: str, out: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ('PL_GLOBAL_SEED', 'LOCAL_RANK', 'RANK', 'WORLD_SIZE', 'MASTER_PORT', 'MASTER_ADDR')}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, '-m', 'tests.helpers.lightning_run', strategy, str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # Lightning's rank 1 is in the same session
        output, _ = proc.communicate()
        raise AssertionError(f'{strategy} run passed its {DEADLINE_S} s deadline:\n{output[-4000:]}') from None
    assert proc.returncode == 0, f'{strategy} run failed:\n{output[-4000:]}'


@pytest.mark.parametrize('strategy', ['ddp', 'ddp_spawn'])
def test_two_ddp_ranks_mix_and_train_as_one_process_on_the_concatenated_batch(strategy: str, tmp_path: Path) -> None:
    _run_script(strategy, tmp_path)
    ranks = [torch.load(tmp_path / f'full_rank{r}.pt') for r in (0, 1)]
    steps = DDP_EPOCHS * DDP_SAMPLES // (2 * DDP_BATCH)
    for r, got in enumerate(ranks):
        assert got['world_size'] == 2 and got['batch'] == steps and len(got['mixed']) == steps, f'rank {r}'
    # the loader shards by rank: each epoch the two ranks hold every sample once, in a new order each epoch
    per_epoch = steps // DDP_EPOCHS
    images = dataset(DDP_SAMPLES).tensors[0]
    orders = []
    for e in range(DDP_EPOCHS):
        seen = torch.cat([x for got in ranks for x, _ in got['raw'][e * per_epoch:(e + 1) * per_epoch]])
        index = [int((images == img).flatten(1).all(1).nonzero()) for img in seen]
        assert sorted(index) == list(range(DDP_SAMPLES)), f'epoch {e}'
        orders.append(index)
    assert orders[0] != orders[1]
    # global mixing: the ranks' mixed batches end to end are one process mixing their raw batches end to end
    raw = [(torch.cat([ranks[0]['raw'][s][0], ranks[1]['raw'][s][0]]),
            torch.cat([ranks[0]['raw'][s][1], ranks[1]['raw'][s][1]])) for s in range(steps)]
    mixed = [(torch.cat([ranks[0]['mixed'][s][0], ranks[1]['mixed'][s][0]]),
              torch.cat([ranks[0]['mixed'][s][1], ranks[1]['mixed'][s][1]])) for s in range(steps)]
    _equal_batches(mixed, _reference_mix(raw))
    assert any(float(d['partner_rank'].ne(r).float().mean()) > 0 for r, got in enumerate(ranks) for d in got['draws'])
    _equal_weights(ranks[1]['weights'], ranks[0]['weights'])
    assert ranks[0]['logged'] == ranks[1]['logged']  # λ and the share are global draws; the accuracy is synced
    assert 0 < ranks[0]['logged']['mix/cross_rank_fraction'] <= 1
    # ... and training: one process on the concatenated batches (batch 8, in that order) mixes the same batches and
    # ends at the same weights, up to the rounding of DDP's gradient average (mean of two means, not one mean)
    one = TensorDataset(torch.cat([x for x, _ in raw]), torch.cat([y for _, y in raw]))
    trainer, model, record, _ = make_run(max_epochs=1)
    trainer.fit(model, DataLoader(one, batch_size=2 * DDP_BATCH))
    _equal_batches(model.mixed, mixed)
    for name, weight in record.result(trainer, model)['weights'].items():
        torch.testing.assert_close(weight, ranks[0]['weights'][name], rtol=0, atol=1e-6)
    if strategy == 'ddp_spawn':  # as docs/lightning.md says: the launching process's callback keeps its old state
        assert (tmp_path / 'launcher.txt').read_text() == 'mixer.batch 0'
    if strategy == 'ddp':  # both ranks resumed from a checkpoint inside epoch 1: the rest of the run bit for bit
        for r, got in enumerate(ranks):
            resumed = torch.load(tmp_path / f'resumed_rank{r}.pt')
            assert resumed['batch'] == steps, f'rank {r}'
            _equal_batches(resumed['raw'], got['raw'][DDP_RESUME_STEP:])
            _equal_batches(resumed['mixed'], got['mixed'][DDP_RESUME_STEP:])
            _equal_weights(resumed['weights'], got['weights'])
            # ranks whose loaders give 4 and 3 batches: refused on both, naming each count, before any batch
            refused = (tmp_path / f'uneven_rank{r}.txt').read_text()
            assert 'rank 0: 4, rank 1: 3' in refused and refused.endswith('mixed 0'), refused


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Three epochs of four batches, checkpointed after every batch and at every epoch's end."""
    path = tmp_path_factory.mktemp('lightning_ckpt')
    os.environ.pop('PL_GLOBAL_SEED', None)
    try:
        return _fit(callbacks=(_every_step(path), _epoch_end(path))), path
    finally:
        os.environ.pop('PL_GLOBAL_SEED', None)


@pytest.mark.parametrize(('checkpoint', 'done'), [
    ('step=2.ckpt', 2),  # inside the first epoch
    ('step=6.ckpt', 6),  # inside a later epoch
    ('step=4.ckpt', 4),  # after the first epoch's last batch, before its end hooks
    ('end-epoch=0.ckpt', 4),  # at the first epoch's end
], ids=['mid-epoch-0', 'mid-epoch-1', 'last-batch', 'epoch-end'])
def test_a_run_resumed_from_lightnings_checkpoint_equals_the_uninterrupted_one(uninterrupted, checkpoint: str,
                                                                               done: int) -> None:
    full, path = uninterrupted
    assert full['batch'] == 12 and full['positions'][:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    # the uninterrupted run is a Mixer fed its batches, and every epoch's order differs
    _equal_batches(full['mixed'], _reference_mix(full['raw']))
    assert not torch.equal(full['raw'][0][0], full['raw'][4][0])
    resumed = _fit(ckpt_path=str(path / checkpoint))
    assert resumed['positions'] == full['positions'][done:]
    _equal_batches(resumed['raw'], full['raw'][done:])
    _equal_batches(resumed['mixed'], full['mixed'][done:])
    assert resumed['batch'] == full['batch'] and resumed['seed'] == full['seed'] == MIX_SEED
    _equal_weights(resumed['weights'], full['weights'])


def test_a_plain_dataloader_is_refused_a_mid_epoch_resume_before_the_first_batch(tmp_path: Path) -> None:
    plain = DataLoader(dataset(SAMPLES), batch_size=BATCH, shuffle=True)
    _fit(loader=plain, callbacks=(_every_step(tmp_path), _epoch_end(tmp_path)), max_epochs=2)
    trainer, model, record, _ = make_run(max_epochs=2)
    with pytest.raises(RuntimeError, match=r'after batch 2 of epoch 1.*DataLoader\) cannot resume inside an epoch'):
        trainer.fit(model, plain, ckpt_path=str(tmp_path / 'step=6.ckpt'))
    assert model.mixed == [] and record.raw == []  # nothing was mixed or trained
    # ... nor with a ResumableDataLoader: the plain loader's checkpoint holds no position for it
    trainer, model, record, _ = make_run(max_epochs=2)
    with pytest.raises(RuntimeError, match=r'restored the ResumableDataLoader to None'):
        trainer.fit(model, ResumableDataLoader(dataset(SAMPLES), batch_size=BATCH),
                    ckpt_path=str(tmp_path / 'step=6.ckpt'))
    assert model.mixed == [] and record.raw == []
    # at an epoch end it may resume, with a warning: a shuffled plain loader's order comes from the global RNG
    trainer, model, _, _ = make_run(max_epochs=2)
    with pytest.warns(UserWarning, match='data order of the resumed epochs will differ.*RandomSampler'):
        trainer.fit(model, plain, ckpt_path=str(tmp_path / 'end-epoch=0.ckpt'))
    assert len(model.mixed) == 4


def test_a_mismatched_resume_is_refused(uninterrupted, tmp_path: Path) -> None:
    _, path = uninterrupted
    other = MixCallback(**{**RECIPE, 'cutmix_alpha': 0.5}, mode='global', num_classes=K, seed=MIX_SEED)
    trainer, model, _, _ = make_run(max_epochs=EPOCHS, mixing=other)
    loader = ResumableDataLoader(dataset(SAMPLES), batch_size=BATCH, shuffle=True)
    with pytest.raises(ValueError, match=r'cannot resume this Mixer.*spec='):
        trainer.fit(model, loader, ckpt_path=str(path / 'step=6.ckpt'))
    assert model.mixed == []
    # a checkpoint of two ranks resumed on one: per-rank draws (mode='local') and per-rank shards differ
    ckpt = torch.load(path / 'step=6.ckpt', weights_only=False)
    ckpt['callbacks']['MixCallback']['mixer'].update(mode='local', world_size=2)
    torch.save(ckpt, tmp_path / 'local.ckpt')
    local = MixCallback(**RECIPE, mode='local', num_classes=K, seed=MIX_SEED)
    trainer, model, _, _ = make_run(max_epochs=EPOCHS, mixing=local)
    with pytest.raises(ValueError, match=r'world_size=1 \(checkpoint: 2\).*mode=.global'):
        trainer.fit(model, loader, ckpt_path=str(tmp_path / 'local.ckpt'))
    ckpt = torch.load(path / 'step=6.ckpt', weights_only=False)
    ckpt['loops']['fit_loop']['state_dict']['combined_loader'][0]['world_size'] = 2
    torch.save(ckpt, tmp_path / 'ranks.ckpt')
    trainer, model, _, _ = make_run(max_epochs=EPOCHS)
    with pytest.raises(ValueError, match=r'ResumableDataLoader cannot resume.*world_size=1 \(checkpoint: 2\)'):
        trainer.fit(model, loader, ckpt_path=str(tmp_path / 'ranks.ckpt'))
    assert model.mixed == []


def test_gradient_accumulation_counts_batches_and_resumes(tmp_path: Path) -> None:
    full = _fit(callbacks=(_every_step(tmp_path),), accumulate_grad_batches=2, max_epochs=2)
    assert full['batch'] == 8 and full['global_step'] == 4  # two batches an optimizer step
    _equal_batches(full['mixed'], _reference_mix(full['raw']))  # batch b draws from (seed, b): no pair repeats
    lams = [tuple(d['lam'].flatten().tolist()) + tuple(d['partner_index'].tolist()) for d in full['draws']]
    assert len(set(lams)) == 8
    resumed = _fit(ckpt_path=str(tmp_path / 'step=3.ckpt'), accumulate_grad_batches=2, max_epochs=2)
    assert resumed['batch'] == 8 and resumed['global_step'] == 4
    _equal_batches(resumed['mixed'], full['mixed'][6:])
    _equal_weights(resumed['weights'], full['weights'])


class _Dicts(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.images, self.labels = dataset(SAMPLES).tensors

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {'image': self.images[i], 'label': self.labels[i]}


class _DictModel(Tiny):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.mixed.append((batch['image'].clone(), batch['label'].clone()))
        return F.cross_entropy(self(batch['image']), batch['label'])


def test_dict_batches_mix_locally_per_sample() -> None:
    args = dict(**RECIPE, mode='local', per_sample=True, num_classes=K, seed=MIX_SEED)
    mixing = MixCallback(input_key='image', target_key='label', **args)
    trainer, _, record, _ = make_run(max_epochs=2, mixing=mixing)
    model = _DictModel()
    trainer.fit(model, ResumableDataLoader(_Dicts(), batch_size=BATCH, shuffle=True))
    mixer = Mixer(**args)
    _equal_batches(model.mixed, [mixer(x, y) for x, y in record.raw])
    assert mixing.mixer.batch == 8 and len({tuple(d['lam'].tolist()) for d in record.draws}) == 8


# ----------------------------------------------------------------------------- what is left alone


def test_sanity_check_validation_and_test_batches_are_left_alone() -> None:
    val = DataLoader(dataset(8, seed=1), batch_size=BATCH)
    want = list(val)
    trainer, model, record, mixing = make_run(max_epochs=1, num_sanity_val_steps=1)
    trainer.fit(model, ResumableDataLoader(dataset(SAMPLES), batch_size=BATCH), val)
    trainer.validate(model, val, verbose=False)
    trainer.test(model, val, verbose=False)
    assert mixing.mixer.batch == 4 and len(model.mixed) == 4
    assert [stage for stage, _, _ in model.evaluated] == ['sanity_check'] + ['validate'] * 4 + ['test'] * 2
    expect = want[:1] + want + want + want
    _equal_batches([(x, y) for _, x, y in model.evaluated], expect)
    assert all(y.dtype == torch.long and y.ndim == 1 for _, _, y in model.evaluated)
    assert all(y.shape == (BATCH, K) for _, y in model.mixed)  # ... while training batches were mixed


class _Workers(pl.LightningDataModule):
    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(dataset(SAMPLES), batch_size=BATCH, shuffle=True, num_workers=2,
                                   multiprocessing_context='fork')


def test_a_datamodule_with_workers_draws_anew_every_epoch_and_resumes_in_a_later_epoch(tmp_path: Path) -> None:
    trainer, model, record, _ = make_run(max_epochs=EPOCHS, callbacks=(_every_step(tmp_path),))
    trainer.fit(model, datamodule=_Workers())
    full = record.result(trainer, model)
    _equal_batches(full['mixed'], _reference_mix(full['raw']))
    # the classic trap is an augmentation that repeats every epoch: here batch i of each epoch draws anew
    draws = [(d['lam'].tolist(), d['box'].tolist(), d['partner_index'].tolist()) for d in full['draws']]
    for i in range(SAMPLES // BATCH):
        assert len({str(draws[e * 4 + i]) for e in range(EPOCHS)}) == EPOCHS, f'batch {i}'
    # resumed inside epoch 1: Lightning starts the loader before it sets the epoch; the loader waits for it
    trainer, model, record, _ = make_run(max_epochs=EPOCHS)
    trainer.fit(model, datamodule=_Workers(), ckpt_path=str(tmp_path / 'step=6.ckpt'))
    resumed = record.result(trainer, model)
    _equal_batches(resumed['raw'], full['raw'][6:])
    _equal_batches(resumed['mixed'], full['mixed'][6:])
    _equal_weights(resumed['weights'], full['weights'])


# ----------------------------------------------------------------------------- metrics and logging


class _StockMetric(Tiny):
    def __init__(self, call: str) -> None:
        super().__init__()
        self.call = call
        self.train_acc = MulticlassAccuracy(num_classes=K)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.call == 'forward':
            self.log('train_acc', self.train_acc(logits, y))
        else:
            self.train_acc.update(logits, y)
        return F.cross_entropy(logits, y)


class _SoftMetric(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.train_acc = SoftTargetAccuracy(num_classes=K)
        self.val_acc = MulticlassAccuracy(num_classes=K)
        self.epoch_acc: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.train_acc.update(logits, y)
        return F.cross_entropy(logits, y)

    def on_train_epoch_end(self) -> None:
        self.epoch_acc.append(float(self.train_acc.compute()))
        self.train_acc.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_acc.update(self(batch[0]), batch[1])


@pytest.mark.parametrize('call', ['forward', 'update'])
def test_a_stock_train_metric_is_refused_with_the_fix_named(call: str) -> None:
    trainer, _, _, _ = make_run(max_epochs=1)
    model = _StockMetric(call)
    own = model.train_acc.update
    with pytest.raises(ValueError, match=r"'train_acc' \(MulticlassAccuracy\).*SoftTargetAccuracy"):
        trainer.fit(model, ResumableDataLoader(dataset(SAMPLES), batch_size=BATCH))
    assert model.train_acc.update is own  # the guard is gone after fit: the metric is the user's own again


def test_the_logged_train_accuracy_is_the_soft_target_accuracy_and_val_metrics_are_left_alone() -> None:
    trainer, _, record, mixing = make_run(max_epochs=1, num_sanity_val_steps=1)
    model = _SoftMetric()
    val = DataLoader(dataset(8, seed=1), batch_size=BATCH)
    trainer.fit(model, ResumableDataLoader(dataset(SAMPLES), batch_size=BATCH, shuffle=True), val)
    logged = trainer.callback_metrics
    # the callback's expected accuracy of the module's logits equals the user's own SoftTargetAccuracy
    assert float(logged['mix/train_accuracy_epoch']) == pytest.approx(model.epoch_acc[0], abs=1e-6)
    assert float(logged['mix/lambda']) == mixing.mixer.last.mean_label_lam
    assert 0.0 <= float(logged['mix/cross_rank_fraction']) <= 1.0  # one process: no partner elsewhere
    assert int(model.val_acc.update_count) == 3  # sanity check + two validation batches, index labels
    assert len(record.raw) == 4


def test_batches_it_cannot_write_into_are_refused() -> None:
    def as_tuple(samples: list) -> tuple:
        return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])

    trainer, model, _, _ = make_run(max_epochs=1)
    with pytest.raises(TypeError, match='must be a list.*got a tuple batch.*return a list'):
        trainer.fit(model, ResumableDataLoader(dataset(SAMPLES), batch_size=BATCH, collate_fn=as_tuple))
    assert model.mixed == []


def test_importing_dist_cutmix_does_not_import_lightning() -> None:
    code = "import sys, dist_cutmix; assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') " \
           "for m in sys.modules), sorted(m for m in sys.modules if 'lightning' in m)"
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, env={**os.environ, 'PYTHONPATH': str(ROOT)},
                   check=True, timeout=120)

"""A training loop with ``dist_cutmix.accelerate.AcceleratedMixer``, run by ``accelerate launch`` for
tests/doors/test_accelerate_door.py; each process writes what it saw to ``OUT/<phase>_<rank>.pt``.

``python accelerate_loop.py PHASE OUT``, under a launcher:

* ``train``: three epochs of five batches per process on a shuffled loader, every batch mixed in
  ``mode='global'`` with ``seed=None``, ``accelerator.save_state`` after batches 2, 7 and 10 (mid-epoch 0,
  mid-epoch 1, the end of epoch 1); records each batch before and after mixing, the logits, the synced
  ``SoftTargetAccuracy`` of each epoch and the final weights. Then the loader settings ``resume`` must refuse.
* ``resume``: fresh model, optimizer and loader, ``load_state`` from each checkpoint (the later epoch's first,
  in a fresh process), ``mixer.resume(loader)``, then the same loop to the end.
* ``one``: the Accelerator and mixers of a process that a launcher meant to be one of several; records the
  warnings, the errors of bad arguments and (``--checkpoint PATH``) resuming a two-process checkpoint.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from dist_cutmix import SoftTargetAccuracy
from dist_cutmix.accelerate import AcceleratedMixer

K, N, BATCH, EPOCHS = 5, 40, 4, 3
RECIPE = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=K, mode='global')
STOPS = (7, 2, 10)  # batches after which the uninterrupted run saves; resumed in this order


def seedable() -> Accelerator:
    return Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, K, (n,), generator=g))


def build(accelerator: Accelerator) -> tuple:
    torch.manual_seed(0)  # the model's init, and the seedable sampler's seed (torch.random.initial_seed())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, K))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # momentum: the optimizer state matters
    loader = DataLoader(data(), batch_size=BATCH, shuffle=True)
    mixer = AcceleratedMixer(accelerator, **RECIPE)  # seed=None: drawn at the first batch, kept by save_state
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return model, optimizer, loader, mixer


def train(accelerator, model, optimizer, loader, mixer, out: str, stops: tuple = ()) -> dict:
    accuracy = SoftTargetAccuracy(num_classes=K).to(accelerator.device)
    start, batches = mixer.resume(loader)
    seen, accuracies = [], []
    for epoch in range(start, EPOCHS):
        for x, y in (batches if epoch == start else loader):  # no set_epoch: as Accelerate's own examples
            batch = mixer.batch
            mixed_x, mixed_y = mixer(x, y)
            logits = model(mixed_x)
            loss = F.cross_entropy(logits, mixed_y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            accuracy.update(logits.detach(), mixed_y)
            seen.append(dict(batch=batch, epoch=epoch, x=x, y=y, mixed_x=mixed_x, mixed_y=mixed_y,
                             logits=logits.detach(), cross=mixer.last.cross_rank_fraction))
            if mixer.batch in stops:
                accelerator.save_state(os.path.join(out, f'ck_{mixer.batch}'))
        accuracies.append(float(accuracy.compute()))  # synced over the processes
        accuracy.reset()
    weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return dict(start=start, seen=seen, accuracies=accuracies, weights=weights, seed=mixer.seed,
                state=mixer.state_dict())


def refusals() -> dict:
    """What resume() says of each loader setting, on this process."""
    cases = {
        'shuffle': (dict(), dict(shuffle=True), N),
        'weighted': (dict(), dict(sampler=WeightedRandomSampler(torch.ones(N), N)), N),
        'dispatch': (dict(use_seedable_sampler=True, dispatch_batches=True), dict(shuffle=True), N),
        'uneven': (dict(use_seedable_sampler=True, even_batches=False), dict(shuffle=True), N + 2),
        'sequential': (dict(), dict(shuffle=False), N),
        'seedable': (dict(use_seedable_sampler=True), dict(shuffle=True), N),
    }
    said = {}
    for name, (config, loader_args, n) in cases.items():
        accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(**config))
        mixer = AcceleratedMixer(accelerator, **RECIPE)
        loader = accelerator.prepare(DataLoader(data(n), batch_size=BATCH, **loader_args))
        try:
            epoch, _ = mixer.resume(loader)
            said[name] = f'accepted: epoch {epoch}'
        except ValueError as e:
            said[name] = str(e)
    return said


def main(phase: str, out: str) -> None:
    if phase == 'one':
        accelerator = Accelerator(cpu='--no-cpu' not in sys.argv)
        result: dict = dict(num_processes=accelerator.num_processes, env={k: os.environ.get(k) for k in (
            'WORLD_SIZE', 'RANK', 'MASTER_ADDR', 'ACCELERATE_USE_CPU')})
        for mode in ('global', 'local'):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                AcceleratedMixer(accelerator, **{**RECIPE, 'mode': mode})
            result[mode] = [str(w.message) for w in caught if 'AcceleratedMixer' in str(w.message)]
        for name, call in (('plain loader', lambda: AcceleratedMixer(accelerator).resume(DataLoader(data()))),
                           ('no accelerator', lambda: AcceleratedMixer(None))):
            try:
                call()
            except TypeError as e:
                result[name] = str(e)
        if '--checkpoint' in sys.argv:  # a two-process checkpoint, resumed in this one process
            accelerator = seedable()  # registering only this run's mixer, as the checkpoint's run did
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the one-process warning, recorded above
                model, optimizer, loader, mixer = build(accelerator)
            accelerator.load_state(sys.argv[sys.argv.index('--checkpoint') + 1])
            try:
                mixer.resume(loader)
            except ValueError as e:
                result['other world'] = str(e)
        torch.save(result, os.path.join(out, f'one_{os.environ.get("RANK", "0")}.pt'))
        return
    accelerator = seedable()
    rank = accelerator.process_index
    if phase == 'train':
        result = train(accelerator, *build(accelerator), out, stops=STOPS)
        result['refusals'] = refusals()
    else:
        result = {}
        for stop in STOPS:
            if stop != STOPS[0]:
                accelerator = seedable()
            model, optimizer, loader, mixer = build(accelerator)
            accelerator.load_state(os.path.join(out, f'ck_{stop}'))
            result[stop] = train(accelerator, model, optimizer, loader, mixer, out)
    result.update(rank=rank, world=accelerator.num_processes)
    torch.save(result, os.path.join(out, f'{phase}_{rank}.pt'))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])

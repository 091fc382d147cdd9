"""``dist_cutmix.Mixer``, the stateful mixer of any loop: it counts batches, resumes bit for bit from its
state_dict, refuses a mismatched resume, stops mixing on ``enabled = False`` but keeps smoothing, and over two
gloo ranks mixes as one process on the concatenated batch."""
from __future__ import annotations

import io
import json

import pytest
import torch

from dist_cutmix import Mixer, MixSpec, mix_batch_across_group, mix_batch_local
from dist_cutmix.distributed import BatchMismatchError
from tests.helpers.spawn import RankError, run_ranks

C, H, W, K = 3, 10, 12, 7
RECIPE = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)


def _batches(count: int, n: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, C, H, W, generator=g), torch.randint(0, K, (n,), generator=g)) for _ in range(count)]


@pytest.mark.parametrize('per_sample', [False, True])
def test_each_call_mixes_the_next_batch_as_the_functional_mixer_does(per_sample: bool) -> None:
    mixer = Mixer(**RECIPE, num_classes=K, seed=5, per_sample=per_sample)
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, switch_prob=0.5, label_smoothing=0.1)
    lams = set()
    for b, (x, y) in enumerate(_batches(4)):
        got_x, got_y = mixer(x, y)
        want = mix_batch_local(x, y, seed=5, batch=b, spec=spec, num_classes=K, per_sample=per_sample)
        torch.testing.assert_close(got_x, want.input, rtol=0, atol=0)
        torch.testing.assert_close(got_y, want.target, rtol=0, atol=0)
        assert mixer.batch == b + 1
        assert mixer.last is not None and torch.equal(mixer.last.partner_index, want.partner_index)
        lams.add(tuple(torch.as_tensor(mixer.last.lam).flatten().tolist()))
    assert len(lams) == 4  # the counter, not a constant, keys the draws


def test_draws_differ_between_batches_and_the_input_is_left_alone() -> None:
    mixer = Mixer(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=K, seed=1)
    x, y = _batches(1, n=8)[0]
    keep = x.clone()
    boxes = set()
    for _ in range(6):
        mixer(x, y)
        boxes.add(tuple(mixer.last.box))
    assert torch.equal(x, keep)  # inplace=False: the caller's batch is untouched
    assert len(boxes) > 1


@pytest.mark.parametrize('save', ['torch', 'json'])
def test_a_stopped_and_resumed_loop_mixes_bit_for_bit_as_the_uninterrupted_one(save: str) -> None:
    data = _batches(7)
    first = Mixer(**RECIPE, num_classes=K, per_sample=True)  # seed=None: drawn at the first batch, kept in the state
    got = [first(x, y) for x, y in data[:3]]
    if save == 'torch':
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    else:
        state = json.loads(json.dumps(first.state_dict()))
    resumed = Mixer(**RECIPE, num_classes=K, per_sample=True)
    resumed.load_state_dict(state)
    # a fresh mixer resumed with the first run's seed: the same draws as a straight run with that seed
    straight = Mixer(**RECIPE, num_classes=K, per_sample=True, seed=first.seed)
    want = [straight(x, y) for x, y in data]
    got += [resumed(x, y) for x, y in data[3:]]
    assert resumed.batch == 7 and resumed.seed == first.seed
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        torch.testing.assert_close(gx, wx, rtol=0, atol=0)
        torch.testing.assert_close(gy, wy, rtol=0, atol=0)


def test_disabled_mixes_nothing_and_keeps_the_label_smoothing() -> None:
    mixer = Mixer(**RECIPE, num_classes=K, seed=3)
    mixer.enabled = False
    x, y = _batches(1)[0]
    out_x, out_y = mixer(x, y)
    torch.testing.assert_close(out_x, x, rtol=0, atol=0)
    smooth = torch.nn.functional.one_hot(y, K).float() * 0.9 + 0.1 / K
    torch.testing.assert_close(out_y, smooth)
    assert mixer.batch == 1  # still counted: enabling again later keeps the uninterrupted run's draws
    assert mixer.state_dict()['enabled'] is False


@pytest.mark.parametrize('change, field', [
    (dict(per_sample=True), 'per_sample'),
    (dict(mixup_alpha=0.2), 'spec'),
    (dict(num_classes=K + 1), 'num_classes'),
    (dict(seed=99), 'seed'),
    (dict(mode='global'), 'mode'),
])
def test_a_mismatched_resume_is_refused_naming_what_differs(change: dict, field: str) -> None:
    args = dict(**RECIPE, num_classes=K, seed=4)
    saved = Mixer(**args)
    saved(*_batches(1)[0])
    other = Mixer(**{**args, **change})
    with pytest.raises(ValueError, match=rf'differs in {field}='):
        other.load_state_dict(saved.state_dict())
    assert other.batch == 0  # nothing was taken from the refused state


def test_a_local_mixer_refuses_a_changed_world_size_and_a_global_one_allows_it() -> None:
    saved = Mixer(**RECIPE, num_classes=K, seed=4)
    state = {**saved.state_dict(), 'world_size': 4}
    with pytest.raises(ValueError, match=r"world_size=1 \(checkpoint: 4\).*mode='global'"):
        Mixer(**RECIPE, num_classes=K, seed=4).load_state_dict(state)
    glob = Mixer(**RECIPE, num_classes=K, seed=4, mode='global')
    glob.load_state_dict({**glob.state_dict(), 'batch': 9, 'world_size': 4})
    assert glob.batch == 9


def test_bad_arguments_name_the_argument_and_value() -> None:
    with pytest.raises(ValueError, match=r'spec= or the mixing arguments, not both.*prob=0.5'):
        Mixer(spec=MixSpec.cutmix(), prob=0.5)
    with pytest.raises(ValueError, match=r"mode must be one of .* got mode='all'"):
        Mixer(mode='all')
    with pytest.raises(ValueError, match=r"group is only used with mode='global'"):
        Mixer(mode='local', group=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r'seed must be an int or None, got seed=1.5'):
        Mixer(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"state\['batch'\] must be an int >= 0, got -1"):
        Mixer(seed=0).load_state_dict({**Mixer(seed=0).state_dict(), 'batch': -1})


def test_node_mode_needs_the_local_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    mixer = Mixer(**RECIPE, num_classes=K, seed=0, mode='node')
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE.*got LOCAL_WORLD_SIZE=None"):
        mixer(*_batches(1)[0])


# ---------------------------------------------------------------------------------------------- two ranks

SIZES = (3, 5)


def _rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return _batches(3, n=SIZES[rank], seed=10 + rank)


def _global_loop(rank: int, world: int, per_sample: bool, seed: int | None) -> dict:
    mixer = Mixer(**RECIPE, num_classes=K, mode='global', per_sample=per_sample, seed=seed)
    out, cross = [], []
    for x, y in _rank_batches(rank):
        out.append(mixer(x, y))
        cross.append(mixer.last.cross_rank_fraction)
    return dict(out=out, seed=mixer.seed, cross=cross, state=mixer.state_dict())


@pytest.mark.parametrize('per_sample', [False, True])
def test_two_ranks_in_global_mode_equal_one_process_on_the_concatenated_batch(tmp_path, per_sample: bool) -> None:
    results = run_ranks(_global_loop, 2, tmp_path, per_sample, None)
    seed = results[0]['seed']
    assert results[1]['seed'] == seed  # seed=None: rank 0's, agreed at the first batch
    assert results[0]['state'] == results[1]['state'] and results[0]['state']['world_size'] == 2
    one = Mixer(**RECIPE, num_classes=K, mode='global', per_sample=per_sample, seed=seed)
    for b in range(3):
        x = torch.cat([_rank_batches(r)[b][0] for r in range(2)])
        y = torch.cat([_rank_batches(r)[b][1] for r in range(2)])
        want_x, want_y = one(x, y)
        torch.testing.assert_close(torch.cat([r['out'][b][0] for r in results]), want_x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([r['out'][b][1] for r in results]), want_y, rtol=0, atol=0)
    # and the one process is the functional mixer with that seed, batch by batch
    spec = MixSpec(cutmix_alpha=1.0, mixup_alpha=0.8, switch_prob=0.5, label_smoothing=0.1)
    x = torch.cat([_rank_batches(r)[2][0] for r in range(2)])
    y = torch.cat([_rank_batches(r)[2][1] for r in range(2)])
    direct = mix_batch_across_group(x, y, seed=seed, batch=2, spec=spec, num_classes=K, per_sample=per_sample)
    torch.testing.assert_close(want_x, direct.input, rtol=0, atol=0)
    # some partner crossed ranks (one batch of 3 + 5 may by chance pair within the ranks: about 1 in 56)
    assert max(results[0]['cross']) > 0 and results[0]['cross'] == results[1]['cross']


def _skipping_rank(rank: int, world: int) -> str:
    mixer = Mixer(**RECIPE, num_classes=K, mode='global', seed=0)
    if rank == 1:
        mixer.batch += 1  # rank 1 skipped a call: its count runs ahead
    try:
        mixer(*_rank_batches(rank)[0])
    except BatchMismatchError as e:
        return str(e)
    return 'mixed'


def test_ranks_at_different_batch_counts_get_an_error_naming_each_count(tmp_path) -> None:
    messages = run_ranks(_skipping_rank, 2, tmp_path)
    for message in messages:
        assert 'rank 0: batch 0:' in message and 'rank 1: batch 1:' in message, message
    with pytest.raises(RankError):  # and a rank body that raises fails the test: the harness can fail
        run_ranks(_raising_rank, 2, tmp_path)


def _raising_rank(rank: int, world: int) -> None:
    mixer = Mixer(**RECIPE, num_classes=K, mode='global', seed=0)
    mixer.batch += rank
    mixer(*_rank_batches(rank)[0])

"""Per-sample boxes and λ across real gloo ranks: W ranks equal one process mixing the concatenated batch and a
plain per-sample loop, keep dtype and layout, and send exactly the crops (each cut with its destination's box)
and labels that change rank."""
from __future__ import annotations

import pytest
import torch

from dist_cutmix import functional as F
from dist_cutmix.mixer import mix_batch_across_group
from dist_cutmix.randomness import batch_generator
from tests.helpers.mix_reference import paste_per_sample
from tests.helpers.spawn import run_ranks

K = 5


def _rank_data(rank: int, n: int, kind: str, channels_last: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(100 + rank)
    x = (torch.rand(n, 3, 9, 11, generator=g) * 200).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = {'index': lambda: torch.randint(0, K, (n,), generator=g),
         'soft': lambda: torch.softmax(torch.randn(n, K, generator=g), 1),
         'binary': lambda: torch.randint(0, 2, (n,), generator=g).float(),
         'dense': lambda: torch.randint(0, K, (n, 9, 11), generator=g)}[kind]()
    return x, y


def _global_on_rank(rank, world, cases):
    out = []
    for sizes, kind, channels_last, dtype in cases:
        x, y = _rank_data(rank, sizes[rank], kind, channels_last, dtype)
        r = mix_batch_across_group(x, y, seed=3, batch=5, num_classes=K, per_sample=True, inplace=channels_last)
        out.append((r.input, r.target, r.bytes_sent, r.input.is_contiguous(memory_format=torch.channels_last)))
    return out


def _row_bytes(x: torch.Tensor, y: torch.Tensor, kind: str, box: list[int]) -> int:
    y0, y1, x0, x1 = box
    area = max(y1 - y0, 0) * max(x1 - x0, 0)
    label = area * y.element_size() if kind == 'dense' else y[0:1].numel() * y.element_size()
    return area * x.shape[1] * x.element_size() + label


@pytest.mark.parametrize('world', [2, 3])
def test_w_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, world):
    cases = {
        2: [([3, 5], 'index', False, torch.float32), ([1, 1], 'soft', False, torch.bfloat16),
            ([4, 3], 'dense', True, torch.uint8)],
        3: [([2, 6, 3], 'dense', True, torch.float32), ([0, 4, 2], 'binary', False, torch.uint8),
            ([1, 1, 1], 'index', True, torch.float32)],
    }[world]
    results = run_ranks(_global_on_rank, world, tmp_path, cases)
    for c, (sizes, kind, channels_last, dtype) in enumerate(cases):
        xs, ys = zip(*(_rank_data(r, n, kind, channels_last, dtype) for r, n in enumerate(sizes)), strict=True)
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        single = mix_batch_across_group(x_all, y_all, seed=3, batch=5, num_classes=K, per_sample=True)
        params = F.sample_params_per_sample(sum(sizes), 9, 11, generator=batch_generator(3, 5, 'group', 0))
        assert torch.equal(torch.cat([r[c][0] for r in results]), single.input)
        assert torch.equal(single.input, paste_per_sample(x_all, params))
        assert torch.equal(torch.cat([r[c][1] for r in results]), single.target)
        assert all(r[c][3] == (channels_last and sizes[i] > 0) for i, r in enumerate(results))
        # bytes: exactly the crops (each cut with its destination's box) and labels that change rank
        owner = torch.repeat_interleave(torch.arange(world), torch.tensor(sizes))
        for rank in range(world):
            must = sum(_row_bytes(x_all, y_all, kind, params.boxes[g].tolist()) for g in range(sum(sizes))
                       if owner[params.indices[g]] == rank and owner[g] != rank)
            assert results[rank][c][2] == must

"""locate_rows: which rows of the mixed batch a microbatch holds, from views for free, else from content."""
from __future__ import annotations

import pytest
import torch

from dist_cutmix.locate import RowLookupError, locate_rows


def _batch(n: int = 10) -> torch.Tensor:
    return torch.rand(n, 3, 5, 6, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize('channels_last', [False, True])
def test_views_of_the_batch_are_read_off_their_offsets(channels_last):
    whole = _batch()
    if channels_last:
        whole = whole.to(memory_format=torch.channels_last)
    for part, rows in [(whole[3:7], [3, 4, 5, 6]), (whole[1::3], [1, 4, 7]), (whole[9:], [9]), (whole[:0], [])]:
        assert locate_rows(part, whole).tolist() == rows
    assert [locate_rows(p, whole).tolist() for p in whole.split(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_copied_rows_are_found_by_content_in_any_order_and_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        whole = (_batch() * 255).to(dtype)
        pick = torch.tensor([7, 2, 2, 9])
        assert locate_rows(whole[pick], whole).tolist() == pick.tolist()
    whole = (_batch() * 255).to(torch.uint8)
    assert locate_rows(whole[[5, 0]].contiguous(memory_format=torch.channels_last), whole).tolist() == [5, 0]


def test_a_changed_row_is_an_error_not_a_guess():
    whole = _batch()
    part = whole[[1, 2]].clone()
    part[1, 0, 0, 0] += 1e-3
    with pytest.raises(RowLookupError, match='row 1 of the microbatch is no row of the mixed batch'):
        locate_rows(part, whole)
    with pytest.raises(RowLookupError, match='cannot come from a batch'):
        locate_rows(whole[:, :2].clone(), whole)


def test_equal_rows_are_told_apart_only_when_their_labels_agree():
    whole = _batch(4)
    whole[3] = whole[0]
    same = torch.tensor([5, 6, 7, 5])
    assert locate_rows(whole[[3]].clone(), whole, labels=same).tolist() == [0]
    with pytest.raises(RowLookupError, match='whose partners differ'):
        locate_rows(whole[[3]].clone(), whole, labels=torch.tensor([5, 6, 7, 8]))


@pytest.mark.parametrize('channels_last', [False, True])
def test_rows_of_a_batch_that_is_itself_a_view_are_counted_from_its_own_start(channels_last):
    # The mixed batch may itself be a slice of a larger buffer (a user's batch pasted in place): a microbatch's
    # rows are its offset from the batch's first row, not from the buffer's.
    buffer = torch.rand(14, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    if channels_last:
        buffer = buffer.to(memory_format=torch.channels_last)
    for whole in (buffer[2:12], buffer[3::2]):
        assert whole.storage_offset() > 0
        expected = [list(range(i, min(i + 4, len(whole)))) for i in range(0, len(whole), 4)]
        assert [locate_rows(part, whole).tolist() for part in whole.split(4)] == expected
        assert locate_rows(whole[1::2], whole).tolist() == list(range(1, len(whole), 2))

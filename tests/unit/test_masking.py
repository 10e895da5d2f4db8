import pytest
import torch

from bimdist.config import visible_counts
from bimdist.model.masking import gather_tokens, hidden_mask, restore_ids, seed_for, shuffle_ids


def test_restore_inverts_shuffle():
    g = torch.Generator().manual_seed(0)
    ids = shuffle_ids(8, 49, generator=g)
    restore = restore_ids(ids)
    x = torch.randn(8, 49, 5)
    shuffled = gather_tokens(x, ids)
    assert torch.equal(gather_tokens(shuffled, restore), x)
    assert torch.equal(torch.sort(ids, 1).values, torch.arange(49).expand(8, -1))  # a permutation per row


@pytest.mark.parametrize("ratio,drops,expected", [
    (0.75, [0.0, 0.0, 0.0, 0.0], [12, 12, 12, 12]),
    (0.75, [0.0, 0.25, 0.5, 0.5], [12, 9, 6, 6]),
    (0.5, [0.1, 0.2], [21, 19]),
])
def test_keep_counts_match_ratios(ratio, drops, expected):
    assert visible_counts(49, ratio, drops) == expected


def test_hidden_mask_counts_and_nesting():
    g = torch.Generator().manual_seed(1)
    ids = shuffle_ids(4, 49, generator=g)
    restore = restore_ids(ids)
    counts = visible_counts(49, 0.75, [0.0, 0.25, 0.5, 0.75])
    masks = [hidden_mask(restore, n) for n in counts]
    for n, m in zip(counts, masks):
        assert torch.equal(m.sum(1), torch.full((4,), 49.0 - n))
        visible = set(ids[0, :n].tolist())  # the tokens a block sees are the first n in shuffle order
        assert visible == {i for i in range(49) if m[0, i] == 0}
    for shallow, deep in zip(masks, masks[1:]):  # visible sets are nested: hidden at k stays hidden at k+1
        assert bool(((shallow == 1) <= (deep == 1)).all())


def test_seed_for_is_stable_and_distinct():
    assert seed_for(0, 1, 2) == seed_for(0, 1, 2)
    assert len({seed_for(0, 1, s) for s in range(1000)}) == 1000
    assert seed_for(0, 1, 2) != seed_for(1, 1, 2)

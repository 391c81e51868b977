import pytest
import torch

from cfgpar.guidance import (
    branch_rank, branches_of_rank, cfg, dual_cfg, gathered_index, make_combine, norm_preserving_cfg,
    slots_per_rank, split_outputs,
)


def preds(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 8, generator=g) for _ in range(n)]


def test_cfg_is_the_textbook_formula():
    pos, neg = preds(2)
    assert torch.equal(cfg([pos, neg], scale=4.0), neg + 4.0 * (pos - neg))
    assert torch.equal(cfg([pos, neg], scale=1.0), neg + (pos - neg))


def test_norm_preserving_cfg_matches_qwen_image():
    pos, neg = preds(2)
    comb = neg + 3.0 * (pos - neg)
    expected = comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    out = make_combine(norm_preserving_cfg, scale=3.0)([pos, neg])
    assert torch.equal(out, expected)
    torch.testing.assert_close(out.norm(dim=-1), pos.norm(dim=-1))


def test_dual_cfg_reduces_to_cfg_without_image_guidance():
    full, img, unc = preds(3)
    assert torch.allclose(dual_cfg([full, img, unc], text_scale=5.0, image_scale=1.0), cfg([full, img], scale=5.0))
    out = dual_cfg([full, img, unc], text_scale=5.0, image_scale=2.0)
    assert torch.allclose(out, unc + 2.0 * (img - unc) + 5.0 * (full - img))


@pytest.mark.parametrize("n,size,expected", [
    (2, 1, [[0, 1]]),
    (2, 2, [[0], [1]]),
    (3, 3, [[0], [1], [2]]),
    (3, 2, [[0, 2], [1]]),
    (2, 3, [[0], [1], []]),
    (1, 2, [[0], []]),
])
def test_branch_placement(n, size, expected):
    assert [branches_of_rank(n, size, r) for r in range(size)] == expected
    for rank, branches in enumerate(expected):
        for slot, i in enumerate(branches):
            assert branch_rank(i, size) == rank and gathered_index(i, size) == (rank, slot)
            assert slot < slots_per_rank(n, size)


def test_positive_on_rank_0_negative_on_rank_1_third_on_rank_2():
    assert [branch_rank(i, 3) for i in range(3)] == [0, 1, 2]
    assert [branch_rank(i, 2) for i in range(2)] == [0, 1]


def test_outputs_split():
    assert [split_outputs(5, 2, r) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert sorted(sum((split_outputs(7, 3, r) for r in range(3)), [])) == list(range(7))

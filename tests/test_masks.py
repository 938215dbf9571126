"""Mask selection checked against hand-computed values and an obviously-correct slow version."""
import math

import pytest
import torch

from stade_cli.errors import UsageError
from stade_cli.masks import NM, Unstructured, lowest_in_groups, lowest_k, parse_pattern


def slow_lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: per row, a stable ascending sort; the first k indices are pruned."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: (float(scores[r, j]), j))
        mask[r, order[:k]] = True
    return mask


def test_lowest_k_by_hand():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0],
                      [0.5, 0.1, 0.9, 0.7]])
    assert lowest_k(s, 2).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert lowest_k(s, 0).sum() == 0
    assert lowest_k(s, 4).all()


def test_ties_pruned_lowest_index_first():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.0]])
    assert lowest_k(s, 2).tolist() == [[True, True, False, False], [False, True, False, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])  # numpy paths; torch's
@pytest.mark.parametrize("k", [0, 1, 3, 7, 16])
def test_lowest_k_matches_stable_sort(k, dtype):
    g = torch.Generator().manual_seed(k)
    s = torch.randint(0, 5, (6, 16), generator=g).to(dtype)  # many ties
    assert torch.equal(lowest_k(s, k), slow_lowest_k(s, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_lowest_k_signed_zeros_and_wide_rows(dtype):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(9, 31, generator=g).abs().to(dtype)
    s[2] = 0.0                                              # a row of ties, with -0.0 among them
    s[2, 5] = -0.0
    s[4, ::2] = s[4, 1]                                     # many ties around the threshold
    for k in (1, 2, 15, 31):
        assert torch.equal(lowest_k(s, k), slow_lowest_k(s, k))
    wide = torch.randint(0, 3, (2, 40_000), generator=g).to(dtype)    # tie ranks past int16
    expected = torch.zeros_like(wide, dtype=torch.bool)
    for r in range(2):                                      # stable sort: ties in index order
        expected[r, torch.sort(wide[r].float(), stable=True).indices[:39_000]] = True
    assert torch.equal(lowest_k(wide, 39_000), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # the numpy path; the torch path
@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_lowest_in_groups_matches_stable_sort(m, dtype):
    g = torch.Generator().manual_seed(m)
    s = torch.randint(0, 3, (40, m), generator=g).to(dtype)  # many ties
    s[0, 0] = -0.0                                           # equal to +0.0
    for k in range(m + 1):
        assert torch.equal(lowest_in_groups(s, k), slow_lowest_k(s, k))


def test_nm_ties_pruned_lowest_index_first():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 2.0, 0.0]])
    assert NM(2, 4).mask(s).tolist() == [[True, True, False, False, False, True, False, True]]
    assert NM(2, 32).mask(torch.ones(1, 32)).tolist() == [[True] * 30 + [False] * 2]  # the kthvalue path


def test_unstructured_row_exact_per_row_count():
    s = torch.rand(7, 13, generator=torch.Generator().manual_seed(0))
    for sp in (0.0, 0.3, 0.5, 0.77):
        mask = Unstructured(sp).mask(s)
        assert (mask.sum(1) == math.floor(sp * 13)).all()


def test_unstructured_layer_group_is_global():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mask = Unstructured(0.5, "layer").mask(s)
    assert mask.tolist() == [[True, True], [True, False], [False, False]]


def test_nm_by_hand():
    s = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    assert NM(2, 4).mask(s).tolist() == [[True, False, False, True, False, True, True, False]]
    assert NM(1, 4).mask(s).tolist() == [[True, False, True, True, False, True, True, True]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2), (3, 8)])
def test_nm_group_by_group(n, m):
    s = torch.randn(5, 4 * m, generator=torch.Generator().manual_seed(m))
    mask = NM(n, m).mask(s)
    for r in range(5):
        for g in range(4):
            grp = s[r, g * m:(g + 1) * m]
            kept = (~mask[r, g * m:(g + 1) * m]).nonzero().flatten()
            assert len(kept) == n
            assert set(kept.tolist()) == set(torch.topk(grp, n).indices.tolist())


def test_masks_deterministic():
    s = torch.randint(0, 3, (8, 32), generator=torch.Generator().manual_seed(1)).float()
    assert torch.equal(Unstructured(0.5).mask(s), Unstructured(0.5).mask(s.clone()))
    assert torch.equal(NM(2, 4).mask(s), NM(2, 4).mask(s.clone()))


def test_parse_pattern():
    assert parse_pattern("2:4", None) == NM(2, 4)
    assert parse_pattern("4:8", 0.5) == NM(4, 8)
    assert parse_pattern("unstructured", 0.6, "layer") == Unstructured(0.6, "layer")
    for bad, sp in [("4:4", None), ("5:4", None), ("2:0", None), ("0:4", None), ("2:4", 0.6), ("blocky", 0.5),
                    ("unstructured", 1.0), ("unstructured", -0.1), ("unstructured", None)]:
        with pytest.raises(UsageError):
            parse_pattern(bad, sp)


def test_nm_width_must_divide():
    with pytest.raises(UsageError, match="divisible by 8"):
        NM(4, 8).check_width(12, "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_apply_mask_keeps_exact_bits(dtype):
    from stade_cli.tensors import apply_mask

    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 12, generator=g).to(dtype)
    w[0, :4] = torch.tensor([-0.0, float("nan"), float("-inf"), float("inf")]).to(dtype)
    mask = torch.rand(7, 12, generator=g) < 0.5
    mask[0, :4] = False
    mask[1, :] = True
    out = apply_mask(w, mask)
    assert out.dtype == dtype and out.shape == w.shape
    for i in range(7):
        for j in range(12):
            got, want = out[i, j : j + 1], (torch.zeros(1, dtype=dtype) if mask[i, j] else w[i, j : j + 1])
            assert got.view(torch.uint8).tolist() == want.view(torch.uint8).tolist()   # +0.0 where pruned


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_count_zeros_counts_both_signed_zeros(dtype):
    from stade_cli.tensors import count_zeros

    w = torch.tensor([[0.0, -0.0, 1.0, float("nan")], [-2.0, 0.0, float("inf"), 1e-30]]).to(dtype)
    slow = sum(1 for v in w.flatten().tolist() if v == 0.0)
    assert count_zeros(w) == slow == (4 if dtype == torch.float16 else 3)   # 1e-30 underflows in float16

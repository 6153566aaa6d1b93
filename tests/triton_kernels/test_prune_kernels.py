"""Triton mask kernels against their torch twins and a float64 reference (interpreter without a GPU)."""

from __future__ import annotations

import pytest
import torch

from rechannel.ops.compress.masks import n_of_m_smallest, rows_k_smallest, wanda_metric
from rechannel.triton_kernels import prune_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(rows, cols, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if ties:  # few distinct magnitudes: many exact ties, both signs
        w = torch.randint(-3, 4, (rows, cols), generator=g).float()
        w[w == 0] = 1.0
    s = torch.rand(cols, generator=g) * 2 + 0.1
    if ties:
        s = torch.ones(cols)
    return w.to(dtype).to(DEVICE), s.to(DEVICE)


def _check_f64_optimal(w, s, mask, per_row):
    """Against float64: the pruned entries are, row by row, no larger than the kept ones (to rounding)."""
    metric = w.double().abs() * (s.double().view(1, -1) if s is not None else 1.0)
    assert torch.equal(mask.sum(1).cpu(), torch.full((w.shape[0],), per_row))
    big = torch.finfo(torch.float64).max
    worst_pruned = torch.where(mask, metric, -big).amax(1)
    best_kept = torch.where(~mask, metric, big).amin(1)
    assert torch.all(worst_pruned <= best_kept * (1 + 1e-6) + 1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols, sparsity", [(7, 37, 0.5), (33, 130, 0.3), (5, 513, 0.9), (3, 8, 0.125)])
def test_row_selection_equals_stable_sort_and_float64(dtype, rows, cols, sparsity):
    w, s = _inputs(rows, cols, dtype, seed=rows * cols)
    k = int(cols * sparsity)
    got = prune_mask.row_k_smallest_mask(w, s, k)
    want = rows_k_smallest(wanda_metric(w, s), k)
    assert torch.equal(got, want)
    _check_f64_optimal(w, s, got, k)
    # magnitude: no scale
    assert torch.equal(prune_mask.row_k_smallest_mask(w, None, k), rows_k_smallest(wanda_metric(w, None), k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_selection_breaks_ties_like_a_stable_sort(dtype):
    w, s = _inputs(9, 61, dtype, seed=3, ties=True)
    for k in (1, 17, 30, 60):
        got = prune_mask.row_k_smallest_mask(w, s, k)
        assert torch.equal(got, rows_k_smallest(wanda_metric(w, s), k)), k


def test_row_selection_zeroes_in_place_and_handles_k_zero():
    w, s = _inputs(6, 50, torch.float32, seed=9)
    before = w.clone()
    mask = prune_mask.row_k_smallest_mask(w, s, 20, zero=True)
    assert torch.equal(w, before.masked_fill(mask, 0)) and mask.sum() == 6 * 20
    assert not prune_mask.row_k_smallest_mask(w, s, 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols, n, m", [(7, 36, 2, 4), (19, 72, 4, 8), (1, 8, 1, 4), (40, 1028, 2, 4)])
def test_n_of_m_equals_its_twin_and_float64(dtype, rows, cols, n, m):
    w, s = _inputs(rows, cols, dtype, seed=cols + n)
    got = prune_mask.n_of_m_mask(w, s, n, m)
    assert torch.equal(got, n_of_m_smallest(wanda_metric(w, s), n, m))
    assert torch.equal(got.view(rows, -1, m).sum(2).cpu(), torch.full((rows, cols // m), n))
    metric = (w.double().abs() * s.double()).view(rows, -1, m)
    g = got.view(rows, -1, m)
    assert torch.all(torch.where(g, metric, -1.0).amax(2) <= torch.where(~g, metric, 1e300).amin(2) * (1 + 1e-6))


def test_n_of_m_ties_and_zeroing():
    w, s = _inputs(10, 64, torch.float16, seed=1, ties=True)
    before = w.clone()
    got = prune_mask.n_of_m_mask(w, s, 2, 4, zero=True)
    assert torch.equal(got, n_of_m_smallest(wanda_metric(before, s), 2, 4))
    assert torch.equal(w, before.masked_fill(got, 0))


def test_twins_equal_the_published_wanda_selection():
    """Wanda's reference: stable sort per row for unstructured; topk over each group of m for N:M."""
    w, s = _inputs(16, 96, torch.float32, seed=5)
    metric = w.abs() * s.view(1, -1)
    ref = torch.zeros_like(metric, dtype=torch.bool)
    ref.scatter_(1, torch.sort(metric, dim=-1, stable=True)[1][:, :48], True)
    assert torch.equal(rows_k_smallest(metric, 48), ref)
    ref = torch.zeros_like(metric, dtype=torch.bool)
    for ii in range(0, 96, 4):
        ref.scatter_(1, ii + torch.topk(metric[:, ii:ii + 4], 2, dim=1, largest=False)[1], True)
    assert torch.equal(n_of_m_smallest(metric, 2, 4), ref)


def test_select_mask_dispatches_to_the_kernels_on_request(monkeypatch):
    from rechannel.ops.compress.masks import Pattern, select_mask

    w, s = _inputs(12, 72, torch.float16, seed=11)
    # 2:6 and 3:9: M not a power of two, which the kernel cannot tile: the torch path, not an assertion
    for pattern, sparsity in ((Pattern(), 0.4), (Pattern(2, 4), 0.5), (Pattern(2, 6), 0.5), (Pattern(3, 9), 0.5)):
        monkeypatch.setenv("RECHANNEL_KERNELS", "torch")
        a = select_mask(w, s, sparsity, pattern)
        monkeypatch.setenv("RECHANNEL_KERNELS", "triton")
        assert torch.equal(select_mask(w, s, sparsity, pattern), a)

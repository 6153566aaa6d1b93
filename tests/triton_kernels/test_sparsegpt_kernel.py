"""The fused SparseGPT block kernel against its torch twin (interpreter without a GPU)."""

from __future__ import annotations

import pytest
import torch
from tolerances import U32, U64, column_loop_error

from rechannel.ops.compress.masks import Pattern
from rechannel.ops.compress.obs import damped_inverse_cholesky as _inverse_cholesky
from rechannel.ops.compress.sparsegpt import _sparsegpt_block
from rechannel.triton_kernels.sparsegpt import obs_block

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _block(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * width, width, generator=g) @ torch.randn(width, width, generator=g)
    h = 2 * x.t() @ x / x.shape[0]
    hinv, _ = _inverse_cholesky(h, 0.01)
    return torch.randn(rows, width, generator=g).to(DEVICE), hinv.to(DEVICE)


@pytest.mark.parametrize("rows, width, pattern", [(5, 12, Pattern()), (21, 24, Pattern(2, 4)),
                                                  (17, 40, Pattern(4, 8)), (3, 8, Pattern(1, 4))])
def test_block_kernel_equals_the_torch_block(rows, width, pattern, monkeypatch):
    monkeypatch.setenv("RECHANNEL_KERNELS", "torch")  # the twin runs the plain loop even on CUDA
    w, hinv = _block(rows, width, seed=rows + width)
    mask_ref = torch.zeros_like(w, dtype=torch.bool)
    w_ref = w.clone()
    err_ref = _sparsegpt_block(w_ref, hinv, mask_ref, 0, width, 0.5, pattern)
    w_k = w.clone()
    # the unstructured mask is chosen before the loop (by the caller); N:M inside it
    mask_k = mask_ref.clone() if not pattern.structured else torch.zeros_like(mask_ref)
    err_k = obs_block(w_k, hinv, mask_k, pattern.n, pattern.m)
    assert torch.equal(mask_k, mask_ref)
    # two float32 column loops on the same hinv and masks, each within column_loop_error of exact arithmetic
    bound_w, bound_err = (2 * b.to(w.device) for b in column_loop_error(w, hinv, w_ref, ~mask_ref))
    assert ((w_k - w_ref).abs() <= bound_w).all() and ((err_k - err_ref).abs() <= bound_err).all()
    assert torch.all(w_k[mask_k] == 0)


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_whole_layer_through_the_kernel_equals_the_torch_path(pattern, monkeypatch):
    from rechannel.ops.compress.sparsegpt import sparsegpt

    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 48, generator=g) @ torch.randn(48, 48, generator=g)
    w, h = torch.randn(10, 48, generator=g).to(DEVICE), (2 * x.t() @ x / 300).to(DEVICE)
    monkeypatch.setenv("RECHANNEL_KERNELS", "torch")
    w_t, m_t, _, _ = sparsegpt(w, h, 0.5, pattern, blocksize=16)
    monkeypatch.setenv("RECHANNEL_KERNELS", "triton")
    w_k, m_k, _, _ = sparsegpt(w, h, 0.5, pattern, blocksize=16)
    assert torch.equal(m_k, m_t)
    # the same hinv and lazy updates on both sides; the block loops each within column_loop_error of exact
    bound_w, _ = column_loop_error(w, _inverse_cholesky(h, 0.01)[0], w_t, ~m_t)
    assert ((w_k - w_t).abs().cpu() <= 2 * bound_w).all()


def _published_block_f64(w: torch.Tensor, hinv: torch.Tensor, mask: torch.Tensor, n: int, m: int):
    """SparseGPT's column loop over one block as the paper's code writes it, in float64: for N:M, at the
    start of every group of m columns prune the n smallest w² / [H⁻¹]_jj² (ties to the lower index)."""
    w, hinv, mask = w.double().clone(), hinv.double(), mask.clone()
    err = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if m and i % m == 0:
            score = w[:, i:i + m] ** 2 / torch.diag(hinv)[i:i + m] ** 2  # (R, m)
            idx = torch.sort(score, dim=1, stable=True).indices[:, :n]
            mask[:, i:i + m].scatter_(1, idx, True)
        q = torch.where(mask[:, i], 0.0, w[:, i])
        err[:, i] = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err[:, i:i + 1] * hinv[i, i:][None, :]
        w[:, i] = q
    return w, err, mask


@pytest.mark.parametrize("rows, width, pattern", [(9, 16, Pattern()), (13, 24, Pattern(2, 4)), (6, 32, Pattern(4, 8))])
def test_block_kernel_equals_the_published_loop_in_float64(rows, width, pattern):
    w, hinv = _block(rows, width, seed=3 * rows + width)
    g = torch.Generator().manual_seed(rows)
    mask = (torch.rand(rows, width, generator=g) < 0.5).to(DEVICE) if not pattern.structured else \
        torch.zeros(rows, width, dtype=torch.bool, device=DEVICE)
    w_ref, err_ref, mask_ref = _published_block_f64(w.cpu(), hinv.cpu(), mask.cpu(), pattern.n, pattern.m)
    w_k, mask_k = w.clone(), mask.clone()
    err_k = obs_block(w_k, hinv, mask_k, pattern.n, pattern.m)
    assert torch.equal(mask_k.cpu(), mask_ref)
    # the float32 kernel and the float64 loop on the same hinv and masks: column_loop_error at u32 + u64
    bound_w, bound_err = column_loop_error(w, hinv, w_ref, ~mask_ref, unit=U32 + U64)
    assert ((w_k.cpu().double() - w_ref).abs() <= bound_w).all()
    assert ((err_k.cpu().double() - err_ref).abs() <= bound_err).all()

"""Fused pruning-mask kernels: score, select and (optionally) zero, in one pass over the weights.

Twins of rechannel.ops.compress.masks.rows_k_smallest / n_of_m_smallest applied to wanda_metric; the masks must
be bit-identical, ties included (a stable sort: the lower column index is pruned first).

row_k_smallest: one program per output row. The score |W_ij| * s_j is float32 and non-negative, so its
bit pattern read as int32 is ordered like its value; the k-th smallest score is found exactly by a
31-step bitwise search on counts (no sort), then everything below it is pruned, plus, among the entries
equal to it, the first ones in column order (a prefix count) until k are pruned.

n_of_m: one program per tile of rows x groups; each entry's rank inside its group of m is the number of
entries of the group that come before it (smaller, or equal with a lower index); rank < n is pruned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_k_smallest_kernel(w_ptr, s_ptr, mask_ptr, cols, stride_w, k,
                           HAS_SCALE: tl.constexpr, ZERO: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    valid = offs < cols
    w = tl.load(w_ptr + row * stride_w + offs, mask=valid, other=0.0)
    score = tl.abs(w.to(tl.float32))
    if HAS_SCALE:
        score = score * tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(valid, bits, 0x7FFFFFFF)  # padding sorts after every real score
    kth = tl.zeros((), dtype=tl.int32)
    for b in tl.static_range(30, -1, -1):  # (a two-bits-per-step variant with packed int64 counts was slower)
        cand = kth | (1 << b)
        below = tl.sum((bits < cand).to(tl.int32), axis=0)
        kth = tl.where(below <= k - 1, cand, kth)
    less = bits < kth
    n_less = tl.sum(less.to(tl.int32), axis=0)
    tie = bits == kth
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based position among the ties
    prune = less | (tie & (tie_rank <= k - n_less))
    tl.store(mask_ptr + row * cols + offs, prune.to(tl.int8), mask=valid)
    if ZERO:
        tl.store(w_ptr + row * stride_w + offs, tl.where(prune, 0.0, w).to(w.dtype), mask=valid)


@triton.jit
def _n_of_m_kernel(w_ptr, s_ptr, mask_ptr, rows, groups, stride_w, N: tl.constexpr, M: tl.constexpr,
                   HAS_SCALE: tl.constexpr, ZERO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    lane = tl.arange(0, M)
    col = g[None, :, None] * M + lane[None, None, :]  # (1, BG, M)
    valid = (r[:, None, None] < rows) & (g[None, :, None] < groups)  # (BR, BG, 1)
    valid = valid & (lane[None, None, :] < M)
    w = tl.load(w_ptr + r[:, None, None] * stride_w + col, mask=valid, other=0.0)
    score = tl.abs(w.to(tl.float32))
    if HAS_SCALE:
        score = score * tl.load(s_ptr + col, mask=col < groups * M, other=0.0).to(tl.float32)
    rank = tl.zeros(score.shape, dtype=tl.int32)
    for j in tl.static_range(M):
        sj = tl.sum(tl.where(lane[None, None, :] == j, score, 0.0), axis=2)[:, :, None]  # (BR, BG, 1)
        before = (sj < score) | ((sj == score) & (j < lane[None, None, :]))
        rank += before.to(tl.int32)
    prune = rank < N
    tl.store(mask_ptr + r[:, None, None] * (groups * M) + col, prune.to(tl.int8), mask=valid)
    if ZERO:
        tl.store(w_ptr + r[:, None, None] * stride_w + col, tl.where(prune, 0.0, w).to(w.dtype), mask=valid)


def _prepare(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    assert weight.dim() == 2 and weight.stride(1) == 1, "weight must be 2-D with contiguous rows"
    s = scale.contiguous() if scale is not None else weight  # a dummy pointer when there is no scale
    return s, torch.empty(weight.shape, dtype=torch.int8, device=weight.device)


def row_k_smallest_mask(weight: torch.Tensor, scale: torch.Tensor | None, k: int, zero: bool = False) -> torch.Tensor:
    """Mask (True = pruned) of the k smallest |W_ij| * s_j of each row; with `zero`, also zero them in W."""
    s, mask = _prepare(weight, scale)
    rows, cols = weight.shape
    if k <= 0:
        return mask.zero_().bool()
    block = triton.next_power_of_2(cols)
    _row_k_smallest_kernel[(rows,)](weight, s, mask, cols, weight.stride(0), k, HAS_SCALE=scale is not None,
                                    ZERO=zero, BLOCK_C=block, num_warps=min(16, max(1, block // 256)))
    return mask.bool()


def n_of_m_mask(weight: torch.Tensor, scale: torch.Tensor | None, n: int, m: int, zero: bool = False) -> torch.Tensor:
    """Mask of the n smallest |W_ij| * s_j in every group of m consecutive columns (m a power of two)."""
    assert m & (m - 1) == 0 and weight.shape[1] % m == 0, "m must be a power of two dividing the width"
    s, mask = _prepare(weight, scale)
    rows, cols = weight.shape
    groups = cols // m
    block_r, block_g = 16, max(1, min(64, 256 // m))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(groups, block_g))
    _n_of_m_kernel[grid](weight, s, mask, rows, groups, weight.stride(0), N=n, M=m, HAS_SCALE=scale is not None,
                         ZERO=zero, BLOCK_R=block_r, BLOCK_G=block_g)
    return mask.bool()

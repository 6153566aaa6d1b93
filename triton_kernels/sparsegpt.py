"""SparseGPT's inner loop over one block of columns, fused: the twin of ops.compress.sparsegpt._sparsegpt_block.

In torch the loop is ~10 small kernel launches per column (thousands per layer). Here one program owns a
tile of rows and the whole block (<= 128 columns) in registers and walks the columns in order: for N:M it
picks the n smallest w^2/[H^-1]_jj^2 of each group of m as it reaches it (ranks inside the group; ties to
the lower index), prunes the column, and spreads the error over the rest of the block with the row i of
the Cholesky factor. The caller then applies the block's errors to the later columns with one matmul.
Divisions round correctly (div_rn: a GPU's plain float32 `/` need not) and no multiply-add is fused into an
FMA, so a GPU gives torch's block bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _obs_block_kernel(w_ptr, h_ptr, mask_ptr, err_ptr, rows, width, stride_w, stride_h,
                      N: tl.constexpr, M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_B)
    inside = (r[:, None] < rows) & (c[None, :] < width)
    tile = r[:, None] * stride_w + c[None, :]
    w = tl.load(w_ptr + tile, mask=inside, other=0.0)  # (BR, BB) float32
    pruned = tl.load(mask_ptr + r[:, None] * width + c[None, :], mask=inside, other=0) != 0
    diag = tl.load(h_ptr + c * stride_h + c, mask=c < width, other=1.0)  # (BB,)
    err = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    for i in range(0, width):
        here = c[None, :] == i  # (1, BB)
        if M > 0:
            if i % M == 0:
                group = (c[None, :] >= i) & (c[None, :] < i + M)
                score = tl.math.div_rn(w * w, (diag * diag)[None, :])
                rank = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.int32)
                for j in tl.static_range(M):
                    sj = tl.sum(tl.where(c[None, :] == i + j, score, 0.0), axis=1)[:, None]  # (BR, 1)
                    rank += ((sj < score) | ((sj == score) & (i + j < c[None, :]))).to(tl.int32)
                pruned = pruned | (group & (rank < N))
        col = tl.sum(tl.where(here, w, 0.0), axis=1)  # (BR,)
        drop = tl.sum(tl.where(here & pruned, 1, 0), axis=1) > 0
        q = tl.where(drop, 0.0, col)
        d = tl.load(h_ptr + i * stride_h + i)
        e = tl.math.div_rn(col - q, d)
        h_row = tl.load(h_ptr + i * stride_h + c, mask=(c >= i) & (c < width), other=0.0)  # (BB,)
        w = w - e[:, None] * h_row[None, :]
        w = tl.where(here, q[:, None], w)
        err = tl.where(here, e[:, None], err)
    tl.store(w_ptr + tile, w, mask=inside)
    tl.store(err_ptr + r[:, None] * width + c[None, :], err, mask=inside)
    tl.store(mask_ptr + r[:, None] * width + c[None, :], pruned.to(tl.int8), mask=inside)


def obs_block(w1: torch.Tensor, h1: torch.Tensor, mask1: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the block `w1` (R, B) float32 in place, as ops.compress.sparsegpt._sparsegpt_block does.

    `h1` (B, B) is the block's slice of the upper Cholesky factor of H^-1; `mask1` (R, B) bool is the
    unstructured mask (updated in place; all False for N:M, which is chosen here). Returns the errors.
    """
    rows, width = w1.shape
    assert w1.dtype == torch.float32 and w1.stride(1) == 1 and width <= 256
    mask8 = mask1.to(torch.int8).contiguous()
    h1 = h1.contiguous()
    err = torch.empty_like(w1)
    block_r = 16
    _obs_block_kernel[(triton.cdiv(rows, block_r),)](
        w1, h1, mask8, err, rows, width, w1.stride(0), h1.stride(0), N=n, M=m, BLOCK_R=block_r,
        BLOCK_B=triton.next_power_of_2(width), num_warps=4,
        enable_fp_fusion=False)  # w -= e * h rounded twice, as torch does it
    mask1.copy_(mask8.bool())
    return err

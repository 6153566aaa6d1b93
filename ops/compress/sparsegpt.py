"""SparseGPT (Frantar and Alistarh, 2023): prune one layer column by column, compensating each pruned
weight's error on the columns not yet visited (the OBS core in obs.py), optionally quantizing the kept ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.dispatch import MAX_KERNEL_BLOCK, kernels, use_triton
from ..core.packed import QuantizedWeight
from .grid import Grids, QuantSpec, stored_codes
from .masks import Pattern, n_of_m_smallest
from .obs import ObsReport, damped_inverse_cholesky, drop_dead_inputs, settle_column, spread_block_error


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
              blocksize: int = 128, percdamp: float = 0.01,
              quant: QuantSpec | None = None) -> tuple[torch.Tensor, torch.Tensor, ObsReport, QuantizedWeight | None]:
    """SparseGPT's OBS prune-and-update of one layer. Returns (new weight float32, mask, report, codes).

    Follows the published algorithm: dead inputs (zero diagonal) get H_jj = 1 and W_:j = 0; the mask is
    chosen per block of `blocksize` columns from w^2 / [H^-1]_jj^2 (jointly over the block for
    unstructured sparsity, every m columns on the already-updated weights for N:M), and each pruned
    column's error is spread over the later columns through the Cholesky factor of H^-1. With `quant`,
    the joint variant: each kept weight is also rounded to its grid before its error is spread (pruned
    weights stay exactly zero: zero is always a grid point), and the codes come back too.
    """
    w = weight.detach().float().clone()  # (R, C)
    h = hessian.float().clone()  # (C, C)
    w_before = w.clone()
    drop_dead_inputs(w, h)
    hinv, report = damped_inverse_cholesky(h, percdamp)
    mask = torch.zeros_like(w, dtype=torch.bool)
    rounding = None
    if quant is not None:
        grids = Grids(w_before if quant.group_size == -1 else w, quant, None)
        rounding = _Rounding(grids, torch.empty(w.shape, dtype=torch.uint8, device=w.device))
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        err = _sparsegpt_block(w, hinv, mask, i1, i2, sparsity, pattern, rounding)  # updates w[:, i1:i2], mask
        spread_block_error(w, hinv, err, i1, i2)
    qw = None
    if rounding is not None:
        qw = stored_codes(rounding.codes, rounding.grids, None, quant, cols)
    return w, mask, report, qw


@dataclass
class _Rounding:
    """The joint variant's state across blocks: the grids kept weights round to, and the codes chosen so far."""
    grids: Grids
    codes: torch.Tensor  # (R, C) uint8, filled column by column


def _sparsegpt_block(w: torch.Tensor, hinv: torch.Tensor, mask: torch.Tensor, i1: int, i2: int,
                     sparsity: float, pattern: Pattern, rounding: _Rounding | None = None) -> torch.Tensor:
    """Prune columns i1:i2 one by one, updating the rest of the block. Returns the scaled errors (R, i2-i1).

    w (R, C) and mask (R, C) are updated in place; hinv (C, C) is the upper Cholesky factor of the damped H^-1. With
    `rounding`, each kept weight is also rounded to its grid and its code stored (the joint variant)."""
    grids = rounding.grids if rounding is not None else None
    w1 = w[:, i1:i2].clone()
    h1 = hinv[i1:i2, i1:i2]
    d1 = torch.diag(h1)
    m1 = mask[:, i1:i2]
    if not pattern.structured:
        score = w1**2 / d1.view(1, -1) ** 2
        thresh = torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
        m1 |= score <= thresh
    if grids is not None:
        pairs = [grids.at(i1 + i, w) for i in range(i2 - i1)]  # every grid the block needs, before its loop
    elif use_triton(w1) and w1.shape[1] <= MAX_KERNEL_BLOCK:
        err = kernels("sparsegpt").obs_block(w1, h1, m1, pattern.n, pattern.m)
        w[:, i1:i2] = w1
        return err
    err = torch.zeros_like(w1)
    for i in range(i2 - i1):
        if pattern.structured and i % pattern.m == 0:
            score = w1[:, i:i + pattern.m] ** 2 / d1[i:i + pattern.m].view(1, -1) ** 2
            m1[:, i:i + pattern.m] = n_of_m_smallest(score, pattern.n, pattern.m)
        col = w1[:, i]
        q = torch.where(m1[:, i], torch.zeros_like(col), col)
        if grids is not None:
            scale, zero = pairs[i]
            code = torch.clamp(torch.round(q / scale) + zero, 0, grids.spec.maxq)
            q = scale * (code - zero)
            rounding.codes[:, i1 + i] = code.to(torch.uint8)
        err[:, i] = settle_column(w1, h1, i, q)
    w[:, i1:i2] = w1
    mask[:, i1:i2] = m1
    return err

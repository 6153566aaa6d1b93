"""GPTQ (Frantar et al., 2023): quantize one layer column by column, compensating each column's rounding
error on the columns not yet quantized (the OBS core in obs.py)."""

from __future__ import annotations

import torch

from ..core.dispatch import MAX_KERNEL_BLOCK, kernels, use_triton
from ..core.packed import QuantizedWeight
from .grid import Grids, QuantSpec, stored_codes
from .obs import ObsReport, damped_inverse_cholesky, drop_dead_inputs, settle_column, spread_block_error


def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, blocksize: int = 128,
         percdamp: float = 0.01) -> tuple[QuantizedWeight, ObsReport, torch.Tensor]:
    """GPTQ (Frantar et al. 2023) on one layer: quantize columns in order (by decreasing diag H with
    act-order), spreading each column's error over the columns not yet quantized through the upper
    Cholesky factor of (H + lambda I)^-1, in blocks of `blocksize` columns with lazy updates between
    blocks. Runs in the weight's dtype when it is float64 (tests), else float32. Returns the codes, the
    report and the quantized weight on the float32 grid the loop used (R, C): what the reference code leaves
    in the model for the next blocks' calibration."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()  # (R, C)
    h = hessian.to(dtype).clone()  # (C, C)
    rows, cols = w.shape
    w_before = w.clone()
    dead = drop_dead_inputs(w, h)
    perm = None
    if spec.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    grids = Grids(w_before if spec.group_size == -1 else w_before * ~dead, spec, perm)
    hinv, report = damped_inverse_cholesky(h, percdamp)
    del h  # (C, C): not needed past the factor
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        err = _gptq_block(w, hinv, codes, grids, i1, i2)  # quantizes w[:, i1:i2] in place
        spread_block_error(w, hinv, err, i1, i2)
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return stored_codes(codes, grids, perm, spec, cols), report, w


def _gptq_block(w: torch.Tensor, hinv: torch.Tensor, codes: torch.Tensor, grids: Grids, i1: int,
                i2: int) -> torch.Tensor:
    """Quantize columns i1:i2 one by one, updating the rest of the block. Returns the errors (R, i2-i1).

    Every grid the block needs is known before its loop starts: a group's grid is read from `w`, whose
    columns i1:i2 only change when the block is written back."""
    pairs = [grids.at(i1 + i, w) for i in range(i2 - i1)]
    scale = torch.stack([p[0] for p in pairs], 1)  # (R, B)
    zero = torch.stack([p[1] for p in pairs], 1)  # (R, B)
    w1 = w[:, i1:i2].clone()
    h1 = hinv[i1:i2, i1:i2]
    if use_triton(w1) and w1.shape[1] <= MAX_KERNEL_BLOCK:
        block_codes, err = kernels("quant").gptq_block(w1, h1, scale, zero, grids.spec.maxq)  # w1 quantized in place
    else:
        block_codes, err = _gptq_block_torch(w1, h1, scale, zero, grids.spec.maxq)
    w[:, i1:i2] = w1
    codes[:, i1:i2] = block_codes
    return err


def _gptq_block_torch(w1: torch.Tensor, h1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop of one block on w1 (R, B), in place. Returns (codes (R, B) uint8, errors (R, B))."""
    err = torch.zeros_like(w1)
    codes = torch.empty(w1.shape, dtype=torch.uint8, device=w1.device)
    for i in range(w1.shape[1]):
        col = w1[:, i]
        code = torch.clamp(torch.round(col / scale[:, i]) + zero[:, i], 0, maxq)
        q = scale[:, i] * (code - zero[:, i])
        err[:, i] = settle_column(w1, h1, i, q)
        codes[:, i] = code.to(torch.uint8)
    return codes, err

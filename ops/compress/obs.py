"""The Optimal Brain Surgeon core that SparseGPT and GPTQ share: the damped inverse Hessian's Cholesky factor
(damping raised when the factorisation fails, and reported), dead inputs, the update of one column inside a
block, and the lazy update of the columns after a block.

Both algorithms walk the columns of W in blocks; for column i they replace w_i by q (zero for a pruned
weight, a grid point for a quantized one) and spread the error e = (w_i - q) / U_ii over the block's later
columns through row i of U, the upper Cholesky factor of (H + lambda I)^-1; the accumulated errors of a
block then reach the remaining columns in one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import UserError


@dataclass
class ObsReport:
    damping: float  # the relative damping finally used (percdamp unless the Cholesky failed)
    retries: int


def drop_dead_inputs(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Inputs never seen in calibration (zero diagonal): H_jj = 1 and W_:j = 0, as the reference code does,
    in place. Returns the (C,) bool mask of dead inputs."""
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return dead


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, ObsReport]:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = percdamp * mean(diag H), raised 10x on failure."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    mean_diag = torch.mean(torch.diag(hessian))
    for retry in range(6):
        damp = percdamp * 10**retry
        h = hessian.clone()
        h[diag, diag] += damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(h)
        del h  # each (C, C) intermediate is dropped as soon as the next exists: 5632 inputs are 127 MB each
        if info == 0:
            inv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if info == 0:
                return upper, ObsReport(damp, retry)
    raise UserError("the Hessian stays singular even with damping x1e5 (SparseGPT/GPTQ); use more calibration data")


def settle_column(w1: torch.Tensor, h1: torch.Tensor, i: int, q: torch.Tensor) -> torch.Tensor:
    """Set column i of the block w1 (R, B) to q (R,) and spread its error over columns i+1.. through row i of
    the block's factor h1 (B, B), in place. Returns the error e (R,) for the lazy update."""
    e = (w1[:, i] - q) / h1[i, i]
    w1[:, i:] -= e.view(-1, 1) * h1[i, i:].view(1, -1)
    w1[:, i] = q
    return e


def spread_block_error(w: torch.Tensor, hinv: torch.Tensor, err: torch.Tensor, i1: int, i2: int) -> None:
    """The lazy update: the errors (R, i2-i1) of block i1:i2 reach every later column at once, in place."""
    w[:, i2:] -= err @ hinv[i1:i2, i2:]

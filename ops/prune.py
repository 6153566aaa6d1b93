"""Pruning masks and weight updates: magnitude, Wanda, SparseGPT; unstructured or N:M.

These are the reference (and CPU) implementations. The mask selectors have Triton twins in
triton_kernels/prune_mask.py that must produce bit-identical masks; `select_mask` dispatches to them for
CUDA tensors. Masks are boolean with True = pruned, as in the published code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rechannel.ops.errors import UserError, unknown_choice

METHODS = ("magnitude", "wanda", "sparsegpt")

MAX_KERNEL_BLOCK = 256  # the fused column-loop kernels hold a block in registers; wider blocks run in torch

if TYPE_CHECKING:
    from rechannel.ops.quant import QuantizedWeight, QuantSpec


@dataclass(frozen=True)
class Pattern:
    """Unstructured (n = m = 0) or N:M: in every group of m consecutive inputs, n are pruned."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def parse_pattern(text: str) -> Pattern:
    if text == "unstructured":
        return Pattern()
    parts = text.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1]):
        return Pattern(int(parts[0]), int(parts[1]))
    raise unknown_choice("pattern", text, ["unstructured", "2:4", "4:8"]) if ":" not in text else UserError(
        f"pattern {text!r}: N:M needs 0 < N < M, e.g. 2:4 or 4:8")


def check_pattern(pattern: Pattern, in_features: int, layer: str) -> None:
    if pattern.structured and in_features % pattern.m:
        raise UserError(f"pattern {pattern} does not divide the input width {in_features} of {layer}")


def use_triton(t: torch.Tensor) -> bool:
    """RECHANNEL_KERNELS=auto (default): Triton for CUDA tensors, torch elsewhere; =torch: never Triton;
    =triton: always (on the CPU that needs TRITON_INTERPRET=1: how the tests run the kernels here)."""
    choice = os.environ.get("RECHANNEL_KERNELS", "auto")
    return choice == "triton" or (choice == "auto" and t.is_cuda)


# ---- mask selection: the torch twins -------------------------------------------------------------


def wanda_metric(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """|W_ij| * s_j in float32 (s = ||X_j||_2 for Wanda, None for magnitude). (R, C)"""
    metric = weight.float().abs()
    return metric if scale is None else metric * scale.float().view(1, -1)


def rows_k_smallest(metric: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k smallest entries; ties go to the lower column index (a stable sort). (R, C) bool"""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(metric, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def n_of_m_smallest(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each group of m consecutive columns, the n smallest; ties to the lower index. (R, C) bool"""
    rows, cols = metric.shape
    groups = metric.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def keep_count(cols: int, sparsity: float) -> int:
    """Entries pruned per row: int(cols * sparsity), as the reference code rounds."""
    return int(cols * sparsity)


def select_mask(weight: torch.Tensor, scale: torch.Tensor | None, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """The magnitude (scale None) or Wanda mask of one weight matrix, compared within each output row."""
    if use_triton(weight) and not (pattern.structured and pattern.m & (pattern.m - 1)):  # kernel: M a power of 2
        from rechannel.triton_kernels import prune_mask

        if pattern.structured:
            return prune_mask.n_of_m_mask(weight, scale, pattern.n, pattern.m)
        return prune_mask.row_k_smallest_mask(weight, scale, keep_count(weight.shape[1], sparsity))
    metric = wanda_metric(weight, scale)
    if pattern.structured:
        return n_of_m_smallest(metric, pattern.n, pattern.m)
    return rows_k_smallest(metric, keep_count(weight.shape[1], sparsity))


# ---- SparseGPT -----------------------------------------------------------------------------------


@dataclass
class ObsReport:
    damping: float  # the relative damping finally used (percdamp unless the Cholesky failed)
    retries: int


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, ObsReport]:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = percdamp * mean(diag H), raised 10x on failure."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    mean_diag = torch.mean(torch.diag(hessian))
    for retry in range(6):
        damp = percdamp * 10**retry
        h = hessian.clone()
        h[diag, diag] += damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return upper, ObsReport(damp, retry)
    raise UserError("the Hessian stays singular even with damping x1e5 (SparseGPT/GPTQ); use more calibration data")


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
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv, report = _inverse_cholesky(h, percdamp)
    mask = torch.zeros_like(w, dtype=torch.bool)
    grids = codes = None
    if quant is not None:
        from rechannel.ops.quant import Grids

        grids = Grids(w_before if quant.group_size == -1 else w, quant, None)
        codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        err = _sparsegpt_block(w, hinv, mask, i1, i2, sparsity, pattern, grids, codes)  # updates w[:, i1:i2], mask
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    qw = None
    if quant is not None:
        from rechannel.ops.quant import stored_codes

        qw = stored_codes(codes, grids, None, quant, cols)
    return w, mask, report, qw


def _sparsegpt_block(w: torch.Tensor, hinv: torch.Tensor, mask: torch.Tensor, i1: int, i2: int,
                     sparsity: float, pattern: Pattern, grids=None, codes=None) -> torch.Tensor:
    """Prune columns i1:i2 one by one, updating the rest of the block. Returns the scaled errors (R, i2-i1)."""
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
        from rechannel.triton_kernels.sparsegpt import obs_block

        err = obs_block(w1, h1, m1, pattern.n, pattern.m)
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
            codes[:, i1 + i] = code.to(torch.uint8)
        e = (col - q) / h1[i, i]
        w1[:, i:] -= e.view(-1, 1) * h1[i, i:].view(1, -1)
        w1[:, i] = q
        err[:, i] = e
    w[:, i1:i2] = w1
    mask[:, i1:i2] = m1
    return err

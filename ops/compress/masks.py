"""Pruning masks: magnitude and Wanda, unstructured or N:M.

The reference (and CPU) selectors. Triton twins in triton_kernels/prune_mask.py produce bit-identical masks;
`select_mask` dispatches to them for CUDA tensors. Masks are boolean with True = pruned, as in the published
code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.dispatch import kernels, use_triton
from ..core.errors import UserError, unknown_choice


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
        prune_mask = kernels("prune_mask")
        if pattern.structured:
            return prune_mask.n_of_m_mask(weight, scale, pattern.n, pattern.m)
        return prune_mask.row_k_smallest_mask(weight, scale, keep_count(weight.shape[1], sparsity))
    metric = wanda_metric(weight, scale)
    if pattern.structured:
        return n_of_m_smallest(metric, pattern.n, pattern.m)
    return rows_k_smallest(metric, keep_count(weight.shape[1], sparsity))

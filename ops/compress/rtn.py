"""Round to nearest: every weight to the nearest point of its (row, group) min-max grid."""

from __future__ import annotations

import torch

from ..core.dispatch import kernels, use_triton
from ..core.packed import QuantizedWeight
from .grid import QuantSpec, find_grid, group_columns, quantize_codes


def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round to nearest on the min-max grid of every (row, group)."""
    if use_triton(weight):
        quant = kernels("quant")
        packed, scales, zeros = quant.rtn_pack(weight.detach(), spec.bits, spec.group_size, spec.sym)
        cols = weight.shape[1]
        return QuantizedWeight(quant.unpack(packed, spec.bits, cols), scales, zeros, None, spec.bits, spec.width(cols))
    w = weight.detach().float()  # (R, C)
    codes = torch.empty_like(w, dtype=torch.uint8)
    scales, zeros = [], []
    for a, b in group_columns(spec, w.shape[1]):
        scale, zero = find_grid(w[:, a:b], spec.bits, spec.sym)
        codes[:, a:b] = quantize_codes(w[:, a:b], scale, zero, spec.maxq).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(codes, torch.stack(scales, 1).half(), torch.stack(zeros, 1).to(torch.uint8), None,
                           spec.bits, spec.width(w.shape[1]))

"""The quantization grid: GPTQ's min-max integer grid per output row or per group of input columns.

xmin = min(x, 0) and xmax = max(x, 0); asymmetric: scale = (xmax - xmin) / maxq, zero = round(-xmin / scale);
symmetric: xmax = max(|xmin|, xmax), xmin = -xmax, zero = (maxq + 1) / 2. A weight is stored as the code
q = clamp(round(w / scale) + zero, 0, maxq) and read back as scale * (q - zero) (ops/core/packed.py). Scales
are stored in float16. RTN rounds a scale to float16 the moment it is chosen, so its codes are the nearest
ones on the stored grid. GPTQ, like the reference code, runs its column loop on float32 scales and stores
them rounded afterwards (a relative change of at most 2^-11 in each weight): its codes are then exactly the
reference's. Either way a packed model equals its dense export, which is written from the stored codes and
scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import UserError
from ..core.packed import QuantizedWeight

BITS = (2, 3, 4, 8)
# The smallest normal float16: a smaller scale would be stored as a subnormal (or 0), losing precision,
# and could push the zero point off the grid. Only groups spanning less than maxq * 2^-14 are affected.
MIN_SCALE = 2.0**-14


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized. group_size -1: one group per output row. A group size that does not divide
    a layer's width leaves a shorter last group, as the reference GPTQ code does (SmolLM2's width is 576)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def width(self, cols: int) -> int:
        """Columns per group for a layer with `cols` inputs."""
        return cols if self.group_size == -1 else self.group_size

    def describe(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "act_order": self.act_order, "static_groups": self.static_groups}


def check_spec(spec: QuantSpec) -> None:
    """Options that are wrong whatever the model: checked before anything loads."""
    if spec.bits not in BITS:
        raise UserError(f"--bits {spec.bits}: supported bit widths are {', '.join(map(str, BITS))}")
    if spec.group_size != -1 and spec.group_size < 1:
        raise UserError(f"--group-size {spec.group_size}: give a positive group size, or -1 for one per row")
    if spec.static_groups and not spec.act_order:
        raise UserError("--static-groups only matters with --act-order")


def find_grid(x: torch.Tensor, bits: int, sym: bool, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of the min-max grid over x (R, c), the scale rounded to float16 unless `exact`.
    (R,), (R,)"""
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zeros)
    xmax = torch.maximum(x.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).clamp_min(MIN_SCALE)
    if not exact:
        scale = scale.to(torch.float16).to(x.dtype)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of x (R, c) on the per-row grid scale, zero (R,) or (R, c)."""
    scale = scale.view(-1, 1) if scale.dim() == 1 else scale
    zero = zero.view(-1, 1) if zero.dim() == 1 else zero
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def group_columns(spec: QuantSpec, cols: int) -> list[tuple[int, int]]:
    width = spec.width(cols)
    return [(i, min(i + width, cols)) for i in range(0, cols, width)]


class Grids:
    """The grid each column is quantized on, found the way the published GPTQ code finds it.

    Per row: once, from the whole weight before dead inputs are zeroed. Groups: when the column loop
    reaches the first column of a group, from the current weights of those columns (in the permuted order
    with act-order); with static groups, from the weights before any update, in the original order, so a
    column's group never depends on the permutation.
    """

    def __init__(self, w_before: torch.Tensor, spec: QuantSpec, perm: torch.Tensor | None) -> None:
        self.spec = spec
        self.perm = None if perm is None else perm.tolist()  # read per column: keep it off the GPU
        cols = w_before.shape[1]
        self.width = spec.width(cols)
        self.grid_of_col = [0] * cols  # loop position -> grid index
        self.scales: list[torch.Tensor] = []
        self.zeros: list[torch.Tensor] = []
        if spec.group_size == -1 or spec.static_groups:
            for a, b in group_columns(spec, cols):
                self._add(w_before[:, a:b])

    def _add(self, x: torch.Tensor) -> None:
        scale, zero = find_grid(x, self.spec.bits, self.spec.sym, exact=True)
        self.scales.append(scale)
        self.zeros.append(zero)

    def at(self, pos: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) for the column at loop position `pos`; `w` is the full weight as it is now."""
        if self.spec.group_size == -1:
            index = 0
        elif self.spec.static_groups:
            col = self.perm[pos] if self.perm is not None else pos
            index = col // self.width
        else:
            if pos % self.width == 0:
                self._add(w[:, pos:pos + self.width])
            index = len(self.scales) - 1
        self.grid_of_col[pos] = index
        return self.scales[index], self.zeros[index]


def stored_codes(codes: torch.Tensor, grids: Grids, perm: torch.Tensor | None, spec: QuantSpec,
                 cols: int) -> QuantizedWeight:
    """Back to the original column order; a g_idx only when act-order without static groups needs one."""
    scales = torch.stack(grids.scales, 1).half()
    zeros = torch.stack(grids.zeros, 1).to(torch.uint8)
    grid_of_col = torch.tensor(grids.grid_of_col, dtype=torch.long, device=codes.device)
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        grid_of_col = grid_of_col[inv]
    g_idx = None
    if spec.act_order and not spec.static_groups and spec.group_size != -1:
        g_idx = grid_of_col.to(torch.int32)
    return QuantizedWeight(codes.contiguous(), scales, zeros, g_idx, spec.bits, spec.width(cols))

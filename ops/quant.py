"""Weight quantization: the min-max integer grid, round-to-nearest, GPTQ, and the packed bit layout.

The grid is GPTQ's: per output row (one group per row) or per group of `group_size` consecutive input
columns, xmin = min(x, 0) and xmax = max(x, 0); asymmetric: scale = (xmax - xmin) / maxq, zero =
round(-xmin / scale); symmetric: xmax = max(|xmin|, xmax), xmin = -xmax, zero = (maxq + 1) / 2. A weight
is stored as the code q = clamp(round(w / scale) + zero, 0, maxq) and read back as scale * (q - zero).
Scales are stored in float16. RTN rounds a scale to float16 the moment it is chosen, so its codes are the
nearest ones on the stored grid. GPTQ, like the reference code, runs its column loop on float32 scales
and stores them rounded afterwards (a relative change of at most 2^-11 in each weight): its codes are
then exactly the reference's. Either way a packed model equals its dense export, which is written from
the stored codes and scales.

Packed layout: the codes of one output row form a little-endian bit stream (code k occupies bits
k*bits .. k*bits + bits - 1; bit i of the stream is bit i % 8 of byte i // 8), padded to a whole byte.
Two 4-bit codes per byte, four 2-bit codes, eight 3-bit codes per three bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rechannel.ops.errors import UserError
from rechannel.ops.prune import MAX_KERNEL_BLOCK, _inverse_cholesky, use_triton

BITS = (2, 3, 4, 8)
METHODS = ("rtn", "gptq")
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


# ---- the grid ------------------------------------------------------------------------------------


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


# ---- a quantized matrix --------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """Codes in the original column order, with the grid of each (row, group)."""

    codes: torch.Tensor  # (R, C) uint8
    scales: torch.Tensor  # (R, G) float16
    zeros: torch.Tensor  # (R, G) uint8
    g_idx: torch.Tensor | None  # (C,) int32: the group of each column; None = column // group width
    bits: int
    group_width: int  # columns per group when g_idx is None

    def group_index(self) -> torch.Tensor:
        """(C,) int64: which group's scale and zero each input column uses."""
        if self.g_idx is not None:
            return self.g_idx.long()
        cols = self.codes.shape[1]
        return torch.arange(cols, device=self.codes.device) // self.group_width

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the file stands for, computed in float32 then cast. (R, C)"""
        g = self.group_index()
        scale = self.scales.float()[:, g]
        zero = self.zeros.float()[:, g]
        return (scale * (self.codes.float() - zero)).to(dtype)


def _group_columns(spec: QuantSpec, cols: int) -> list[tuple[int, int]]:
    width = spec.width(cols)
    return [(i, min(i + width, cols)) for i in range(0, cols, width)]


def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round to nearest on the min-max grid of every (row, group)."""
    if use_triton(weight):
        from rechannel.triton_kernels.quant import rtn_pack, unpack

        packed, scales, zeros = rtn_pack(weight.detach(), spec.bits, spec.group_size, spec.sym)
        cols = weight.shape[1]
        return QuantizedWeight(unpack(packed, spec.bits, cols), scales, zeros, None, spec.bits, spec.width(cols))
    w = weight.detach().float()  # (R, C)
    codes = torch.empty_like(w, dtype=torch.uint8)
    scales, zeros = [], []
    for a, b in _group_columns(spec, w.shape[1]):
        scale, zero = find_grid(w[:, a:b], spec.bits, spec.sym)
        codes[:, a:b] = quantize_codes(w[:, a:b], scale, zero, spec.maxq).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(codes, torch.stack(scales, 1).half(), torch.stack(zeros, 1).to(torch.uint8), None,
                           spec.bits, spec.width(w.shape[1]))


# ---- GPTQ ----------------------------------------------------------------------------------------


@dataclass
class GptqReport:
    damping: float  # the relative damping finally used (percdamp unless the Cholesky failed)
    retries: int


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
            for a, b in _group_columns(spec, cols):
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


def _damped_inverse_factor(h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, GptqReport]:
    upper, obs = _inverse_cholesky(h, percdamp)
    return upper, GptqReport(obs.damping, obs.retries)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, blocksize: int = 128,
         percdamp: float = 0.01) -> tuple[QuantizedWeight, GptqReport, torch.Tensor]:
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
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if spec.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    grids = Grids(w_before if spec.group_size == -1 else w_before * ~dead, spec, perm)
    hinv, report = _damped_inverse_factor(h, percdamp)
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        err = _gptq_block(w, hinv, codes, grids, i1, i2)  # quantizes w[:, i1:i2] in place
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
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
        from rechannel.triton_kernels.quant import gptq_block

        block_codes, err = gptq_block(w1, h1, scale, zero, grids.spec.maxq)  # w1 quantized in place
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
        e = (col - q) / h1[i, i]
        w1[:, i:] -= e.view(-1, 1) * h1[i, i:].view(1, -1)
        w1[:, i] = q
        codes[:, i] = code.to(torch.uint8)
        err[:, i] = e
    return codes, err


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


# ---- packing -------------------------------------------------------------------------------------


def packed_width(cols: int, bits: int) -> int:
    """Bytes per packed row."""
    return (cols * bits + 7) // 8


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) uint8 codes < 2**bits -> (R, packed_width(C, bits)) uint8, one bit stream per row.

    Eight codes fill exactly `bits` bytes, so the row is cut into runs of eight, each run's codes are
    OR-ed into one 64-bit word, and the word's low `bits` bytes are the run's bytes."""
    rows, cols = codes.shape
    runs = -(-cols // 8)
    padded = torch.nn.functional.pad(codes, (0, runs * 8 - cols)).to(torch.int64).view(rows, runs, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (padded << shifts).sum(-1, keepdim=True)  # (R, runs, 1): disjoint bits, so the sum is an OR
    out = (word >> torch.arange(0, 8 * bits, 8, device=codes.device)) & 0xFF  # (R, runs, bits)
    return out.to(torch.uint8).view(rows, runs * bits)[:, :packed_width(cols, bits)]


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of pack_rows: (R, bytes) uint8 -> (R, cols) uint8."""
    rows = packed.shape[0]
    runs = -(-cols // 8)
    padded = torch.nn.functional.pad(packed, (0, runs * bits - packed.shape[1])).to(torch.int64)
    shifts = torch.arange(0, 8 * bits, 8, device=packed.device)
    word = (padded.view(rows, runs, bits) << shifts).sum(-1, keepdim=True)  # (R, runs, 1)
    codes = (word >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)  # (R, runs, 8)
    return codes.to(torch.uint8).view(rows, runs * 8)[:, :cols]

"""Weight-quantization kernels: the twins of rechannel.ops.compress (the grid in grid.py, the packed layout in ops/core/packed.py).

dequantize / unpack: tile by tile, the packed bytes of a tile of rows are loaded contiguously and spread
into codes in registers (two 4-bit or four 2-bit codes per byte; 3-bit codes eight per three bytes, read
as one 24-bit word), so every tile of 8k columns starts on a byte boundary.

matmul: y = x @ W^T + b with W dequantized tile by tile as the dot needs it (W is never written out):
the weight read from memory is the packed codes plus one scale and zero per (row, group), which is what
makes a 4-bit layer faster than its fp16 twin when the batch is small and the matmul memory-bound. The
tile is dequantized in float32 exactly as QuantizedWeight.dequantize does, cast to the activation dtype
(fp16/bf16: W4A16), and the dot accumulates in float32. In Triton's interpreter bf16 dots are computed
wrongly (bf16 is held as raw uint16), so there both operands go up to float32 first (exact products).

rtn_pack: round to nearest and pack, one program per tile of rows: pass 1 finds the grid of every group
(min/max over its columns, scale rounded to float16), pass 2 quantizes the columns and writes whole bytes.

gptq_block: GPTQ's column loop over one block (128 columns by default, at most 256), like sparsegpt.obs_block: one program owns
a tile of rows and the whole block in registers, quantizes column i, and spreads its error over the rest
of the block through row i of the Cholesky factor; the caller applies the block's errors to the later
columns with one matmul.

Bit-identical to torch: divisions use div_rn (Triton's plain float32 `/` need not round correctly on a GPU) and
rounding is half-to-even (torch.round), done by hand since rint is not in the interpreter; no multiply-add
is fused into an FMA outside the matmul (torch rounds the product first). Casts to bf16 also round by
hand: the interpreter truncates float32 -> bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BITS = (2, 3, 4, 8)

# activation kinds of the matmul kernel (a constexpr): what the dequantized tile is cast to for the dot
_F32, _F16, _BF16, _BF16_VIA_F32 = 0, 1, 2, 3


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- small device helpers ------------------------------------------------------------------------


@triton.jit
def _rint(x):
    """Round half to even, like torch.round (x - floor(x) is exact in floating point)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return f + up.to(x.dtype)


@triton.jit
def _div(a, b, F64: tl.constexpr):
    """IEEE a / b (round to nearest), as torch divides."""
    if F64:
        out = a / b
    else:
        out = tl.math.div_rn(a, b)
    return out


@triton.jit
def _round_bf16(x):
    """float32 -> the float32 value of the nearest bfloat16 (ties to even), so a later cast is exact."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _codes_tile(p_ptr, stride_p, row_bytes, n, n_in, k0, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Codes of rows n (BN,) and columns k0 .. k0 + BK - 1 (k0 a multiple of 8). (BN, BK) int32

    Columns past the row's end come back as the padding bits (zero) or 0."""
    row = p_ptr + n[:, None] * stride_p  # (BN, 1)
    if BITS == 8:
        j = k0 + tl.arange(0, BLOCK_K)
        codes = tl.load(row + j[None, :], mask=n_in[:, None] & (j < row_bytes)[None, :], other=0).to(tl.int32)
    elif BITS == 4:
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(row + j[None, :], mask=n_in[:, None] & (j < row_bytes)[None, :], other=0).to(tl.int32)
        codes = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K))  # code 2j, then 2j + 1
    elif BITS == 2:
        j = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        b = tl.load(row + j[None, :], mask=n_in[:, None] & (j < row_bytes)[None, :], other=0).to(tl.int32)
        # join(join(c0, c2), join(c1, c3)) reshaped lays out c0 c1 c2 c3
        pairs = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6))
        codes = tl.reshape(pairs, (BLOCK_N, BLOCK_K))
    else:  # 3 bits: codes 8t .. 8t + 7 are the 24-bit word of bytes 3t .. 3t + 2
        j = (k0 // 8) * 3 + 3 * tl.arange(0, BLOCK_K // 8)
        b0 = tl.load(row + j[None, :], mask=n_in[:, None] & (j < row_bytes)[None, :], other=0).to(tl.int32)
        b1 = tl.load(row + j[None, :] + 1, mask=n_in[:, None] & (j + 1 < row_bytes)[None, :], other=0).to(tl.int32)
        b2 = tl.load(row + j[None, :] + 2, mask=n_in[:, None] & (j + 2 < row_bytes)[None, :], other=0).to(tl.int32)
        v = b0 | (b1 << 8) | (b2 << 16)  # (BN, BK/8)
        even = tl.join(tl.join(v & 7, (v >> 12) & 7), tl.join((v >> 6) & 7, (v >> 18) & 7))  # c0 c4 c2 c6
        odd = tl.join(tl.join((v >> 3) & 7, (v >> 15) & 7), tl.join((v >> 9) & 7, (v >> 21) & 7))  # c1 c5 c3 c7
        codes = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
    return codes


@triton.jit
def _dequant_tile(p_ptr, s_ptr, z_ptr, g_ptr, stride_p, stride_s, stride_z, row_bytes, cols, n, n_in, k0,
                  BITS: tl.constexpr, GROUP_WIDTH: tl.constexpr, HAS_G_IDX: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32(scale) * (code - zero) for rows n and columns k0 .. k0 + BK - 1, in float32. (BN, BK)"""
    q = _codes_tile(p_ptr, stride_p, row_bytes, n, n_in, k0, BITS, BLOCK_N, BLOCK_K).to(tl.float32)
    k = k0 + tl.arange(0, BLOCK_K)
    k_in = k < cols
    if HAS_G_IDX:
        g = tl.load(g_ptr + k, mask=k_in, other=0)  # (BK,)
        inside = n_in[:, None] & k_in[None, :]
        s = tl.load(s_ptr + n[:, None] * stride_s + g[None, :], mask=inside, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n[:, None] * stride_z + g[None, :], mask=inside, other=0).to(tl.float32)
        w = (q - z) * s
    elif GROUP_WIDTH % BLOCK_K == 0:  # the whole tile is in one group: one scale and zero per row
        g = k0 // GROUP_WIDTH
        s = tl.load(s_ptr + n * stride_s + g, mask=n_in, other=0.0).to(tl.float32)  # (BN,)
        z = tl.load(z_ptr + n * stride_z + g, mask=n_in, other=0).to(tl.float32)
        w = (q - z[:, None]) * s[:, None]
    else:
        g = k // GROUP_WIDTH
        inside = n_in[:, None] & k_in[None, :]
        s = tl.load(s_ptr + n[:, None] * stride_s + g[None, :], mask=inside, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n[:, None] * stride_z + g[None, :], mask=inside, other=0).to(tl.float32)
        w = (q - z) * s
    return w


# ---- dequantize / unpack -------------------------------------------------------------------------


@triton.jit
def _dequantize_kernel(p_ptr, s_ptr, z_ptr, g_ptr, out_ptr, rows, cols, row_bytes, stride_p, stride_s,
                       stride_z, stride_o, BITS: tl.constexpr, GROUP_WIDTH: tl.constexpr,
                       HAS_G_IDX: tl.constexpr, CODES_ONLY: tl.constexpr, OUT_BF16: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_C
    k = k0 + tl.arange(0, BLOCK_C)
    n_in = n < rows
    if CODES_ONLY:
        w = _codes_tile(p_ptr, stride_p, row_bytes, n, n_in, k0, BITS, BLOCK_R, BLOCK_C)
    else:
        w = _dequant_tile(p_ptr, s_ptr, z_ptr, g_ptr, stride_p, stride_s, stride_z, row_bytes, cols, n, n_in,
                          k0, BITS, GROUP_WIDTH, HAS_G_IDX, BLOCK_R, BLOCK_C)
        if OUT_BF16:
            w = _round_bf16(w)
    out = out_ptr + n[:, None] * stride_o + k[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=n_in[:, None] & (k < cols)[None, :])


def _check_packed(packed: torch.Tensor, bits: int, cols: int) -> None:
    assert bits in BITS, f"bits {bits}: supported {BITS}"
    assert packed.dtype == torch.uint8 and packed.dim() == 2 and packed.stride(1) == 1
    assert packed.shape[1] == (cols * bits + 7) // 8, "packed width does not match cols and bits"


def _grid_args(scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None, group_width: int,
               cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    # scales are read as float32 whatever they are stored in (rechannel writes float16, llm-compressor bfloat16)
    assert scales.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert zeros.dtype == torch.uint8 and scales.shape == zeros.shape
    scales, zeros = scales.contiguous(), zeros.contiguous()
    if g_idx is not None:  # (gptq's g_idx is made on the CPU whatever the weight's device)
        assert g_idx.shape == (cols,)
        g_idx = g_idx.to(device=scales.device, dtype=torch.int32).contiguous()
    width = cols if group_width in (-1, None) else group_width
    return scales, zeros, g_idx, width


def _blocks_2d(rows: int, cols: int) -> tuple[int, int]:
    return min(32, max(16, triton.next_power_of_2(rows))), min(128, max(16, triton.next_power_of_2(cols)))


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
               bits: int, cols: int, group_width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a packed matrix stands for: QuantizedWeight(unpack_rows(packed), ...).dequantize(dtype).

    packed (R, ceil(cols*bits/8)) uint8, scales (R, G) float16, zeros (R, G) uint8, g_idx (cols,) or None
    (then column j is in group j // group_width). Computed in float32, then cast. (R, cols) dtype
    """
    _check_packed(packed, bits, cols)
    scales, zeros, g_idx, width = _grid_args(scales, zeros, g_idx, group_width, cols)
    rows = packed.shape[0]
    out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    block_r, block_c = _blocks_2d(rows, cols)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _dequantize_kernel[grid](packed, scales, zeros, g_idx if g_idx is not None else zeros, out, rows, cols,
                             packed.shape[1], packed.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
                             BITS=bits, GROUP_WIDTH=width, HAS_G_IDX=g_idx is not None, CODES_ONLY=False,
                             OUT_BF16=dtype == torch.bfloat16, BLOCK_R=block_r, BLOCK_C=block_c,
                             enable_fp_fusion=False)
    return out


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Twin of ops.core.packed.unpack_rows: (R, bytes) uint8 -> (R, cols) uint8 codes."""
    _check_packed(packed, bits, cols)
    rows = packed.shape[0]
    out = torch.empty((rows, cols), dtype=torch.uint8, device=packed.device)
    block_r, block_c = _blocks_2d(rows, cols)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _dequantize_kernel[grid](packed, packed, packed, packed, out, rows, cols, packed.shape[1], packed.stride(0),
                             0, 0, out.stride(0), BITS=bits, GROUP_WIDTH=1, HAS_G_IDX=False, CODES_ONLY=True,
                             OUT_BF16=False, BLOCK_R=block_r, BLOCK_C=block_c, enable_fp_fusion=False)
    return out


# ---- fused dequantize + matmul -------------------------------------------------------------------


@triton.jit
def _matmul_kernel(x_ptr, p_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, rows, cols, row_bytes, stride_x,
                   stride_p, stride_s, stride_z, stride_y, BITS: tl.constexpr, GROUP_WIDTH: tl.constexpr,
                   HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = m < M
    n_in = n < rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, cols, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=m_in[:, None] & (k < cols)[None, :],
                    other=0.0)  # (BM, BK)
        w = _dequant_tile(p_ptr, s_ptr, z_ptr, g_ptr, stride_p, stride_s, stride_z, row_bytes, cols, n, n_in,
                          k0, BITS, GROUP_WIDTH, HAS_G_IDX, BLOCK_N, BLOCK_K)  # (BN, BK) float32
        if ACT == 0:  # float32 activations: a full-precision dot
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        elif ACT == 1:
            acc = tl.dot(x, tl.trans(w.to(tl.float16)), acc)
        elif ACT == 2:
            acc = tl.dot(x, tl.trans(_round_bf16(w).to(tl.bfloat16)), acc)
        else:  # bf16 in the interpreter: the same products, in float32
            acc = tl.dot(x.to(tl.float32), tl.trans(_round_bf16(w)), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if ACT >= 2:
        acc = _round_bf16(acc)
    y = y_ptr + m[:, None] * stride_y + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


_MATMUL_KEY = ["rows", "cols", "BITS", "GROUP_WIDTH", "HAS_G_IDX", "ACT", "BLOCK_M"]
_MATMUL_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
                   for bn, bk, warps, stages in [(16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3),
                                                 (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]]
_matmul_tuned = triton.autotune(_MATMUL_CONFIGS, key=_MATMUL_KEY)(_matmul_kernel)


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


@dataclass(frozen=True)
class PackedMatrix:
    """A packed weight as the matmul reads it: packed (R, ceil(cols*bits/8)) uint8, scales (R, G) float16,
    zeros (R, G) uint8, g_idx (cols,) or None (column j in group j // group_width)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    cols: int
    group_width: int


def _launch_matmul(x2: torch.Tensor, w: PackedMatrix, bias: torch.Tensor | None, y: torch.Tensor,
                   blocks: tuple[int, int, int] | None) -> None:
    """Launch on x2 (M, cols) into y (M, R), `w` with its grid arguments already checked; `blocks`
    (BM, BN, BK) fixes the tiling, None: autotune on CUDA, a fixed tiling elsewhere."""
    rows, m = w.packed.shape[0], x2.shape[0]
    if x2.dtype == torch.float32:
        act = _F32
    elif x2.dtype == torch.float16:
        act = _F16
    else:
        act = _BF16_VIA_F32 if _interpreting() else _BF16
    args = (x2, w.packed, w.scales, w.zeros, w.g_idx if w.g_idx is not None else w.zeros,
            bias if bias is not None else y, y, m, rows, w.cols, w.packed.shape[1], x2.stride(0), w.packed.stride(0),
            w.scales.stride(0), w.zeros.stride(0), y.stride(0))
    meta = dict(BITS=w.bits, GROUP_WIDTH=w.group_width, HAS_G_IDX=w.g_idx is not None, HAS_BIAS=bias is not None,
                ACT=act)
    if blocks is None and x2.is_cuda and not _interpreting():
        block_m = _block_m(m)
        grid = lambda META: (triton.cdiv(rows, META["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
        _matmul_tuned[grid](*args, **meta, BLOCK_M=block_m, enable_fp_fusion=True)
        return
    block_m, block_n, block_k = blocks or (_block_m(m), 64 if rows > 32 else 32, 32)
    assert block_k % 16 == 0 and min(block_m, block_n) >= 16, "tl.dot needs tiles of at least 16"
    grid = (triton.cdiv(rows, block_n), triton.cdiv(m, block_m))
    _matmul_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, enable_fp_fusion=True)


def matmul(x: torch.Tensor, w: PackedMatrix, bias: torch.Tensor | None = None, *,
           blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x @ W^T + bias with W the packed weight (R, cols), dequantized tile by tile, never materialised.

    x (..., cols) float32/float16/bfloat16; the result (..., R) is in x's dtype, accumulated in float32.
    Each weight tile is dequantized in float32 and cast to x's dtype before the dot (W4A16 style).
    `blocks` (BLOCK_M, BLOCK_N, BLOCK_K) pins the tiling (tests); by default it is autotuned on CUDA.
    """
    cols = w.cols
    _check_packed(w.packed, w.bits, cols)
    assert x.shape[-1] == cols and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    scales, zeros, g_idx, width = _grid_args(w.scales, w.zeros, w.g_idx, w.group_width, cols)
    w = PackedMatrix(w.packed, scales, zeros, g_idx, w.bits, cols, width)
    rows = w.packed.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        assert bias.shape == (rows,)
        bias = bias.contiguous()
    y = torch.empty((x2.shape[0], rows), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        _launch_matmul(x2, w, bias, y, blocks)
    return y.reshape(*lead, rows)


# ---- round to nearest, packed --------------------------------------------------------------------


@triton.jit
def _rtn_pack_kernel(w_ptr, p_ptr, s_ptr, z_ptr, rows, cols, groups, row_bytes, stride_w, stride_p, stride_s,
                     stride_z, group_width, BITS: tl.constexpr, SYM: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    n = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_in = n < rows
    c = tl.arange(0, BLOCK_C)
    maxq = tl.full((BLOCK_R,), (1 << BITS) - 1, tl.float32)
    # pass 1: the grid of every group of these rows, as ops.compress.grid.find_grid finds it
    for g in range(0, groups):
        start = g * group_width
        end = tl.minimum(start + group_width, cols)
        xmin = tl.zeros((BLOCK_R,), dtype=tl.float32)  # min(x, 0) and max(x, 0): start from 0
        xmax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(start, end, BLOCK_C):
            k = c0 + c
            inside = n_in[:, None] & (k < end)[None, :]
            w = tl.load(w_ptr + n[:, None] * stride_w + k[None, :], mask=inside, other=0.0).to(tl.float32)
            xmin = tl.minimum(xmin, tl.min(w, axis=1))
            xmax = tl.maximum(xmax, tl.max(w, axis=1))
        if SYM:
            xmax = tl.maximum(-xmin, xmax)
            xmin = tl.where(xmin < 0, -xmax, xmin)
        flat = (xmin == 0) & (xmax == 0)
        xmin = tl.where(flat, -1.0, xmin)
        xmax = tl.where(flat, 1.0, xmax)
        scale = tl.math.div_rn(xmax - xmin, maxq).to(tl.float16).to(tl.float32)
        scale = tl.maximum(scale, 2.0**-14)  # MIN_SCALE of ops.compress.grid
        if SYM:
            zero = (maxq + 1.0) * 0.5
        else:
            zero = _rint(tl.math.div_rn(-xmin, scale))
        tl.store(s_ptr + n * stride_s + g, scale.to(tl.float16), mask=n_in)
        tl.store(z_ptr + n * stride_z + g, zero.to(tl.uint8), mask=n_in)
    tl.debug_barrier()  # pass 2 reads back grids other threads of this program wrote
    # pass 2: codes, BLOCK_C (a multiple of 8) columns at a time, so each chunk is whole bytes
    for c0 in range(0, cols, BLOCK_C):
        k = c0 + c
        k_in = k < cols
        inside = n_in[:, None] & k_in[None, :]
        w = tl.load(w_ptr + n[:, None] * stride_w + k[None, :], mask=inside, other=0.0).to(tl.float32)
        group = k // group_width  # (a new name: `g`, pass 1's loop index, would be carried into this loop)
        s = tl.load(s_ptr + n[:, None] * stride_s + group[None, :], mask=inside, other=1.0).to(tl.float32)
        z = tl.load(z_ptr + n[:, None] * stride_z + group[None, :], mask=inside, other=0).to(tl.float32)
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(w, s)) + z, 0.0), (1 << BITS) - 1.0)
        q = tl.where(inside, q, 0.0).to(tl.int32)  # padding bits are zero
        _store_packed(p_ptr + n[:, None] * stride_p, n_in, row_bytes, c0, q, BITS, BLOCK_R, BLOCK_C)


@triton.jit
def _store_packed(row, n_in, row_bytes, k0, q, BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Write the codes q (BR, BC) of columns k0 .. k0 + BC - 1 (k0 a multiple of 8) as bytes: the
    inverse of _codes_tile."""
    if BITS == 8:
        j = k0 + tl.arange(0, BLOCK_C)
        tl.store(row + j[None, :], q.to(tl.uint8), mask=n_in[:, None] & (j < row_bytes)[None, :])
    elif BITS == 4:
        j = k0 // 2 + tl.arange(0, BLOCK_C // 2)
        lo, hi = tl.split(tl.reshape(q, (BLOCK_R, BLOCK_C // 2, 2)))
        tl.store(row + j[None, :], (lo | (hi << 4)).to(tl.uint8), mask=n_in[:, None] & (j < row_bytes)[None, :])
    elif BITS == 2:
        j = k0 // 4 + tl.arange(0, BLOCK_C // 4)
        even, odd = tl.split(tl.reshape(q, (BLOCK_R, BLOCK_C // 4, 2, 2)))  # (c0, c2), (c1, c3)
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        byte = c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)
        tl.store(row + j[None, :], byte.to(tl.uint8), mask=n_in[:, None] & (j < row_bytes)[None, :])
    else:  # 3 bits: each 8 codes -> a 24-bit word -> 3 bytes
        j = (k0 // 8) * 3 + 3 * tl.arange(0, BLOCK_C // 8)
        even, odd = tl.split(tl.reshape(q, (BLOCK_R, BLOCK_C // 8, 2, 2, 2)))  # (c0 c4 c2 c6), (c1 c5 c3 c7)
        e04, e26 = tl.split(even)
        o15, o37 = tl.split(odd)
        c0, c4 = tl.split(e04)
        c2, c6 = tl.split(e26)
        c1, c5 = tl.split(o15)
        c3, c7 = tl.split(o37)
        v = c0 | (c1 << 3) | (c2 << 6) | (c3 << 9) | (c4 << 12) | (c5 << 15) | (c6 << 18) | (c7 << 21)
        for t in tl.static_range(3):
            tl.store(row + j[None, :] + t, ((v >> (8 * t)) & 255).to(tl.uint8),
                     mask=n_in[:, None] & (j + t < row_bytes)[None, :])


def rtn_pack(w: torch.Tensor, bits: int, group_width: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Round to nearest and pack in one pass: ops.compress.rtn.rtn then pack_rows, bit for bit.

    w (R, C) float32/float16/bfloat16; group_width divides C into groups of consecutive columns (the last
    may be shorter; -1 or C: one group per row). Returns packed (R, ceil(C*bits/8)) uint8, scales (R, G)
    float16, zeros (R, G) uint8.
    """
    assert bits in BITS and w.dim() == 2
    w = w if w.stride(1) == 1 else w.contiguous()
    rows, cols = w.shape
    width = cols if group_width == -1 else group_width
    assert width >= 1
    groups = triton.cdiv(cols, width)
    packed = torch.empty((rows, (cols * bits + 7) // 8), dtype=torch.uint8, device=w.device)
    scales = torch.empty((rows, groups), dtype=torch.float16, device=w.device)
    zeros = torch.empty((rows, groups), dtype=torch.uint8, device=w.device)
    block_r = 4 if w.is_cuda and not _interpreting() else 16
    block_c = min(256, max(16, triton.next_power_of_2(min(width, cols))))
    _rtn_pack_kernel[(triton.cdiv(rows, block_r),)](
        w, packed, scales, zeros, rows, cols, groups, packed.shape[1], w.stride(0), packed.stride(0),
        scales.stride(0), zeros.stride(0), width, BITS=bits, SYM=sym, BLOCK_R=block_r, BLOCK_C=block_c,
        enable_fp_fusion=False)
    return packed, scales, zeros


# ---- GPTQ's column loop --------------------------------------------------------------------------


@triton.jit
def _gptq_block_kernel(w_ptr, h_ptr, s_ptr, z_ptr, codes_ptr, err_ptr, rows, width, stride_w, stride_h,
                       stride_s, stride_z, MAXQ: tl.constexpr, F64: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_B: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_B)
    r_in = r < rows
    inside = r_in[:, None] & (c[None, :] < width)
    tile = r[:, None] * stride_w + c[None, :]
    w = tl.load(w_ptr + tile, mask=inside, other=0.0)  # (BR, BB) float32 (float64 in tests)
    err = tl.zeros((BLOCK_R, BLOCK_B), dtype=w.dtype)
    codes = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.int32)
    for i in range(0, width):
        here = c[None, :] == i  # (1, BB)
        col = tl.sum(tl.where(here, w, 0.0), axis=1)  # (BR,)
        s = tl.load(s_ptr + r * stride_s + i, mask=r_in, other=1.0)
        z = tl.load(z_ptr + r * stride_z + i, mask=r_in, other=0.0)
        code = tl.minimum(tl.maximum(_rint(_div(col, s, F64)) + z, 0.0), MAXQ * 1.0)
        q = s * (code - z)
        d = tl.load(h_ptr + i * stride_h + i)
        e = _div(col - q, d, F64)
        h_row = tl.load(h_ptr + i * stride_h + c, mask=(c >= i) & (c < width), other=0.0)  # (BB,)
        w = w - e[:, None] * h_row[None, :]
        w = tl.where(here, q[:, None], w)
        err = tl.where(here, e[:, None], err)
        codes = tl.where(here, code.to(tl.int32)[:, None], codes)
    tl.store(w_ptr + tile, w, mask=inside)
    tl.store(err_ptr + r[:, None] * width + c[None, :], err, mask=inside)
    tl.store(codes_ptr + r[:, None] * width + c[None, :], codes.to(tl.uint8), mask=inside)


def gptq_block(w1: torch.Tensor, h1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the block w1 (R, B) in place, column by column, as ops.compress.gptq._gptq_block_torch does.

    h1 (B, B): the block's slice of the upper Cholesky factor of H^-1; scale, zero (R, B): the grid of
    each column. float32 (or float64) throughout, B <= 256. Returns (codes (R, B) uint8, errors (R, B)).
    """
    rows, width = w1.shape
    assert w1.dtype in (torch.float32, torch.float64) and w1.stride(1) == 1 and width <= 256
    h1 = h1.to(w1.dtype).contiguous()
    scale = scale.to(w1.dtype).contiguous()
    zero = zero.to(w1.dtype).contiguous()
    err = torch.empty_like(w1)
    codes = torch.empty(w1.shape, dtype=torch.uint8, device=w1.device)
    block_r = 16
    _gptq_block_kernel[(triton.cdiv(rows, block_r),)](
        w1, h1, scale, zero, codes, err, rows, width, w1.stride(0), h1.stride(0), scale.stride(0),
        zero.stride(0), MAXQ=maxq, F64=w1.dtype == torch.float64, BLOCK_R=block_r,
        BLOCK_B=triton.next_power_of_2(width), num_warps=4,
        enable_fp_fusion=False)  # w -= e * h rounded twice, as torch does it
    return codes, err

"""Triton quantization kernels against their torch twins in ops/compress and ops/core/packed and float64 references
(interpreter without a GPU: TRITON_INTERPRET=1 is set by conftest before any kernel module is imported)."""

from __future__ import annotations

import pytest
import torch
from tolerances import U32, U64, column_loop_error

from rechannel.ops.compress.gptq import _gptq_block_torch
from rechannel.ops.compress.grid import QuantSpec, find_grid
from rechannel.ops.compress.obs import damped_inverse_cholesky as _inverse_cholesky
from rechannel.ops.compress.rtn import rtn
from rechannel.ops.core.packed import QuantizedWeight, pack_rows, unpack_rows
from rechannel.triton_kernels import quant as kq

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = [2, 3, 4, 8]
# (rows, cols, group width; -1: one group per row)
SHAPES = [(5, 24, 8), (37, 96, 32), (9, 40, 16), (13, 64, -1), (6, 37, -1)]


def _random_packed(rows, cols, bits, width, with_g_idx, seed):
    """Random codes, float16 scales (signs and magnitudes mixed) and zeros; g_idx from a permutation."""
    g = torch.Generator().manual_seed(seed)
    width = cols if width == -1 else width
    groups = -(-cols // width)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    scales = ((torch.rand(rows, groups, generator=g) + 0.05) * 0.1).half()
    scales[0, 0] = 2**-24  # the smallest scale the grid allows
    zeros = torch.randint(0, 2**bits, (rows, groups), generator=g, dtype=torch.uint8)
    g_idx = None
    if with_g_idx:  # act-order: the group of column j is its rank in a random order, // width
        g_idx = (torch.argsort(torch.randperm(cols, generator=g)) // width).to(torch.int32)
    qw = QuantizedWeight(codes, scales, zeros, g_idx, bits, width)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return qw, dev(pack_rows(codes, bits)), dev(scales), dev(zeros), dev(g_idx)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", [1, 13, 24, 37, 96])
def test_unpack_equals_unpack_rows(bits, cols):
    g = torch.Generator().manual_seed(cols * 10 + bits)
    codes = torch.randint(0, 2**bits, (19, cols), generator=g, dtype=torch.uint8)
    packed = pack_rows(codes, bits).to(DEVICE)
    out = kq.unpack(packed, bits, cols)
    assert torch.equal(out.cpu(), codes)
    assert torch.equal(out, unpack_rows(packed, bits, cols))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows, cols, width", SHAPES)
@pytest.mark.parametrize("with_g_idx", [False, True])
def test_dequantize_bit_identical(bits, rows, cols, width, with_g_idx):
    qw, packed, scales, zeros, g_idx = _random_packed(rows, cols, bits, width, with_g_idx, seed=bits + rows * cols)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = kq.dequantize(packed, scales, zeros, g_idx, bits, cols, qw.group_width, dtype)
        assert out.dtype == dtype and out.shape == (rows, cols)
        assert torch.equal(out.cpu(), qw.dequantize(dtype)), dtype
    # float64: scale * (code - zero) is exact in float32
    ref = qw.scales.double()[:, qw.group_index()] * (qw.codes.double() - qw.zeros.double()[:, qw.group_index()])
    assert torch.equal(kq.dequantize(packed, scales, zeros, g_idx, bits, cols, qw.group_width).cpu().double(), ref)


# the bound on |y - exact| relative to |x| @ |W|^T + |b|: the weight's cast to the activation dtype and the
# output's rounding (one unit each), float32 accumulation
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _check_matmul(y, x, qw, bias):
    w = qw.dequantize(torch.float64)
    b = bias.cpu().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    xd = x.cpu().double()
    exact = xd @ w.t() + b
    size = xd.abs() @ w.abs().t() + b.abs() + 1e-30
    tol = TOL[x.dtype]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert torch.all((y.cpu().double() - exact).abs() <= tol * size), (y.cpu().double() - exact).abs().max()
    twin = torch.nn.functional.linear(x.cpu().float(), qw.dequantize(x.dtype).float(),
                                      None if bias is None else bias.cpu().float())
    assert torch.all((y.cpu().double() - twin.double()).abs() <= tol * size)


MATMUL_CASES = [  # (bits, rows, cols, width, g_idx, m, dtype, bias)
    (4, 37, 96, 32, False, 1, torch.float16, False),
    (4, 37, 96, 32, True, 17, torch.bfloat16, True),
    (4, 13, 64, -1, False, 3, torch.float32, True),
    (3, 37, 96, 32, False, 3, torch.float16, True),
    (3, 9, 40, 16, True, 1, torch.float32, False),
    (3, 6, 37, -1, False, 17, torch.bfloat16, False),
    (2, 5, 24, 8, False, 17, torch.float16, False),
    (2, 13, 64, -1, True, 3, torch.bfloat16, True),
    (2, 37, 96, 32, False, 1, torch.float32, True),
    (8, 9, 40, 16, False, 3, torch.bfloat16, False),
    (8, 37, 96, 32, True, 1, torch.float16, True),
    (8, 5, 24, 8, False, 17, torch.float32, True),
]


@pytest.mark.parametrize("bits, rows, cols, width, with_g_idx, m, dtype, with_bias", MATMUL_CASES)
def test_matmul_equals_dequantize_then_linear(bits, rows, cols, width, with_g_idx, m, dtype, with_bias):
    qw, packed, scales, zeros, g_idx = _random_packed(rows, cols, bits, width, with_g_idx, seed=rows + cols + m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, cols, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(rows, generator=g).to(dtype).to(DEVICE) if with_bias else None
    y = kq.matmul(x, kq.PackedMatrix(packed, scales, zeros, g_idx, bits, cols, qw.group_width), bias)
    _check_matmul(y, x, qw, bias)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matmul_leading_dims_and_pinned_tiles(bits, dtype):
    """A (2, 3, C) input; tiles of 16 so several k steps each fall in one group (the per-tile grid) or not."""
    rows, cols = 21, 48
    for width, blocks in [(16, (16, 16, 16)), (8, (16, 32, 16)), (48, (32, 16, 32))]:
        qw, packed, scales, zeros, g_idx = _random_packed(rows, cols, bits, width, False, seed=width + bits)
        x = torch.randn(2, 3, cols, generator=torch.Generator().manual_seed(bits)).to(dtype).to(DEVICE)
        bias = torch.randn(rows).to(dtype).to(DEVICE)
        y = kq.matmul(x, kq.PackedMatrix(packed, scales, zeros, g_idx, bits, cols, width), bias, blocks=blocks)
        _check_matmul(y, x, qw, bias)


def _weights(rows, cols, dtype, seed):
    """Random weights with the grid's corner cases: an all-zero row, an all-positive and an all-negative row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1] = 0.0
    w[2] = w[2].abs()
    w[3] = -w[3].abs()
    return w.to(dtype).to(DEVICE)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("rows, cols, width, dtype", [(5, 24, 8, torch.float32), (37, 96, 32, torch.float16),
                                                      (13, 64, -1, torch.float32), (6, 37, -1, torch.bfloat16),
                                                      (9, 40, 16, torch.float32)])  # 40/16: a short last group
def test_rtn_pack_equals_rtn_then_pack_rows(bits, sym, rows, cols, width, dtype):
    w = _weights(rows, cols, dtype, seed=bits * 7 + cols)
    spec = QuantSpec(bits=bits, group_size=width, sym=sym)
    qw = rtn(w.cpu(), spec)
    packed, scales, zeros = kq.rtn_pack(w, bits, width, sym)
    assert torch.equal(scales.cpu(), qw.scales)
    assert torch.equal(zeros.cpu(), qw.zeros)
    assert torch.equal(packed.cpu(), pack_rows(qw.codes, bits))
    # float64: every weight is at most half a step from its grid point (unless clamped at the range's ends)
    w64, deq = w.cpu().double(), qw.dequantize(torch.float64)
    step = qw.scales.double()[:, qw.group_index()]
    inner = (qw.codes > 0) & (qw.codes < 2**bits - 1)
    assert torch.all(((w64 - deq).abs() <= step * (0.5 + 1e-6))[inner])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_pack_rounds_ties_to_even(bits, sym):
    """Weights on half steps of an exact grid: every w / scale is a tie, rounded to even like torch.round."""
    maxq, s = 2**bits - 1, 2.0**-4
    xmax = maxq * s / 2 if sym else (maxq - maxq // 3) * s
    xmin = -xmax if sym else -(maxq // 3) * s
    g = torch.Generator().manual_seed(bits)
    steps = torch.randint(0, int(2 * (xmax - xmin) / s) + 1, (7, 40), generator=g)
    w = xmin + steps * (s / 2)
    w[:, 0], w[:, 1] = xmin, xmax
    qw = rtn(w, QuantSpec(bits=bits, group_size=-1, sym=sym))
    assert torch.all(qw.scales.float() == s)
    packed, scales, zeros = kq.rtn_pack(w.to(DEVICE), bits, -1, sym)
    assert torch.equal(packed.cpu(), pack_rows(qw.codes, bits)) and torch.equal(zeros.cpu(), qw.zeros)


def _gptq_inputs(rows, width, bits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * width, width, generator=g, dtype=torch.float64) @ torch.randn(width, width, generator=g,
                                                                                    dtype=torch.float64)
    hinv, _ = _inverse_cholesky(2 * x.t() @ x / x.shape[0], 0.01)
    w = torch.randn(rows, width, generator=g, dtype=torch.float64)
    scale = torch.empty_like(w)
    zero = torch.empty_like(w)
    for a in range(0, width, 8):  # a grid per 8 columns, found on the weights before the loop
        s, z = find_grid(w[:, a:a + 8], bits, sym=False)
        scale[:, a:a + 8], zero[:, a:a + 8] = s.view(-1, 1), z.view(-1, 1)
    return [t.to(dtype).to(DEVICE) for t in (w, hinv, scale, zero)]


@pytest.mark.parametrize("rows, width, bits, dtype", [(5, 16, 4, torch.float32), (21, 24, 3, torch.float32),
                                                      (17, 40, 2, torch.float32), (3, 8, 8, torch.float32),
                                                      (11, 32, 4, torch.float64)])
def test_gptq_block_equals_the_torch_block(rows, width, bits, dtype):
    w, h1, scale, zero = _gptq_inputs(rows, width, bits, dtype, seed=rows + width)
    maxq = 2**bits - 1
    w_ref = w.clone()
    codes_ref, err_ref = _gptq_block_torch(w_ref, h1, scale, zero, maxq)
    w_k = w.clone()
    codes_k, err_k = kq.gptq_block(w_k, h1, scale, zero, maxq)
    assert codes_k.dtype == torch.uint8 and torch.equal(codes_k, codes_ref)
    # the weights are grid points scale·(code − zero), one rounding of the same operands once the codes agree:
    # exact; the errors carry the loop's rounding, each side within column_loop_error of exact arithmetic
    torch.testing.assert_close(w_k, w_ref, rtol=0, atol=0)
    _, err_bound = column_loop_error(w, h1, w_ref, unit=U64 if dtype == torch.float64 else U32)
    assert ((err_k - err_ref).abs().cpu() <= 2 * err_bound).all()
    assert torch.equal(w_k, scale * (codes_k.to(dtype) - zero))  # every column now on its grid


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, group_size=16), QuantSpec(bits=3, group_size=-1, sym=True),
                                  QuantSpec(bits=4, group_size=8, act_order=True)])
def test_whole_layer_gptq_through_the_kernel_equals_the_torch_path(spec, monkeypatch):
    from rechannel.ops.compress.gptq import gptq

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 48, generator=g) @ torch.randn(48, 48, generator=g)
    w, h = torch.randn(10, 48, generator=g).to(DEVICE), (2 * x.t() @ x / 300).to(DEVICE)
    monkeypatch.setenv("RECHANNEL_KERNELS", "torch")
    q_t = gptq(w, h, spec, blocksize=16)[0]
    monkeypatch.setenv("RECHANNEL_KERNELS", "triton")
    q_k = gptq(w, h, spec, blocksize=16)[0]
    assert torch.equal(q_k.codes, q_t.codes)
    assert torch.equal(q_k.scales, q_t.scales) and torch.equal(q_k.zeros, q_t.zeros)

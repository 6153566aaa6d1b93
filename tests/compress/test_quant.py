"""Quantization: the grid against hand-computed values, packing round trips, RTN, and GPTQ against a
straightforward float64 implementation of the published algorithm (every update applied at once)."""

from __future__ import annotations

import pytest
import torch

from rechannel.ops.compress.gptq import gptq
from rechannel.ops.compress.grid import QuantSpec, check_spec, find_grid
from rechannel.ops.compress.rtn import rtn
from rechannel.ops.core.errors import UserError
from rechannel.ops.core.packed import pack_rows, packed_width, unpack_rows


def test_grid_hand_computed():
    x = torch.tensor([[-0.5, 0.25, 1.0], [0.2, 0.4, 0.6], [0.0, 0.0, 0.0]], dtype=torch.float64)
    scale, zero = find_grid(x, bits=2, sym=False)
    # row 0: range [-0.5, 1] / 3 = 0.5, zero round(0.5/0.5) = 1; row 1: xmin clipped to 0: 0.6/3 = 0.2 (as
    # float16: 0.199951171875), zero 0; row 2: all zero -> [-1, 1] / 3, zero round(1/(2/3)) = 2 (1.5 rounds to even)
    s2 = torch.tensor(2 / 3, dtype=torch.float16).double()
    assert scale.tolist() == [0.5, torch.tensor(0.2, dtype=torch.float16).item(), s2.item()]
    assert zero.tolist() == [1.0, 0.0, torch.round(1 / s2).item()]
    scale, zero = find_grid(x[:1], bits=2, sym=True)  # xmax = max(0.5, 1) = 1, range [-1, 1] / 3, zero 2
    assert zero.tolist() == [2.0] and scale.item() == torch.tensor(2 / 3, dtype=torch.float16).item()


def test_rtn_hand_computed_and_dequantize():
    w = torch.tensor([[-0.5, 0.25, 1.0, 0.75]])
    qw = rtn(w, QuantSpec(bits=2, group_size=-1))
    # scale 0.5, zero 1: codes round(w/0.5) + 1 = [0, 1(0.5 rounds to even 0)+1, 3, 2(1.5->2)+1 clamped 3]
    assert qw.codes.tolist() == [[0, 1, 3, 3]]
    assert qw.dequantize().tolist() == [[-0.5, 0.0, 1.0, 1.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64])
def test_pack_round_trip_and_size(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(0, 2**bits, (5, cols), generator=g, dtype=torch.uint8)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_width(cols, bits))
    assert packed.shape[1] == -(-cols * bits // 8)
    assert torch.equal(unpack_rows(packed, bits, cols), codes)


def test_pack_bit_order():
    # 4-bit: code k in the low nibble for even k; 3-bit: codes 1..8 of one row -> 24-bit little-endian stream
    assert pack_rows(torch.tensor([[0x3, 0xA]], dtype=torch.uint8), 4).tolist() == [[0xA3]]
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    stream = sum(int(c) << (3 * k) for k, c in enumerate(codes[0]))
    assert pack_rows(codes, 3).tolist() == [[stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]]


@pytest.mark.parametrize("group", [-1, 4, 6])
def test_rtn_groups_match_per_group_grid(group):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g)
    qw = rtn(w, QuantSpec(bits=3, group_size=group))
    width = 16 if group == -1 else group
    assert qw.scales.shape == (6, -(-16 // width))
    for a in range(0, 16, width):
        scale, zero = find_grid(w[:, a:a + width].double(), 3, False)
        want = scale[:, None] * (torch.clamp(torch.round(w[:, a:a + width].double() / scale[:, None]) + zero[:, None], 0, 7)
                                 - zero[:, None])
        # exact when the codes agree: a float16 scale (11 bits) times an integer ≤ 7 fits float32; a code
        # off by one would be a whole scale (≥ 2^-14) away, far above 1e-6
        torch.testing.assert_close(qw.dequantize()[:, a:a + width].double(), want, rtol=0, atol=1e-6)
    err = (qw.dequantize() - w).abs()  # + 1e-6: float32 w / scale moves a rounding point by ≤ u·|w| ≈ 3e-7
    assert torch.all(err <= qw.scales.float().repeat_interleave(width, 1)[:, :16] / 2 + 1e-6)  # nothing clipped


def reference_gptq(w, h, spec, percdamp=0.01, blocksize=None):
    """GPTQ in float64 as the paper states it, every column's error applied to all later columns at once.

    One detail is the published code's, not the paper's: a group that starts inside a block of
    `blocksize` columns takes its grid from the weights as they were when the block started (the code reads
    them from the matrix its lazy updates have not reached yet)."""
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    per_row = find_grid(w, spec.bits, spec.sym, exact=True) if spec.group_size == -1 else None
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    width = cols if spec.group_size == -1 else spec.group_size
    static = [find_grid(w[:, a:a + width], spec.bits, spec.sym, exact=True) for a in range(0, cols, width)]
    perm = torch.argsort(torch.diag(h), descending=True) if spec.act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(cols, dtype=torch.float64) * percdamp * torch.diag(h).mean()
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    out = torch.zeros_like(w)
    grid = per_row
    at_block_start = w.clone()
    for i in range(cols):
        if blocksize and i % blocksize == 0:
            at_block_start = w.clone()
        if spec.group_size != -1:
            if spec.static_groups:
                grid = static[int(perm[i]) // width]
            elif i % width == 0:
                grid = find_grid(at_block_start[:, i:i + width], spec.bits, spec.sym, exact=True)
        scale, zero = grid
        q = scale * (torch.clamp(torch.round(w[:, i] / scale) + zero, 0, spec.maxq) - zero)
        err = (w[:, i] - q) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
        out[:, i] = q
    return out[:, torch.argsort(perm)]  # on the float32 (here float64) grid the loop used


def _problem(rows, cols, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 2.0, cols)
    x[:, 3] = 0  # a dead input
    return torch.randn(rows, cols, generator=g, dtype=torch.float64), (2 * x.t() @ x / tokens).double()


@pytest.mark.parametrize("spec, blocksize", [
    (QuantSpec(4, -1), 16), (QuantSpec(3, 16), 16), (QuantSpec(2, 32, sym=True), 16),
    (QuantSpec(4, 16, act_order=True), 8), (QuantSpec(3, 16, act_order=True, static_groups=True), 16),
    (QuantSpec(8, -1, act_order=True), 128), (QuantSpec(4, 48), 16),  # 64 = 48 + a shorter last group
    (QuantSpec(3, 8), 32), (QuantSpec(4, 8, act_order=True), 32),  # groups that start inside a block
])
def test_gptq_matches_float64_reference(spec, blocksize):
    w, h = _problem(10, 64, 300, seed=spec.bits)
    qw, report, got = gptq(w, h, spec, blocksize)
    ref = reference_gptq(w, h, spec, blocksize=blocksize)
    # lazy and immediate updates round differently: a code may flip on a near-tie, all else agrees closely
    assert ((got - ref).abs() > 1e-9).float().mean() < 0.01
    # both loops run in float64 (differences ~cols·κ(H)·u64 ≲ 1e-11): only a near-tie code flip, one grid
    # step (≤ the largest scale, +1% for its float16 rounding), can exceed rounding
    torch.testing.assert_close(got, ref, rtol=0, atol=float(qw.scales.max()) * 1.01)
    # the stored codes and float16 scales give the loop's weights back to float16 precision
    # float16 scales are within 2^-11 relative of the loop's, and scale × (code − zero) is exact in float32;
    # atol covers the exact zeros (code == zero)
    torch.testing.assert_close(qw.dequantize(torch.float64), got, rtol=2**-10, atol=1e-12)
    assert report.retries == 0 and torch.all(got[:, 3] == 0)
    assert (qw.g_idx is not None) == (spec.act_order and not spec.static_groups and spec.group_size != -1)


def test_gptq_beats_rtn_on_its_objective():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w, h = torch.randn(32, 64, generator=g), 2 * x.t() @ x / 400
    spec = QuantSpec(3, 16)
    loss = [float((((q.dequantize() - w) @ h) * (q.dequantize() - w)).sum())
            for q in (gptq(w, h, spec)[0], rtn(w, spec))]
    assert loss[0] < 0.8 * loss[1]


def test_bad_specs():
    with pytest.raises(UserError, match="bit widths"):
        check_spec(QuantSpec(bits=5))
    with pytest.raises(UserError, match="positive group size"):
        check_spec(QuantSpec(group_size=0))

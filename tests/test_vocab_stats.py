"""Vocabulary statistics: the Triton kernel (interpreter here) and its torch twin against float64 math.

The float64 reference materialises p, q and every gradient explicitly, as DESIGN.md writes them, so it
shares no algebra with the streamed, centred-through-y formulas under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from rechannel.ops.vocab_stats import COL, vocab_stats_torch
from rechannel.triton_kernels import vocab_stats as kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BETA = 0.3


def _reference(zp: torch.Tensor, zq: torch.Tensor, y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    zp, zq = zp.double().cpu(), zq.double().cpu()
    lp, lq = zp.log_softmax(1), zq.log_softmax(1)
    p, q = lp.exp(), lq.exp()
    lm = torch.log((1 - beta) * p + beta * q)  # β: the teacher's weight
    kl = (p * (lp - lq)).sum(1)
    kl_pm = (p * (lp - lm)).sum(1)
    e_y = torch.nn.functional.one_hot(y.cpu(), zp.shape[1]).double()
    g_rkl = p * (lq - lp + kl[:, None])
    g_jsd = (1 - beta) * p * (-(lp - lm) + kl_pm[:, None])
    rest = 1 - e_y
    return {
        "lnorm_p": -lp.gather(1, y.cpu()[:, None])[:, 0], "lnorm_q": -lq.gather(1, y.cpu()[:, None])[:, 0], "kl_pq": kl, "kl_pm": kl_pm,
        "kl_qm": (q * (lq - lm)).sum(1), "entropy_p": -(p * lp).sum(1), "sum_p2": (p * p).sum(1),
        "sum_dqp2": ((q - p) ** 2).sum(1), "p_rest": (p * rest).sum(1), "p2_rest": (p * p * rest).sum(1),
        "rkl_norm2": (g_rkl ** 2).sum(1), "jsd_norm2": (g_jsd ** 2).sum(1),
        "sampled_norm2": ((e_y - p) ** 2).sum(1),
    }


def _derived(out: torch.Tensor, y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The full-vocabulary squared norms as align forms them from the columns."""
    o = out.double().cpu()
    p_y = 1 - o[:, COL["p_rest"]]
    return {
        "rkl_norm2": p_y ** 2 * o[:, COL["b_rkl"]] ** 2 + o[:, COL["n_rkl"]],
        "jsd_norm2": (1 - beta) ** 2 * (p_y ** 2 * o[:, COL["b_jsd"]] ** 2 + o[:, COL["n_jsd"]]),
        "sampled_norm2": o[:, COL["p_rest"]] ** 2 + o[:, COL["p2_rest"]],
    }


def _check(out: torch.Tensor, ref: dict[str, torch.Tensor], y: torch.Tensor, rtol: float) -> None:
    o = out.double().cpu()
    for name, want in ref.items():
        got = o[:, COL[name]] if name in COL else _derived(out, y, BETA)[name]
        scale = want.abs() + (1e-6 if name.startswith(("lnorm", "entropy", "kl")) else 0.0)
        err = ((got - want).abs() / scale.clamp_min(1e-30)).max().item()
        assert err < rtol, f"{name}: relative error {err:.2e}\n got {got}\nwant {want}"


def _logits(t: int, v: int, seed: int, offset: float = 0.0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(t, v, generator=g) * scale + offset
    zq = zp + torch.randn(t, v, generator=g) * 1.5  # a related teacher
    y = torch.randint(0, v, (t,), generator=g)
    return zp, zq, y


def _peaked(v: int, seed: int):
    """Rows where the observed token holds p_y = 1 - 1e-8 to 1 - 1e-10: in float32, 1 - p_y would round to 0 or
    to 1.2e-7; the float64 reference still resolves it to ~6 digits (sharper peaks would defeat float64 too)."""
    zp, zq, y = _logits(3, v, seed)
    rows = torch.arange(3)
    zp[rows, y] = zp.max(1).values + torch.tensor([20.0, 23.0, 25.0])
    zq[0, y[0]] += 30.0
    return zp, zq, y


@pytest.mark.parametrize("v", [49152, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_twin_equal_float64(v, dtype):
    zp, zq, y = _logits(3, v, seed=v % 97, offset=0.0)
    zp, zq = zp.to(dtype), zq.to(dtype)  # the reference sees the same rounded logits
    ref = _reference(zp, zq, y, BETA)
    for fn in (vocab_stats_torch, kernel.vocab_stats):
        _check(fn(zp.to(DEVICE), zq.to(DEVICE), y.to(DEVICE), BETA), ref, y, rtol=2e-4)


@pytest.mark.parametrize("offset", [-3000.0, 5000.0])
def test_large_logit_offsets_change_nothing(offset):
    zp, zq, y = _logits(2, 1031, seed=3)
    ref = _reference(zp, zq, y, BETA)
    got = kernel.vocab_stats((zp + offset).to(DEVICE), (zq - offset).to(DEVICE), y.to(DEVICE), BETA)
    # an offset of 5000 leaves float32 logits ~5e-4 apart: the statistics see that rounding, nothing more
    _check(got, ref, y, rtol=5e-3)


@pytest.mark.parametrize("v", [49152, 151936])
def test_peaked_rows_stay_exact(v):
    zp, zq, y = _peaked(v, seed=11)
    ref = _reference(zp, zq, y, BETA)
    assert ref["p_rest"].max() < 1e-7  # below float32's resolution of 1 - p_y: the case the centring exists for
    for fn in (vocab_stats_torch, kernel.vocab_stats):
        out = fn(zp.to(DEVICE), zq.to(DEVICE), y.to(DEVICE), BETA)
        _check(out, {k: ref[k] for k in ("p_rest", "p2_rest", "rkl_norm2", "jsd_norm2", "sampled_norm2",
                                         "kl_pq", "lnorm_p", "lnorm_q")}, y, rtol=2e-3)


def test_odd_shapes_and_strided_rows():
    zp, zq, y = _logits(5, 4099, seed=5)
    wide = torch.zeros(5, 5000)
    wide[:, :4099] = zq
    ref = _reference(zp, zq, y, BETA)
    assert wide.to(DEVICE)[:, :4099].stride(0) == 5000  # the slice is taken where the kernel runs: rows strided
    for block in (512, 2048):
        out = kernel.vocab_stats(zp.to(DEVICE), wide.to(DEVICE)[:, :4099], y.to(DEVICE), BETA, block=block)
        _check(out, ref, y, rtol=2e-4)


def test_twin_matches_kernel_columnwise():
    zp, zq, y = _logits(4, 3001, seed=9, scale=6.0)
    a = vocab_stats_torch(zp, zq, y, BETA)
    b = kernel.vocab_stats(zp.to(DEVICE), zq.to(DEVICE), y.to(DEVICE), BETA).cpu()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert math.isclose(a[0, COL["entropy_p"]].item(), _reference(zp, zq, y, BETA)["entropy_p"][0].item(),
                        rel_tol=1e-5)


def test_the_gpu_benchmark_reference_computes_the_same_columns():
    """tests/bench/vocab.py checks the kernel against its own eager formulas on the GPU: they must be right."""
    from tests.bench.vocab import eager

    zp, zq, y = _logits(6, 3001, seed=21, scale=3.0)
    assert torch.allclose(eager(zp, zq, y), vocab_stats_torch(zp, zq, y, 0.5), rtol=1e-4, atol=1e-6)

"""GPU benchmark of the vocabulary-statistics kernel (align) against torch, at 4096 tokens x 151936 vocabulary.

Needs a CUDA GPU (without one it says so and exits 0). Three paths compute the same per-token columns:
- eager: the plain torch formulas on the whole [tokens, vocab] matrix in float32 (what one writes first);
- chunked: ops.align.vocab_stats.vocab_stats_torch, the same three passes as the kernel, 8192 columns at a time;
- triton: triton_kernels.vocab_stats.
Each is checked against the eager result, then timed with triton.testing.do_bench (median) and its peak
memory measured above the inputs. The roofline: the kernel reads both logit matrices three times, so its
floor is 3 x 2 x T x V x bytes over the copy bandwidth measured in the same run.
Appends a markdown section to --out (default: stdout only).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys

import torch

T, V, BETA = 4096, 151936, 0.5


def eager(zp: torch.Tensor, zq: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The direct formulas, every [T, V] intermediate materialised in float32."""
    lp, lq = zp.float().log_softmax(-1), zq.float().log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    lm = torch.logaddexp(lp + math.log1p(-BETA), lq + math.log(BETA))
    rows = torch.arange(zp.shape[0], device=zp.device)
    other = torch.ones_like(p)
    other[rows, y] = 0
    a_rkl, a_jsd = lq - lp, lp - lm
    b_rkl = (p * other * (a_rkl - a_rkl[rows, y][:, None])).sum(1)
    b_jsd = (p * other * (a_jsd - a_jsd[rows, y][:, None])).sum(1)
    n_rkl = (p * p * other * (a_rkl - a_rkl[rows, y][:, None] - b_rkl[:, None]) ** 2).sum(1)
    n_jsd = (p * p * other * (a_jsd - a_jsd[rows, y][:, None] - b_jsd[:, None]) ** 2).sum(1)
    return torch.stack([-lp[rows, y], -lq[rows, y], (p * (lp - lq)).sum(1), (p * (lp - lm)).sum(1),
                        (q * (lq - lm)).sum(1), -(p * lp).sum(1), (p * p).sum(1), ((q - p) ** 2).sum(1),
                        (p * other).sum(1), (p * p * other).sum(1), b_rkl, n_rkl, b_jsd, n_jsd], 1)


def _copy_bandwidth() -> float:
    from triton.testing import do_bench

    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / (do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3)


def _peak(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rows(zp: torch.Tensor, zq: torch.Tensor, y: torch.Tensor, bw: float) -> list[str]:
    from functools import partial

    from triton.testing import do_bench

    from rechannel.ops.align.vocab_stats import vocab_stats_torch
    from rechannel.triton_kernels.vocab_stats import vocab_stats

    ref = eager(zp, zq, y)
    floor_ms = 3 * 2 * zp.numel() * zp.element_size() / bw * 1e3
    paths = {"eager": partial(eager, zp, zq, y), "chunked torch": partial(vocab_stats_torch, zp, zq, y, BETA),
             "triton": partial(vocab_stats, zp, zq, y, BETA)}
    rows, ms_eager = [], None
    for name, fn in paths.items():
        diff = ((fn() - ref).abs() / (ref.abs() + 1e-6)).max().item()
        ms = do_bench(fn, return_mode="median")
        ms_eager = ms_eager or ms
        rows.append(f"| {str(zp.dtype).split('.')[-1]} | {name} | {ms:.2f} | {ms_eager / ms:.2f}x | "
                    f"{_peak(fn):.0f} | {floor_ms / ms:.0%} | {diff:.1e} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench vocab: no CUDA GPU here, skipped")
        return 0
    g = torch.Generator(device="cuda").manual_seed(0)
    bw = _copy_bandwidth()
    lines = [f"\n## align vocabulary statistics, {T} tokens x {V} vocabulary "
             f"({torch.cuda.get_device_name()}, {datetime.date.today()})\n",
             "| logits | path | median ms | vs eager | peak MB above inputs | % of 3-pass copy floor | max rel. diff |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for dtype in (torch.bfloat16, torch.float32):
        zp = (torch.randn(T, V, device="cuda", generator=g) * 3).to(dtype)
        zq = (zp.float() + torch.randn(T, V, device="cuda", generator=g)).to(dtype)
        y = torch.randint(0, V, (T,), device="cuda", generator=g)
        lines += _rows(zp, zq, y, bw)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark of the pruning kernels against the torch path, on LLaMA-7B layer shapes.

Run by `make bench` on a machine with a CUDA GPU. Times are medians of triton.testing.do_bench; the
roofline is the bytes each kernel must move (read W and s, write the mask) over the device's copy
bandwidth measured in the same run. Writes a markdown section to --out (default: stdout).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/k/v/o, gate/up, down


def _copy_bandwidth() -> float:
    """Achievable device memory bandwidth (bytes/s): a 2 GiB copy, read + write."""
    from triton.testing import do_bench

    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def _mask_cases(w: torch.Tensor, s: torch.Tensor, k: int) -> list:
    """(name, torch path, triton kernel) for one weight matrix."""
    from rechannel.ops.compress.masks import n_of_m_smallest, rows_k_smallest, wanda_metric
    from rechannel.triton_kernels.prune_mask import n_of_m_mask, row_k_smallest_mask

    return [("wanda 50% unstructured", lambda: rows_k_smallest(wanda_metric(w, s), k),
             lambda: row_k_smallest_mask(w, s, k)),
            ("wanda 2:4", lambda: n_of_m_smallest(wanda_metric(w, s), 2, 4), lambda: n_of_m_mask(w, s, 2, 4))]


def _bench_masks(bw: float) -> list[str]:
    from triton.testing import do_bench

    rows = ["| kernel | shape (out×in) | torch ms | triton ms | speed-up | GB/s | % of copy bandwidth |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for r, c in SHAPES:
        w = torch.randn(r, c, device="cuda", dtype=torch.float16)
        s = torch.rand(c, device="cuda") + 0.1
        k = c // 2
        cases = _mask_cases(w, s, k)
        for name, torch_fn, triton_fn in cases:
            assert torch.equal(torch_fn(), triton_fn()), f"{name} {r}x{c}: masks differ"
            t_torch = do_bench(torch_fn, return_mode="median")
            t_triton = do_bench(triton_fn, return_mode="median")
            moved = r * c * 2 + c * 4 + r * c  # read fp16 W and s, write the int8 mask
            gbs = moved / (t_triton * 1e-3) / 1e9
            rows.append(f"| {name} | {r}×{c} | {t_torch:.3f} | {t_triton:.3f} | {t_torch / t_triton:.1f}x "
                        f"| {gbs:.0f} | {100 * gbs * 1e9 / bw:.0f}% |")
    return rows


def _bench_sparsegpt() -> list[str]:
    import time

    from rechannel.ops.compress.masks import Pattern
    from rechannel.ops.compress.protocols import hessian_error
    from rechannel.ops.compress.sparsegpt import sparsegpt

    rows = ["| SparseGPT layer | pattern | torch path s | triton path s | speed-up | mask agreement "
            "| rel. output error torch / triton |", "|---|---|---:|---:|---:|---:|---:|"]
    g = torch.Generator(device="cuda").manual_seed(0)
    for r, c in [(4096, 4096), (11008, 4096)]:
        x = torch.randn(2048, c, device="cuda", generator=g)
        h = 2 * x.t() @ x / x.shape[0]
        w = torch.randn(r, c, device="cuda", generator=g)
        for pattern in (Pattern(), Pattern(2, 4)):
            out = {}
            for path in ("torch", "triton"):
                os.environ["RECHANNEL_KERNELS"] = path
                sparsegpt(w, h, 0.5, pattern)  # warm-up (compilation)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out[path] = sparsegpt(w, h, 0.5, pattern)[:2]
                torch.cuda.synchronize()
                out[path + "_s"] = time.perf_counter() - t0
            # the paths round differently (FMA), so near-tie mask entries can flip; compare quality instead
            agree = (out["torch"][1] == out["triton"][1]).float().mean().item()
            errs = [hessian_error(w, out[p][0], h) for p in ("torch", "triton")]
            rows.append(f"| {r}×{c} | {pattern} | {out['torch_s']:.3f} | {out['triton_s']:.3f} "
                        f"| {out['torch_s'] / out['triton_s']:.1f}x | {100 * agree:.3f}% | {errs[0]:.4f} / {errs[1]:.4f} |")
    os.environ.pop("RECHANNEL_KERNELS", None)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="-")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: make bench needs a CUDA GPU (the kernels are timed against the torch path there)", file=sys.stderr)
        sys.exit(1)
    import triton

    bw = _copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    lines = [f"## Pruning kernels — {props.name}, {datetime.date.today().isoformat()}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; medians of triton.testing.do_bench. "
             f"Copy bandwidth measured in the same run: {bw / 1e12:.2f} TB/s (read + write of 2 GiB).", "",
             *_bench_masks(bw), "", *_bench_sparsegpt(), ""]
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        print(text)


if __name__ == "__main__":
    main()

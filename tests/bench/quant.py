"""GPU benchmark of the quantization kernels against the torch path, on LLaMA-7B layer shapes.

Needs a CUDA GPU (without one it says so and exits 0). Every kernel is first checked against the torch
path, then timed with triton.testing.do_bench (medians):
- W4A16 / W3A16 fused matmul (group 128) vs the fp16 matmul x @ W^T with a dense fp16 W, at batch M = 1,
  8, 32, 128; the roofline is the bytes the fused kernel must move (packed weights, scales, zeros and
  activations read, the output written) over the copy bandwidth measured in the same run;
- rtn_pack vs ops.compress.rtn.rtn + pack_rows, as GB/s of fp16 weight read;
- GPTQ on one 4096x4096 layer with a random Hessian: ops.compress.gptq.gptq with RECHANNEL_KERNELS=torch vs triton.
Appends a markdown section to --out (default: stdout only).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from functools import partial

import torch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/k/v/o, gate/up, down
BATCHES = [1, 8, 32, 128]
GROUP = 128


def _copy_bandwidth() -> float:
    """Achievable device memory bandwidth (bytes/s): a 2 GiB copy, read + write."""
    from triton.testing import do_bench

    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def _packed(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from rechannel.triton_kernels.quant import rtn_pack

    return rtn_pack(w, bits, GROUP, sym=False)


def _bench_matmul(bw: float) -> list[str]:
    from triton.testing import do_bench

    from rechannel.triton_kernels.quant import PackedMatrix, dequantize, matmul

    rows = ["| fused matmul | shape (out×in) | M | fp16 ms | quantized ms | speed-up | GB/s | % of copy bandwidth |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    g = torch.Generator(device="cuda").manual_seed(0)
    for r, c in SHAPES:
        w = torch.randn(r, c, device="cuda", dtype=torch.float16, generator=g) * 0.02
        for bits in (4, 3):
            packed, scales, zeros = _packed(w, bits)
            w_q = dequantize(packed, scales, zeros, None, bits, c, GROUP, torch.float16)  # the same weight, dense
            for m in BATCHES:
                x = torch.randn(m, c, device="cuda", dtype=torch.float16, generator=g)
                fused = partial(matmul, x, PackedMatrix(packed, scales, zeros, None, bits, c, GROUP))
                dense = partial(torch.matmul, x, w_q.t())
                y, ref = fused().float(), dense().float()  # the first fused call autotunes
                size = x.float().abs() @ w_q.float().abs().t()
                assert torch.all((y - ref).abs() <= 1e-2 * size + 1e-6), f"W{bits} {r}x{c} M={m}: results differ"
                t_dense = do_bench(dense, return_mode="median")
                t_fused = do_bench(fused, return_mode="median")
                moved = packed.numel() + scales.numel() * 2 + zeros.numel() + m * c * 2 + m * r * 2
                gbs = moved / (t_fused * 1e-3) / 1e9
                rows.append(f"| W{bits}A16 g{GROUP} | {r}×{c} | {m} | {t_dense:.4f} | {t_fused:.4f} "
                            f"| {t_dense / t_fused:.2f}x | {gbs:.0f} | {100 * gbs * 1e9 / bw:.0f}% |")
    return rows


def _rtn_torch(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch path of ops.compress.rtn.rtn, then packing (rtn itself would take the kernel for a CUDA tensor)."""
    from rechannel.ops.compress.grid import QuantSpec
    from rechannel.ops.compress.rtn import rtn
    from rechannel.ops.core.packed import pack_rows

    os.environ["RECHANNEL_KERNELS"] = "torch"
    try:
        qw = rtn(w, QuantSpec(bits=bits, group_size=GROUP))
    finally:
        del os.environ["RECHANNEL_KERNELS"]  # back to auto: CUDA tensors take the kernels
    return pack_rows(qw.codes, bits), qw.scales, qw.zeros


def _bench_rtn() -> list[str]:
    from triton.testing import do_bench

    rows = ["| RTN + pack | shape (out×in) | torch ms | triton ms | speed-up | triton GB/s of fp16 W |",
            "|---|---|---:|---:|---:|---:|"]
    g = torch.Generator(device="cuda").manual_seed(1)
    for r, c in SHAPES:
        w = torch.randn(r, c, device="cuda", dtype=torch.float16, generator=g) * 0.02
        for bits in (4, 3):
            torch_path = partial(_rtn_torch, w, bits)
            fused = partial(_packed, w, bits)
            assert all(torch.equal(a, b) for a, b in zip(torch_path(), fused(), strict=True)), \
                f"rtn_pack W{bits} {r}x{c}: differs from rtn + pack_rows"
            t_torch = do_bench(torch_path, return_mode="median")
            t_fused = do_bench(fused, return_mode="median")
            gbs = r * c * 2 / (t_fused * 1e-3) / 1e9
            rows.append(f"| {bits}-bit g{GROUP} | {r}×{c} | {t_torch:.3f} | {t_fused:.3f} "
                        f"| {t_torch / t_fused:.1f}x | {gbs:.0f} |")
    return rows


def _bench_gptq() -> list[str]:
    from rechannel.ops.compress.gptq import gptq
    from rechannel.ops.compress.grid import QuantSpec
    from rechannel.ops.compress.protocols import hessian_error

    rows = ["| GPTQ layer 4096×4096 | spec | torch path s | triton path s | speed-up | code agreement "
            "| rel. output error torch / triton |", "|---|---|---:|---:|---:|---:|---:|"]
    g = torch.Generator(device="cuda").manual_seed(2)
    r = c = 4096
    x = torch.randn(2048, c, device="cuda", generator=g)
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(r, c, device="cuda", generator=g) * 0.02
    for spec in (QuantSpec(bits=4, group_size=GROUP), QuantSpec(bits=3, group_size=GROUP, act_order=True)):
        out = {}
        for path in ("torch", "triton"):
            os.environ["RECHANNEL_KERNELS"] = path
            gptq(w, h, spec)  # warm-up (compilation)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out[path] = gptq(w, h, spec)[0]
            torch.cuda.synchronize()
            out[path + "_s"] = time.perf_counter() - t0
        # FMA and reduction order differ between the paths: a few near-tie codes can flip; compare quality
        agree = (out["torch"].codes == out["triton"].codes).float().mean().item()
        errs = [hessian_error(w, out[p].dequantize(), h) for p in ("torch", "triton")]
        name = f"{spec.bits}-bit g{spec.group_size}" + (" act-order" if spec.act_order else "")
        rows.append(f"| | {name} | {out['torch_s']:.2f} | {out['triton_s']:.2f} "
                    f"| {out['torch_s'] / out['triton_s']:.1f}x | {100 * agree:.3f}% | {errs[0]:.4f} / {errs[1]:.4f} |")
    os.environ.pop("RECHANNEL_KERNELS", None)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="-", help="markdown file to append the results to (default: stdout only)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench quant: no CUDA GPU here, the quantization kernel benchmark is skipped", file=sys.stderr)
        return
    import triton

    bw = _copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    lines = [f"## Quantization kernels — {props.name}, {datetime.date.today().isoformat()}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; medians of triton.testing.do_bench. "
             f"Copy bandwidth measured in the same run: {bw / 1e12:.2f} TB/s (read + write of 2 GiB). "
             f"Fused matmul: fp16 activations, asymmetric group-{GROUP} RTN weights; its GB/s counts packed "
             "weights, scales, zeros and activations read and the output written.", "",
             *_bench_matmul(bw), "", *_bench_rtn(), "", *_bench_gptq(), ""]
    text = "\n".join(lines) + "\n"
    if args.out != "-":
        with open(args.out, "a") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()

"""Compile every Triton kernel for an NVIDIA GPU on a machine without one, through the real launch path.

The interpreter runs the kernels' arithmetic but not Triton's compiler: a kernel can pass every test here
and still fail to compile for a GPU (a construct the compiler rejects, a type it will not unify, a tile
that does not fit). This script, run outside the interpreter, puts a stand-in driver in place that answers
what a launch asks before compiling (device, stream, target), and turns every launch into a compile-only
warm-up: each wrapper in rechannel.triton_kernels is called on small CPU tensors exactly as the ops call
it, so the kernels are specialised on the argument types and constants a real run would give them, and
compiled to PTX and a cubin by ptxas. Launch configurations that only a CUDA tensor reaches (the
autotuned matmul tiles, rtn_pack's row tile) are compiled explicitly.

Usage: python tests/kernel_compile.py [--arch 90] [--arch 80]   (one JSON line per compiled kernel)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import orjson
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction


class CompileOnlyDriver:
    """The parts of the CUDA driver a launch consults before it compiles; nothing is ever run."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return self.target.arch  # launches cache compiled kernels per device: one device per target

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


COMPILED: list = []  # (kernel name, CompiledKernel, launch constants and dtypes), in launch order


def _compile_only(run):
    def warm(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        constants = {p.name: kwargs[p.name] for p in self.params if p.is_constexpr and p.name in kwargs}
        dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)})
        COMPILED.append((self.fn.__name__, kernel, {"constants": constants, "tensor_dtypes": dtypes}))
        return kernel
    return warm


def ptxas_usage(kernel, arch: int) -> dict:
    """Registers, spill bytes and shared memory, as ptxas reports them for this kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    text = log.stderr + log.stdout

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads")}


def launch_all(tiles: bool) -> None:
    """Call every kernel wrapper as the ops do, on small CPU tensors, in each dtype and mode it supports;
    with `tiles`, also compile every tile the matmul's autotuner may pick."""
    from rechannel.triton_kernels import prune_mask, quant, sparsegpt, vocab_stats

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(48, 4096, generator=g).to(dtype)
        s = torch.rand(4096, generator=g)
        prune_mask.row_k_smallest_mask(w, s, 2048, zero=True)
        prune_mask.row_k_smallest_mask(w, None, 2048)
        for n, m in ((2, 4), (4, 8)):
            prune_mask.n_of_m_mask(w, s, n, m, zero=True)
        zp = torch.randn(8, 49152, generator=g).to(dtype)
        vocab_stats.vocab_stats(zp, zp.flip(1), torch.arange(8))
    for width, n, m in ((128, 0, 0), (128, 2, 4), (256, 4, 8)):  # unstructured, 2:4, 4:8 at the widest block
        w1, h1 = torch.randn(64, width, generator=g), torch.eye(width)
        sparsegpt.obs_block(w1, h1, torch.zeros(64, width, dtype=torch.bool), n, m)
    for dtype in (torch.float32, torch.float64):  # float64: what the tests compare against
        w1, h1 = torch.randn(64, 128, generator=g, dtype=dtype), torch.eye(128, dtype=dtype)
        quant.gptq_block(w1, h1, torch.ones(64, 128), torch.zeros(64, 128), 15)
    for bits in quant.BITS:
        _launch_quant(quant, bits, g, tiles)


def _launch_quant(quant, bits: int, g: torch.Generator, tiles: bool) -> None:
    rows, cols, width = 96, 512, 128
    w = torch.randn(rows, cols, generator=g, dtype=torch.float16)
    packed, scales, zeros = quant.rtn_pack(w, bits, width, sym=False)
    quant.rtn_pack(w.float(), bits, -1, sym=True)
    quant.unpack(packed, bits, cols)
    g_idx = torch.arange(cols) // width
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        quant.dequantize(packed, scales, zeros, g_idx, bits, cols, width, dtype)
        x = torch.randn(5, cols, generator=g).to(dtype)
        quant.matmul(x, quant.PackedMatrix(packed, scales, zeros, None, bits, cols, width), torch.zeros(rows, dtype=dtype))
        quant.matmul(x, quant.PackedMatrix(packed, scales, zeros, g_idx, bits, cols, width))  # act-order: g_idx
        if tiles and (dtype != torch.float32 or bits == 4):  # float32 activations: one width is enough
            _autotuned_tiles(quant, x, packed, scales, zeros, bits, cols, width)
    if bits == 4:  # compressed-tensors files keep their scales' dtype: llm-compressor's bfloat16, rechannel's float32
        x = torch.randn(5, cols, generator=g).to(torch.bfloat16)
        for scale_dtype in (torch.bfloat16, torch.float32):
            quant.dequantize(packed, scales.to(scale_dtype), zeros, None, bits, cols, width, torch.bfloat16)
            quant.matmul(x, quant.PackedMatrix(packed, scales.to(scale_dtype), zeros, None, bits, cols, width))
    # rtn_pack's tile of rows on a GPU
    quant._rtn_pack_kernel.warmup(w, packed, scales, zeros, rows, cols, cols // width, packed.shape[1], cols,
                                  packed.shape[1], scales.shape[1], zeros.shape[1], width, BITS=bits, SYM=False,
                                  BLOCK_R=4, BLOCK_C=128, enable_fp_fusion=False, grid=(1,))


def _autotuned_tiles(quant, x, packed, scales, zeros, bits, cols, width) -> None:
    """Every tile the CUDA autotuner may pick, at the smallest batch tile (the memory-bound case)."""
    y = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype)
    act = {torch.float32: quant._F32, torch.float16: quant._F16, torch.bfloat16: quant._BF16}[x.dtype]
    for config in quant._MATMUL_CONFIGS:
        quant._matmul_kernel.warmup(
            x, packed, scales, zeros, zeros, y, y, x.shape[0], packed.shape[0], cols, packed.shape[1], cols,
            packed.shape[1], scales.shape[1], zeros.shape[1], y.shape[1], BITS=bits, GROUP_WIDTH=width,
            HAS_G_IDX=False, HAS_BIAS=False, ACT=act, BLOCK_M=16, **config.kwargs, num_warps=config.num_warps,
            num_stages=config.num_stages, enable_fp_fusion=True, grid=(1,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x 10 (default 90 and 80)")
    parser.add_argument("--tiles", type=int, action="append",
                        help="the archs for which every autotuned matmul tile is compiled too (default 90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("error: run without TRITON_INTERPRET: the interpreter compiles nothing")
    JITFunction.run = _compile_only(JITFunction.run)
    for arch in args.arch or [90, 80]:
        driver.set_active(CompileOnlyDriver(arch))
        COMPILED.clear()
        launch_all(arch in (args.tiles or [90]))
        for name, kernel, launch in COMPILED:
            record = {"arch": arch, "kernel": name, **launch, "cubin_bytes": len(kernel.asm["cubin"]),
                      "num_warps": kernel.metadata.num_warps, "num_stages": kernel.metadata.num_stages,
                      "shared": kernel.metadata.shared, **ptxas_usage(kernel, arch)}
            sys.stdout.buffer.write(orjson.dumps(record) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

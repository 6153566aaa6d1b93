"""Every Triton kernel compiles to a cubin for Hopper (sm_90) and Ampere (sm_80), on this machine without a GPU.

The interpreter checks the kernels' arithmetic; this checks that Triton's compiler and ptxas accept them,
specialised as the wrappers launch them (tests/kernel_compile.py). A kernel the interpreter runs but the
compiler rejects (a loop-carried variable whose type changes, say) fails here instead of on a GPU.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "kernel_compile.py"
ARCHES = (90, 80)


def jit_kernels() -> set[str]:
    """Names of the @triton.jit functions named *_kernel in triton_kernels/ (the launchable ones)."""
    names = set()
    for path in (ROOT / "triton_kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    ast.unparse(d).startswith("triton.jit") for d in node.decorator_list):
                names.add(node.name)
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # compile for real, not from a cache
    args = [arg for arch in ARCHES for arg in ("--arch", str(arch))]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    return [orjson.loads(line) for line in done.stdout.splitlines()]


def test_every_kernel_compiles_for_each_arch(compiled):
    kernels = jit_kernels()
    assert {"_vocab_stats_kernel", "_matmul_kernel", "_rtn_pack_kernel", "_obs_block_kernel"} <= kernels
    for arch in ARCHES:
        assert {r["kernel"] for r in compiled if r["arch"] == arch} == kernels, arch
    for record in compiled:
        assert record["cubin_bytes"] > 0 and 0 < record["registers"] <= 255, record


def _of(compiled: list[dict], arch: int, kernel: str) -> list[dict]:
    return [r for r in compiled if r["arch"] == arch and r["kernel"] == kernel]


def test_launch_variants_are_covered(compiled):
    """What a GPU run reaches on either arch: every logit dtype of vocab_stats, g_idx in the matmul,
    rtn_pack's GPU row tile, float64 GPTQ blocks and 4:8 SparseGPT blocks at the widest block."""
    for arch in ARCHES:
        vocab = _of(compiled, arch, "_vocab_stats_kernel")
        assert {d for r in vocab for d in r["tensor_dtypes"]} >= {"float32", "float16", "bfloat16"}
        assert any(r["constants"]["HAS_G_IDX"] for r in _of(compiled, arch, "_matmul_kernel"))
        assert 4 in {r["constants"]["BLOCK_R"] for r in _of(compiled, arch, "_rtn_pack_kernel")}
        for kernel in ("_matmul_kernel", "_dequantize_kernel"):  # scales as compressed-tensors files hold them
            dtypes = [set(r["tensor_dtypes"]) for r in _of(compiled, arch, kernel)]
            assert any({"bfloat16", "uint8"} <= d and "float16" not in d for d in dtypes), kernel
            assert any({"float32", "bfloat16", "uint8"} <= d and "float16" not in d for d in dtypes), kernel
        assert {r["constants"]["F64"] for r in _of(compiled, arch, "_gptq_block_kernel")} == {False, True}
        obs = {(r["constants"]["M"], r["constants"]["BLOCK_B"]) for r in _of(compiled, arch, "_obs_block_kernel")}
        assert {(0, 128), (4, 128), (8, 256)} <= obs


def test_every_autotuned_matmul_tile_compiles_for_hopper(compiled):
    """Each tile the autotuner may pick on an H100/H200, for fp16 and bf16 activations at every bit width
    (bf16 dots run natively there, not through float32 as in the interpreter), and float32 at 4 bits."""
    from rechannel.triton_kernels import quant

    tiles = {(r["constants"]["BITS"], r["constants"]["ACT"], r["constants"]["BLOCK_N"], r["constants"]["BLOCK_K"],
              r["num_warps"], r["num_stages"]) for r in _of(compiled, 90, "_matmul_kernel")}
    wanted = [(bits, act) for bits in quant.BITS for act in (quant._F16, quant._BF16)] + [(4, quant._F32)]
    for bits, act in wanted:
        for c in quant._MATMUL_CONFIGS:
            key = (bits, act, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            assert key in tiles, key


def test_refuses_to_run_in_the_interpreter():
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 1 and b"TRITON_INTERPRET" in done.stderr and done.stdout == b""

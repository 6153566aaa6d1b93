"""Quantized models end to end on a tiny Llama: packed files, loading them, the CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import check_prompts_route_align, make_docs, run_cli
from rechannel.ops.compress.calibration import input_groups, new_stats
from rechannel.ops.compress.gptq import gptq
from rechannel.ops.compress.grid import QuantSpec
from rechannel.ops.compress.masks import Pattern
from rechannel.ops.compress.protocols import PruneConfig, prune_sequential
from rechannel.ops.compress.rtn import rtn
from rechannel.ops.compress.sparsegpt import sparsegpt
from rechannel.ops.core.blocks import capture_first_inputs, decoder_blocks, linear_layers
from rechannel.ops.core.models import load_model
from rechannel.ops.core.qlinear import PACKED_FILE, QuantLinear
from rechannel.ops.core.windows import draw_windows


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits.double()


@pytest.fixture(scope="module")
def packed_and_dense(tiny_model, docs_file, tmp_path_factory):
    """GPTQ 3-bit, groups of 16, act-order: written packed and dense from the same run's settings."""
    out = tmp_path_factory.mktemp("q")
    common = ["compress", "--model", str(tiny_model), "--method", "gptq", "--bits", "3", "--group-size", "16",
              "--act-order", "--calib", str(docs_file), "--samples", "6", "--seqlen", "32"]
    reports = {}
    for fmt in ("packed", "dense"):
        r = run_cli(*common, "--format", fmt, "-o", str(out / fmt))
        assert r.returncode == 0, r.stderr
        reports[fmt] = json.loads(r.stdout)
    return out, reports


def test_packed_model_equals_its_dense_export(packed_and_dense, tiny_model):
    out, reports = packed_and_dense
    assert (out / "packed" / PACKED_FILE).is_file() and not (out / "packed" / "model.safetensors").exists()
    packed = load_model(str(out / "packed"), device="cpu")
    dense = load_model(str(out / "dense"), device="cpu")
    quantized = [m for m in packed.model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14 and all(m.g_idx is not None and m.bits == 3 for m in quantized)
    ids = torch.randint(0, 300, (2, 24))
    a, b = _logits(packed, ids), _logits(dense, ids)
    # the packed file keeps embeddings and norms in float16: the logits agree to float16 precision
    assert (a - b).abs().max() < 2e-3 * b.abs().max()
    # every packed weight equals the dense export's weight exactly: the export is written by the same
    # dequantize of the same codes and float16 scales (scale × integer code is exact in float32)
    for name, m in packed.model.named_modules():
        if isinstance(m, QuantLinear):
            torch.testing.assert_close(m.dequantize(), dense.model.get_submodule(name).weight, rtol=0, atol=0)
    assert reports["packed"]["totals"]["layers"] == 14
    assert reports["packed"]["quantization"] == {"bits": 3, "group_size": 16, "sym": False, "act_order": True,
                                                 "static_groups": False, "format": "packed"}


def test_plain_transformers_refuses_the_packed_directory(packed_and_dense):
    from transformers import AutoModelForCausalLM

    out, _ = packed_and_dense
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out / "packed", local_files_only=True)
    AutoModelForCausalLM.from_pretrained(out / "dense", local_files_only=True)  # the dense export loads


def test_packed_file_is_smaller(tiny_model, tmp_path):
    from safetensors import safe_open

    r = run_cli("compress", "--model", str(tiny_model), "--method", "rtn", "--bits", "4", "--group-size", "32",
                "-o", str(tmp_path / "rtn4"))
    assert r.returncode == 0, r.stderr
    totals = json.loads(r.stdout)["totals"]
    packed = load_model(str(tmp_path / "rtn4"), device="cpu")
    layers = [m for m in packed.model.modules() if isinstance(m, QuantLinear)]
    linear = sum(m.in_features * m.out_features for m in layers)
    grids = sum(m.out_features * -(-m.in_features // 32) for m in layers)  # a shorter last group counts too
    with safe_open(str(tmp_path / "rtn4" / PACKED_FILE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".qweight") or k.endswith(".qzeros")} == {torch.uint8}
    assert {t.dtype for k, t in tensors.items() if not k.endswith((".qweight", ".qzeros"))} == {torch.float16}
    other = sum(t.numel() for k, t in tensors.items() if not k.endswith((".qweight", ".scales", ".qzeros")))
    # 4-bit codes: half a byte per weight, plus a float16 scale and a uint8 zero per 32 weights; the rest fp16
    want = linear // 2 + grids * 3 + 2 * other
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == want
    assert want < totals["bytes"] < want + 20_000  # plus the safetensors header
    assert totals["quantized_parameters"] == linear


def test_quantlinear_forward_equals_linear_on_its_weight():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(24, 40, generator=g), torch.randn(24, generator=g), torch.randn(3, 5, 40, generator=g)
    qw = rtn(w, QuantSpec(bits=3, group_size=16))  # 40 = 16 + 16 + a shorter last group of 8
    layer = QuantLinear.from_quantized(qw, b)
    assert layer.scales.shape == (24, 3)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, qw.dequantize(), b))
    assert torch.equal(layer.quantized().codes, qw.codes)


LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def reference_sequential_gptq(model, windows, spec, groups):
    """A plain loop: block by block and, within a block, group by group (all layers at once, or GPTQ's
    true-sequential groups), H from full forwards of the model as compressed so far."""
    for block in decoder_blocks(model):
        layers = linear_layers(block)
        for group in groups or [list(layers)]:
            stats = {n: new_stats(layers[n], hessian=True) for n in group}
            hooks = [layers[n].register_forward_pre_hook(lambda mod, a, s=stats[n]: s.add(a[0])) for n in group]
            with torch.no_grad():
                model(windows)
            for h in hooks:
                h.remove()
            for n in group:
                layers[n].weight.data = gptq(layers[n].weight.data, stats[n].hessian, spec)[2]


@pytest.mark.parametrize("true_sequential", [False, True])
def test_sequential_gptq_quantizes_each_block_on_quantized_inputs(tiny_model, true_sequential):
    """The driver against a plain loop: block by block (and with true-sequential, group by group), H from the
    already-quantized model's activations."""
    ours = load_model(str(tiny_model), device="cpu")
    ref = load_model(str(tiny_model), device="cpu")
    windows = draw_windows(make_docs(), ours.tokenizer, 4, 32, 0)
    spec = QuantSpec(4, 16)
    cfg = PruneConfig("gptq", 0.0, Pattern(), spec, batch_size=4, true_sequential=true_sequential)
    report = prune_sequential(ours.model, windows, cfg)
    reference_sequential_gptq(ref.model, windows, spec, LLAMA_GROUPS if true_sequential else None)
    # the same float32 ops on the same 4-window batch on both sides (H, the GPTQ loop): identical but for
    # ulps of weights |w| < 1 (u·|w| < 6e-8); a code off by one would be a whole grid step ≫ 1e-6
    for (name, a), (_, b) in zip(ours.model.named_parameters(), ref.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert len(report.quantized) == 14 and all(0 < r.rel_error < 1 for r in report.layers)
    assert [r.name.split(".", 2)[2] for r in report.layers[:7]] == list(linear_layers(decoder_blocks(ours.model)[0]))


def test_true_sequential_groups_layers_by_shared_input_in_call_order(tiny_model):
    lm = load_model(str(tiny_model), device="cpu")
    windows = draw_windows(make_docs(), lm.tokenizer, 2, 16, 0)
    block = decoder_blocks(lm.model)[0]
    inputs = capture_first_inputs(lm.model, windows, 2)
    assert input_groups(block, inputs, linear_layers(block)) == LLAMA_GROUPS
    picked = {n: m for n, m in linear_layers(block).items() if n.endswith(("v_proj", "down_proj", "up_proj"))}
    assert input_groups(block, inputs, picked) == [["self_attn.v_proj"], ["mlp.up_proj"], ["mlp.down_proj"]]


def test_true_sequential_changes_what_later_groups_are_calibrated_on(tiny_model):
    """o_proj's H comes from attention through the quantized q, k, v: the result differs from the plain
    protocol's in o_proj but not in q, k, v (whose inputs are the same in both)."""
    plain = load_model(str(tiny_model), device="cpu")
    true = load_model(str(tiny_model), device="cpu")
    windows = draw_windows(make_docs(), plain.tokenizer, 4, 32, 0)
    for lm, flag in ((plain, False), (true, True)):
        prune_sequential(lm.model, windows, PruneConfig("gptq", 0.0, Pattern(), QuantSpec(4, 16), batch_size=4,
                                                        true_sequential=flag))
    a, b = (linear_layers(decoder_blocks(lm.model)[0]) for lm in (plain, true))
    assert torch.equal(a["self_attn.q_proj"].weight, b["self_attn.q_proj"].weight)
    assert not torch.equal(a["self_attn.o_proj"].weight, b["self_attn.o_proj"].weight)


def test_joint_sparsegpt_quantization_keeps_pruned_weights_at_zero():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 32, generator=g) @ torch.randn(32, 32, generator=g)
    w, h = torch.randn(16, 32, generator=g), 2 * x.t() @ x / 300
    new_w, mask, _, qw = sparsegpt(w, h, 0.5, Pattern(2, 4), 16, quant=QuantSpec(4, 16))
    assert torch.all(new_w[mask] == 0) and torch.all(mask.view(16, -1, 4).sum(2) == 2)
    # the codes, on float16 scales: within 2^-11 relative of the loop's float32 grid (scale × code is exact)
    torch.testing.assert_close(qw.dequantize(), new_w, rtol=2**-10, atol=0)
    assert torch.all(qw.dequantize()[mask] == 0)
    pruned_only, mask_only, _, none = sparsegpt(w, h, 0.5, Pattern(2, 4), 16)
    assert none is None and not torch.equal(pruned_only, new_w)


@pytest.mark.parametrize("args, message", [
    (["--method", "rtn", "--bits", "5"], "--bits 5: supported bit widths are 2, 3, 4, 8"),
    (["--method", "rtn", "--bits", "4", "--group-size", "0"], "--group-size 0"),
    (["--method", "gptq", "--bits", "4"], "--method gptq needs calibration data"),
    (["--method", "rtn", "--bits", "4", "--act-order"], "--act-order orders GPTQ's columns"),
    (["--method", "gptq"], "--method gptq quantizes: give --bits"),
    (["--method", "wanda", "--format", "packed", "--calib", "x.jsonl"], "--format packed needs --bits"),
    (["--method", "rtn", "--bits", "4", "--format", "gguf"], "unknown format 'gguf'"),
    (["--method", "gptq", "--bits", "4", "--sparsity", "0.5"], "does not prune"),
    (["--method", "rtn", "--bits", "4", "--static-groups"], "--static-groups only matters with --act-order"),
])
def test_bad_quantization_options(tiny_model, tmp_path, args, message):
    out = tmp_path / "out"
    r = run_cli("compress", "--model", str(tiny_model), *args, "-o", str(out))
    assert r.returncode == 1
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_joint_and_one_shot_from_the_command_line(tiny_model, docs_file, tmp_path):
    stats = tmp_path / "stats.safetensors"
    r = run_cli("calibrate", "--model", str(tiny_model), "--data", str(docs_file), "--samples", "6", "--seqlen", "32",
                "--hessian", "-o", str(stats))
    assert r.returncode == 0, r.stderr
    r = run_cli("compress", "--model", str(tiny_model), "--method", "sparsegpt", "--pattern", "2:4", "--bits", "4",
                "--group-size", "16", "--stats", str(stats), "--sequential", "-o", str(tmp_path / "joint"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["method"] == "sparsegpt" and doc["pattern"] == "2:4" and doc["quantization"]["bits"] == 4
    joint = load_model(str(tmp_path / "joint"), device="cpu")
    for m in joint.model.modules():
        if isinstance(m, QuantLinear):
            w = m.dequantize()
            assert torch.all((w == 0).view(w.shape[0], -1, 4).sum(2) >= 2)  # 2:4 survives quantization
    r = run_cli("compress", "--model", str(tiny_model), "--method", "gptq", "--bits", "8", "--group-size", "-1",
                "--stats", str(stats), "--format", "dense", "-o", str(tmp_path / "one-shot"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["protocol"] == "one-shot" and all(0 < layer["rel_error"] < 0.05 for layer in doc["layers"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "one-shot", local_files_only=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("tokens", [24, 200])  # 2 x 200 rows: the prefill path (de-quantize, then GEMM)
def test_packed_model_on_the_gpu_equals_the_cpu_path(packed_and_dense, dtype, tokens):
    out, _ = packed_and_dense
    cpu = load_model(str(out / "packed"), device="cpu", dtype="float32")
    gpu = load_model(str(out / "packed"), device="cuda", dtype=dtype)
    ids = torch.randint(0, 300, (2, tokens))
    a = _logits(cpu, ids)
    b = _logits(gpu, ids.cuda()).cpu()
    assert (a - b).abs().max() < 3e-2 * a.abs().max()


def test_inspect_counts_the_weights_a_packed_model_stands_for(packed_and_dense, tiny_model):
    out, _ = packed_and_dense
    dense = json.loads(run_cli("inspect", str(out / "dense"), "--json", "--no-tensors").stdout)
    packed = json.loads(run_cli("inspect", str(out / "packed"), "--json", "--no-tensors").stdout)
    assert packed["parameters"] == dense["parameters"]
    assert packed["bytes"] < dense["bytes"] / 3  # float32 dense export against 3-bit codes and float16 rest
    assert packed["config"]["quantization"]["bits"] == 3 and packed["config"]["dtype"] == "float16"


def test_prompts_routing_and_align_run_on_a_packed_model(packed_and_dense, tiny_model, docs_file, tmp_path):
    """train-prompts, route and align take the packed directory itself (its layers stay packed), and a
    soft prompt trained on it routes there; align compares it with its dense original as teacher."""
    out, _ = packed_and_dense
    check_prompts_route_align(run_cli, str(out / "packed"), str(tiny_model), docs_file, tmp_path)

"""compressed-tensors out and in: plain transformers loads what rechannel writes (same logits, the library's own
decompression gives rechannel's weights bit for bit), and rechannel runs what the library writes."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import CORPUS, check_prompts_route_align, make_tiny_llama, make_tokenizer, run_inproc
from rechannel import CompressConfig, compress
from rechannel.ops.core.models import load_model
from rechannel.ops.core.qlinear import PACKED_FILE, QuantLinear

# widths that groups of 128 divide, as compressed-tensors requires (q/k/v/o: 128 inputs, down_proj: 256)
SCHEMES = {
    "gptq4-asym": {"method": "gptq", "bits": 4, "group_size": 128},
    "gptq4-sym": {"method": "gptq", "bits": 4, "group_size": 128, "sym": True},
    "gptq4-actorder": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True, "static_groups": True},
    "rtn8": {"method": "rtn", "bits": 8, "group_size": -1},
}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("wide") / "model", hidden=128, intermediate=256)


@pytest.fixture(scope="module")
def written(wide_model, docs_file, tmp_path_factory):
    """Each scheme compressed twice from the same windows: the default format and --format packed."""
    root = tmp_path_factory.mktemp("ct")
    out = {}
    for name, kw in SCHEMES.items():
        calib = {"calib": str(docs_file), "samples": 8, "seqlen": 32} if kw["method"] == "gptq" else {}
        reports = {fmt: compress(CompressConfig(str(root / f"{name}-{fmt}"), model=str(wide_model), device="cpu",
                                                format=None if fmt == "ct" else fmt, **kw, **calib))
                   for fmt in ("ct", "packed")}
        out[name] = (root / f"{name}-ct", root / f"{name}-packed", reports["ct"])
    return out


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def _quant_linears(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("name", SCHEMES)
def test_default_format_is_compressed_tensors_and_transformers_gives_rechannels_logits(written, name):
    ct, _, report = written[name]
    config = json.loads((ct / "config.json").read_text())
    q = config["quantization_config"]
    assert report["quantization"]["format"] == "compressed-tensors" and not (ct / PACKED_FILE).exists()
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized" and q["ignore"] == ["lm_head"]
    args = q["config_groups"]["group_0"]["weights"]
    kw = SCHEMES[name]
    assert (args["num_bits"], args["symmetric"], args.get("actorder")) == \
        (kw["bits"], kw.get("sym", False), "weight" if kw.get("act_order") else None)
    assert args["strategy"] == ("channel" if kw["group_size"] == -1 else "group")

    ours = load_model(str(ct), device="cpu", dtype="float32").model
    assert len(_quant_linears(ours)) == 14  # 7 Linears in each of 2 blocks run packed, no dense copy on disk
    theirs = _hf(ct)
    ids = torch.randint(3, 200, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert (a - b).abs().max().item() <= 1e-3  # the bound; the weights themselves are equal (next test)
    for n, layer in _quant_linears(ours).items():
        assert torch.equal(theirs.get_submodule(n).weight.float(), layer.dequantize(torch.float32)), n


@pytest.mark.parametrize("name", SCHEMES)
def test_the_librarys_decompression_is_rechannels_dequantization_bit_for_bit(written, name):
    """compressed-tensors' own decompress of each layer of the written file against rechannel's de-quantization
    of its codes as the packed file holds them (a different file, the same codes)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    ct, packed, _ = written[name]
    q = json.loads((ct / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(q["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(q["format"])
    tensors = load_file(str(ct / "model.safetensors"))
    reference = _quant_linears(load_model(str(packed), device="cpu", dtype="float32").model)
    assert len(reference) == 14
    for layer_name, layer in reference.items():
        state = {k.removeprefix(layer_name + "."): v for k, v in tensors.items() if k.startswith(layer_name + ".")}
        weight = compressor.decompress(state, scheme)["weight"]
        assert weight.dtype == torch.float32 and torch.equal(weight, layer.dequantize(torch.float32)), layer_name


def _ppl_file(tmp_path):
    path = tmp_path / "ppl.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(CORPUS * 6)}) + "\n" for _ in range(2)))
    return path


def _ppl(model_dir, data, loader):
    from rechannel import EvalConfig, evaluate

    doc = evaluate(EvalConfig(data=str(data), kind="ppl", seqlen=64, model=str(model_dir), device="cpu",
                              dtype="float32", loader=loader, batch_size=1))
    (result,) = doc["results"].values()
    return result["ppl,none"]


def test_perplexity_in_transformers_equals_the_packed_model_in_rechannel(written, tmp_path):
    data = _ppl_file(tmp_path)
    for name in ("gptq4-asym", "rtn8"):
        ct, packed, _ = written[name]
        ours, theirs = _ppl(packed, data, "rechannel"), _ppl(ct, data, "transformers")
        assert math.isfinite(ours) and abs(theirs - ours) <= 1e-3 * ours, (name, ours, theirs)


def test_the_4bit_directory_is_under_0_3_of_fp16_plus_the_float_tensors(written):
    from rechannel.ops.core.tensorfile import read_header

    ct, _, report = written["gptq4-asym"]
    header = read_header(ct / "model.safetensors")
    layers = {n.removesuffix(".weight_packed") for n in header.tensors if n.endswith(".weight_packed")}
    quantized = sum(t.end - t.start for n, t in header.tensors.items() if n.rsplit(".", 1)[0] in layers)
    rest = sum(t.end - t.start for n, t in header.tensors.items() if n.rsplit(".", 1)[0] not in layers)
    linear = report["totals"]["quantized_parameters"]
    assert linear == 2 * (4 * 128 * 128 + 3 * 128 * 256) - 2 * 2 * 128 * 64  # k and v project to 2 of 4 heads
    size = sum(f.stat().st_size for f in ct.glob("*.safetensors"))
    assert quantized <= 0.3 * 2 * linear and size <= 0.3 * 2 * linear + rest + 20_000  # + the header
    assert report["totals"]["quantized_bytes"] == quantized


def test_a_2_of_4_model_loads_back_with_exactly_the_pruned_weights(wide_model, docs_file, tmp_path):
    """SparseGPT 2:4 with 4-bit codes: the pruned weights are codes of exact zeros, the pattern is metadata."""
    for fmt in ("compressed-tensors", "dense"):
        compress(CompressConfig(str(tmp_path / fmt), method="sparsegpt", pattern="2:4", bits=4, group_size=128,
                                calib=str(docs_file), samples=8, seqlen=32, model=str(wide_model), device="cpu",
                                format=fmt))
    q = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert q["sparsity_config"] == {"format": "dense", "global_sparsity": 0.5, "sparsity_structure": "2:4",
                                    "targets": ["Linear"], "ignore": ["lm_head"]}
    dense = load_model(str(tmp_path / "dense"), device="cpu", dtype="float32").model
    ours = load_model(str(tmp_path / "compressed-tensors"), device="cpu", dtype="float32").model
    theirs = _hf(tmp_path / "compressed-tensors")
    for name, layer in _quant_linears(ours).items():
        want = dense.get_submodule(name).weight
        assert ((want.view(-1, 4) == 0).sum(1) >= 2).all(), name  # every 4 consecutive inputs: 2 zeros
        assert torch.equal(layer.dequantize(torch.float32), want), name
        assert torch.equal(theirs.get_submodule(name).weight, want), name
    assert len(_quant_linears(ours)) == 14


def test_a_pruned_model_without_bits_is_written_dense(wide_model, tmp_path):
    with pytest.raises(Exception, match="stores no sparse layout, so a pruned model is written dense"):
        compress(CompressConfig(str(tmp_path / "o"), method="magnitude", pattern="2:4", model=str(wide_model),
                                device="cpu", format="compressed-tensors"))
    assert not (tmp_path / "o").exists()


def _library_directory(path, scale_dtype=torch.bfloat16):
    """A 4-bit g32 symmetric model written by compressed-tensors itself, as llm-compressor writes one: the
    scheme applied, known min-max scales set, the model compressed and saved, the config updated."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    source = make_tiny_llama(path.parent / "source", seed=3, hidden=64, intermediate=128)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=scale_dtype)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            w = m.weight.data.float().view(m.out_features, -1, 32)
            m.weight_scale.data.copy_((w.abs().amax(-1) / 7).clamp_min(1e-4).to(m.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    make_tokenizer().save_pretrained(path)
    return path


def test_a_directory_written_by_the_library_evaluates_as_in_transformers(tmp_path):
    lib = _library_directory(tmp_path / "lib")
    q = json.loads((lib / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized" and q["quant_method"] == "compressed-tensors"
    ours = load_model(str(lib), device="cpu", dtype="float32").model
    layers = _quant_linears(ours)
    assert len(layers) == 14 and {m.scales.dtype for m in layers.values()} == {torch.bfloat16}  # kept as stored
    data = _ppl_file(tmp_path)
    a, b = _ppl(lib, data, "rechannel"), _ppl(lib, data, "transformers")
    # the same weights through the same Llama code: only the float32 matmul of the de-quantized weight differs
    # in who holds it, so the two are equal up to a few float32 roundings of the mean NLL
    assert math.isfinite(a) and abs(a - b) <= 1e-5 * a, (a, b)


def _rewrite_scheme(src, dst, change):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}
INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


@pytest.mark.parametrize("change, needle", [
    (lambda q: q["config_groups"]["group_0"].update(weights=FP8, input_activations=FP8), "scheme FP8 "),
    (lambda q: q["config_groups"]["group_0"].update(input_activations=INT8_TOKEN), "scheme W4A8 "),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8) or
     q["config_groups"]["group_0"].update(input_activations=INT8_TOKEN), "scheme W8A8 "),
    (lambda q: q.update(kv_cache_scheme=FP8), "quantized KV cache"),
])
def test_schemes_rechannel_cannot_run_are_one_line_and_nothing_is_written(written, tmp_path, change, needle):
    bad = _rewrite_scheme(written["gptq4-asym"][0], tmp_path / "bad", change)
    out = tmp_path / "out.json"
    r = run_inproc("eval", "--model", str(bad), "--data", str(_ppl_file(tmp_path)), "--kind", "ppl", "--seqlen", "32",
                   "--device", "cpu", "-o", str(out))
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert r.stdout == b"" and not out.exists()


def test_formats_the_scheme_cannot_use_are_refused_before_any_work(wide_model, tiny_model, tmp_path):
    cases = [(wide_model, {"bits": 3}, "3-bit codes pack into int32 words differently"),
             (wide_model, {"bits": 4, "method": "gptq", "act_order": True, "calib": "x.jsonl"}, "--static-groups"),
             (tiny_model, {"bits": 4, "group_size": 32}, "has 136 inputs, --group-size 32")]
    for model, kw, needle in cases:
        kw = {"method": "rtn", **kw}
        with pytest.raises(Exception, match="use --format packed") as e:
            compress(CompressConfig(str(tmp_path / "out"), model=str(model), device="cpu",
                                    format="compressed-tensors", **kw))
        assert needle in str(e.value) and not (tmp_path / "out").exists()
    # without --format the same schemes fall back to packed, which holds them
    r = compress(CompressConfig(str(tmp_path / "g32"), method="rtn", bits=4, group_size=32, model=str(tiny_model),
                                device="cpu"))
    assert r["quantization"]["format"] == "packed" and (tmp_path / "g32" / PACKED_FILE).is_file()


def test_transformers_loader_refuses_the_packed_format(written):
    from rechannel.ops.core.errors import UserError

    with pytest.raises(UserError, match="loads only in rechannel"):
        load_model(str(written["rtn8"][1]), device="cpu", loader="transformers")


def test_every_command_runs_on_a_compressed_tensors_directory(written, wide_model, docs_file, tmp_path):
    """train-prompts, route and align take the directory itself (its layers stay packed); inspect counts the
    weights it stands for, as for the dense original."""
    ct = str(written["gptq4-asym"][0])
    check_prompts_route_align(run_inproc, ct, str(wide_model), docs_file, tmp_path)
    counts = [json.loads(run_inproc("inspect", m, "--json", "--no-tensors").stdout)["parameters"]
              for m in (ct, str(wide_model))]
    assert counts[0] == counts[1]


def test_act_order_groups_of_older_compressed_tensors_still_run(written, wide_model, docs_file, tmp_path):
    """compressed-tensors < 0.20 wrote act-order groups as `weight_g_idx` (actorder "group"); 0.20 dropped them,
    so rechannel writes that scheme packed, but a directory from an older llm-compressor still runs here."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    packed = tmp_path / "packed"
    compress(CompressConfig(str(packed), method="gptq", bits=4, group_size=128, act_order=True, calib=str(docs_file),
                            samples=8, seqlen=32, model=str(wide_model), device="cpu"))
    assert (packed / PACKED_FILE).is_file()  # the default for a scheme compressed-tensors 0.20 cannot hold
    reference = _quant_linears(load_model(str(packed), device="cpu", dtype="float32").model)
    old = shutil.copytree(written["gptq4-asym"][0], tmp_path / "old")
    tensors = load_file(str(old / "model.safetensors"))
    for name, layer in reference.items():
        qw = layer.quantized()
        signed = lambda t: (t.to(torch.int16) - 8).to(torch.int8)  # noqa: E731  the format's codes are signed
        tensors.update({f"{name}.weight_packed": pack_to_int32(signed(qw.codes), 4),
                        f"{name}.weight_zero_point": pack_to_int32(signed(qw.zeros), 4, packed_dim=0),
                        f"{name}.weight_scale": qw.scales.float(), f"{name}.weight_g_idx": qw.g_idx})
    save_file(tensors, str(old / "model.safetensors"))
    config = json.loads((old / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (old / "config.json").write_text(json.dumps(config))
    ours = _quant_linears(load_model(str(old), device="cpu", dtype="float32").model)
    assert ours.keys() == reference.keys()
    for name, layer in ours.items():
        assert layer.g_idx is not None and torch.equal(layer.dequantize(), reference[name].dequantize()), name

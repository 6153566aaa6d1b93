"""LoRA, the re-training baseline: the module against float64, training through the CLI, PEFT agreement,
adapters beside packed quantized layers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tolerances import logit_error

from conftest import run_cli
from rechannel.ops.core.models import load_model
from rechannel.ops.core.qlinear import QuantLinear
from rechannel.ops.recover.lora import LoraLinear, add_lora, lora_parameters, merge_adapter

TRAIN = ("--method", "lora", "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj,down_proj",
         "--objective", "lm", "--batch", "2", "--seqlen", "16", "--lr", "0.01")


def test_lora_linear_equals_float64_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    m = LoraLinear(base, 3, 2.5)
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(m(x), base(x))  # B starts at zero: a fresh adapter changes nothing
    with torch.no_grad():
        m.lora_B.weight.normal_()
    xd = x.double()
    want = xd @ base.weight.double().t() + base.bias.double() + 2.5 * (xd @ m.lora_A.weight.double().t()) @ m.lora_B.weight.double().t()
    # float32, elementwise: base k = 12 and its bias, the adapter k = 12 then r = 3, the scale and the sum:
    # u·(13·(|x||W| + |b|) + 2.5·16·|x||A||B| + |y|)
    xa, wa, ba = xd.abs(), m.lora_A.weight.double().abs(), m.lora_B.weight.double().abs()
    bound = 2**-24 * (13 * (xa @ base.weight.double().abs().t() + base.bias.double().abs())
                      + 2.5 * 16 * (xa @ wa.t()) @ ba.t() + want.abs())
    assert ((m(x).double() - want).abs() <= bound).all()


def test_targets_pick_block_projections_only(tiny_model):
    lm = load_model(str(tiny_model), device="cpu")
    wrapped = add_lora(lm.model, ["q_proj", "lm_head"], 2, 4.0)
    assert sorted(wrapped) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert len(lora_parameters(wrapped)) == 4


def _train(tiny_model, docs_file, out, *extra):
    return run_cli("train-prompts", "--model", str(tiny_model), "--data", str(docs_file), *TRAIN, "-o", str(out), *extra)


@pytest.fixture(scope="module")
def adapter(tiny_model, docs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    r = _train(tiny_model, docs_file, out, "--steps", "4", "--save-every", "2")
    assert r.returncode == 0, r.stderr.decode()
    return out, json.loads(r.stdout)


def test_trained_adapter_loads_in_peft_with_the_logits_of_rechannel_merge(tiny_model, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, summary = adapter
    assert summary["modules"] == 6 and summary["parameters"] == sum(t.numel() for t in load_file(out / "adapter_model.safetensors").values())
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)(input_ids=ids).logits
        lm = load_model(str(tiny_model), device="cpu")
        plain = lm.model(input_ids=ids).logits
        info = merge_adapter(lm.model, str(out))
        ours = lm.model(input_ids=ids).logits
    assert info.modules == 6 and (theirs - plain).abs().max() > 1e-4  # training moved B away from zero
    # two float32 forwards (merged, and PEFT's W x + s B(A x)), each logit within logit_error of exact
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2 * logit_error(lm.model, ids.shape[1]))


def test_lora_resume_is_exact(tiny_model, docs_file, adapter, tmp_path):
    full, _ = adapter
    out = tmp_path / "adapter"
    assert _train(tiny_model, docs_file, out, "--steps", "2", "--save-every", "2").returncode == 0
    r = _train(tiny_model, docs_file, out, "--steps", "4", "--save-every", "2", "--resume")
    assert r.returncode == 0, r.stderr.decode()
    a, b = load_file(full / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_beside_packed_layers(tiny_model, docs_file, tmp_path):
    packed = tmp_path / "rtn4"
    r = run_cli("compress", "--model", str(tiny_model), "--method", "rtn", "--bits", "4", "--group-size", "16",
                "-o", str(packed))
    assert r.returncode == 0, r.stderr.decode()
    out = tmp_path / "adapter"
    r = _train(packed, docs_file, out, "--steps", "2")
    assert r.returncode == 0, r.stderr.decode()
    lm = load_model(str(packed), device="cpu")
    ids = torch.tensor([[5, 17, 42, 9]])
    layer = lm.model.model.layers[0].self_attn.q_proj
    merge_adapter(lm.model, str(out))
    wrapped = lm.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and isinstance(wrapped, LoraLinear) and wrapped.base is layer
    tensors = load_file(out / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].double()
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double()
    x = lm.model.get_input_embeddings()(ids)
    want = layer(x).double() + 2.0 * (x.double() @ a.t()) @ b.t()  # alpha / r = 8 / 4
    # base: the very same float32 call on both sides; the adapter's k = 64 then r = 4 in float32, the exact
    # scale 2 and the sum: u·(2·69·|x||A||B| + |y|) elementwise
    bound = 2**-24 * (2 * 69 * (x.double().abs() @ a.abs().t()) @ b.abs().t() + want.abs())
    assert ((wrapped(x).double() - want).abs() <= bound).all()
    data = tmp_path / "mc.jsonl"
    data.write_text('{"id": 1, "context": "Is two plus two four?", "choices": [" yes", " no"], "gold": 0}\n')
    r = run_cli("eval", "--model", str(packed), "--adapter", str(out), "--data", str(data), "-o", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr.decode()
    config = json.loads((tmp_path / "r.json").read_text())["config"]
    assert config["adapter"]["modules"] == 6 and config["extra_parameters"] == config["adapter"]["parameters"] > 0

"""The LoRA merge against PEFT itself: same logits as PEFT's unmerged forward, same parameter count."""

from __future__ import annotations

import json

import pytest
import torch
from tolerances import logit_error

from rechannel.ops.core.errors import UserError
from rechannel.ops.core.models import load_model
from rechannel.ops.recover.lora import merge_adapter


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_adapter_gives_peft_logits(tiny_model, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                     init_lora_weights=False)  # random A and B, so the adapter changes the output
    peft_model = get_peft_model(base, cfg).eval()
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    lm = load_model(str(tiny_model), device="cpu")
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    info = merge_adapter(lm.model, str(tmp_path / "adapter"))
    with torch.no_grad():
        got = lm.model(input_ids=ids).logits
    assert (before - want).abs().max() > 1e-3  # the adapter matters
    # two float32 forwards (merged W + sBA, and PEFT's W x + s B(A x)), each logit within logit_error of
    # exact (tests/tolerances.py; the merge's rounding adds u, the rank-4 path 4u, to a path of ~1600u)
    torch.testing.assert_close(got, want, atol=2 * logit_error(lm.model, ids.shape[1]), rtol=0)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert info.parameters == lora_params and info.modules == 2 * 3 and info.rank == 4


def test_unsupported_or_mismatched_adapters_are_refused(tiny_model, tmp_path):
    lm = load_model(str(tiny_model), device="cpu")
    d = tmp_path / "dora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        merge_adapter(lm.model, str(d))
    from safetensors.torch import save_file

    d = tmp_path / "other"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.zeros(2, 99), f"{key}.lora_B.weight": torch.zeros(64, 2)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="A \\(2, 99\\)"):
        merge_adapter(lm.model, str(d))
    with pytest.raises(UserError, match="no adapter_config.json"):
        merge_adapter(lm.model, str(tmp_path))

"""Convert a GGUF checkpoint into a safetensors directory in Hugging Face layout, once.

transformers de-quantizes GGUF tensors on load (about 20 s for 135M parameters) and refuses to
`save_pretrained` a GGUF-loaded model, so the state dict is written with safetensors directly and the
config without its GGUF quantization entry. The weights are kept in float32: the source's Q4_1 values
(fp16 scale times a 4-bit integer plus an fp16 minimum) are exact in float32 and not in 16-bit types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .version import __version__


def _state_dict_for_saving(model: Any) -> dict[str, Any]:
    """Contiguous tensors, without the lm_head copy when the embeddings are tied (safetensors refuses aliases)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def convert_gguf(gguf: Path, target: Path, stamp: dict[str, Any], marker: str) -> Path:
    """Write `target` (atomically: a failed or interrupted conversion leaves nothing behind)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        save_file(_state_dict_for_saving(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / marker).write_text(json.dumps({**stamp, "rechannel": __version__}, indent=1))
    return target

"""Packed quantized models: the Linear module that runs from packed weights, and the file that holds them.

A packed model directory is a Hugging Face layout directory whose weights are in `PACKED_FILE` instead
of model.safetensors, so plain transformers refuses it ("no model.safetensors") rather than silently
loading random weights; config.json carries a `quantization` entry naming the packed layers. For every
quantized Linear `name` the file holds `name.qweight` (R, ceil(C*bits/8)) uint8, `name.scales` (R, G)
float16, `name.qzeros` (R, G) uint8, and with act-order without static groups `name.g_idx` (C,) int32;
every other tensor is stored in float16 (bfloat16 when the model is), as GPTQ checkpoints are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dispatch import kernels, use_triton
from .errors import UserError
from .packed import QuantizedWeight, pack_rows, packed_width, unpack_rows

PACKED_FILE = "model-packed.safetensors"
FUSED_MAX_TOKENS = 256  # above this many rows of activations the fused kernel gives way to dequantize + GEMM


class QuantLinear(nn.Module):
    """y = x W^T + b with W kept packed. On a GPU the Triton kernel de-quantizes tiles on the fly inside
    the matmul; on the CPU W is de-quantized once, on first use, and kept (the CPU path is for running
    and checking small models, not for saving memory)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_width: int, has_g_idx: bool,
                 bias: bool, scale_dtype: torch.dtype = torch.float16) -> None:
        """Empty buffers on torch's default device: build under `with torch.device("meta"):` to allocate none."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_width = bits, group_width
        groups = -(-in_features // group_width)  # the last group may be shorter
        self.register_buffer("qweight", torch.empty(out_features, packed_width(in_features, bits), dtype=torch.uint8))
        # float16 as rechannel writes them; a compressed-tensors file's own dtype (often bfloat16) is kept as is
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=scale_dtype))
        self.register_buffer("qzeros", torch.empty(out_features, groups, dtype=torch.uint8))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32) if has_g_idx else None)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._dense: torch.Tensor | None = None  # the CPU path's de-quantized weight

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None) -> QuantLinear:
        rows, cols = qw.codes.shape
        with torch.device(qw.codes.device):
            layer = cls(cols, rows, qw.bits, qw.group_width, qw.g_idx is not None, bias is not None, qw.scales.dtype)
        layer.qweight.copy_(pack_rows(qw.codes, qw.bits))
        layer.scales.copy_(qw.scales)
        layer.qzeros.copy_(qw.zeros)
        if qw.g_idx is not None:
            layer.g_idx.copy_(qw.g_idx)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def quantized(self) -> QuantizedWeight:
        codes = unpack_rows(self.qweight, self.bits, self.in_features)
        return QuantizedWeight(codes, self.scales, self.qzeros, self.g_idx, self.bits, self.group_width)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W (R, C) as the file stands for it."""
        if use_triton(self.qweight):
            return kernels("quant").dequantize(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits,
                                               self.in_features, self.group_width, dtype)
        return self.quantized().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        long_prefill = x.numel() // self.in_features > FUSED_MAX_TOKENS
        needs_grad = x.requires_grad and torch.is_grad_enabled()  # prompts and adapters train through W
        if use_triton(x) and x.is_cuda and (long_prefill or needs_grad):
            # compute-bound, or differentiated: de-quantize this layer (transiently) and use the GEMM
            return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)
        if use_triton(x):
            quant = kernels("quant")
            w = quant.PackedMatrix(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits, self.in_features,
                                   self.group_width)
            return quant.matmul(x, w, self.bias)
        if x.is_cuda:  # RECHANNEL_KERNELS=torch on a GPU: de-quantize per call, never keep a dense copy there
            return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)
        if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
            self._dense = self.dequantize(x.dtype)
        return nn.functional.linear(x, self._dense, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_width={self.group_width}, g_idx={self.g_idx is not None}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def half_state(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of `model` but those named in `skip`, floats in 16 bits (bfloat16 when the model is),
    a tied lm_head saved once: what a quantized checkpoint stores beside its quantized layers. Parameters on
    the meta device give their layout only (dtype and shape), for writing the tensors later one by one."""
    half = torch.bfloat16 if next(model.parameters()).dtype == torch.bfloat16 else torch.float16
    state = {k: _host(v.detach().to(half) if v.is_floating_point() else v)
             for k, v in model.state_dict().items() if k not in skip}
    for name in _untied(model, state):
        state.pop(name)
    return state


def _host(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and in host memory; a meta tensor (a model streamed from disk) stays a layout."""
    return t if t.is_meta else t.contiguous().cpu()


def packed_state(model: nn.Module, quantized: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """The tensors of the packed file: packed layers from `quantized`, the rest in 16-bit floats."""
    state = half_state(model, {f"{n}.weight" for n in quantized})
    for name, packed in quantized.items():
        for key in ("qweight", "scales", "qzeros", "g_idx"):
            t = getattr(packed, key)
            if t is not None:
                state[f"{name}.{key}"] = t.cpu().contiguous()
    return state


def _untied(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Names that are copies of a tied weight (lm_head.weight with tied embeddings): saved once."""
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        return ["lm_head.weight"]
    return []


def save_packed(model: nn.Module, tokenizer: Any, quantized: dict[str, QuantLinear], out_dir: str | Path,
                entry: dict[str, Any], quantization: dict[str, Any]) -> Path:
    """Write the packed directory atomically: config.json (with `rechannel` and `quantization`), the packed
    tensors and the tokenizer."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    state = packed_state(model, quantized)
    model.config.rechannel = entry
    model.config.dtype = "bfloat16" if state_dtype(state) == torch.bfloat16 else "float16"  # what the file holds
    model.config.quantization = {**quantization, "format": "packed", "file": PACKED_FILE,
                                 "layers": sorted(quantized)}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(tmp)
        save_file(state, str(tmp / PACKED_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def state_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next((t.dtype for k, t in state.items() if t.is_floating_point() and not k.endswith(".scales")),
                torch.float16)


def packed_entry(path: Path) -> dict[str, Any] | None:
    """The `quantization` entry of a packed directory's config.json, or None for ordinary directories."""
    config = path / "config.json"
    if not config.is_file():
        return None
    q = json.loads(config.read_text()).get("quantization")
    return q if isinstance(q, dict) and q.get("format") == "packed" else None


def load_packed(path: Path, entry: dict[str, Any], dtype: torch.dtype, device: str,
                trust_remote_code: bool = False) -> nn.Module:
    """Build the architecture without allocating its weights, put QuantLinear modules where the file has
    packed layers, and fill everything from the packed file."""
    from safetensors.torch import load_file

    model = skeleton(path, dtype, trust_remote_code)
    filename = entry.get("file", PACKED_FILE)
    state = load_file(str(path / filename), device=str(device))
    for name in entry["layers"]:
        old = model.get_submodule(name)
        width = old.in_features if entry.get("group_size", -1) == -1 else entry["group_size"]
        install_quant_linear(model, name, entry["bits"], width, f"{name}.g_idx" in state, state[f"{name}.scales"].dtype)
    return fill(model, state, dtype, device, f"{path}: {filename}")


def skeleton(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The architecture of a model directory, every weight on the meta device (nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):  # rechannel reads the quantized layers itself
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def install_quant_linear(model: nn.Module, name: str, bits: int, group_width: int, has_g_idx: bool,
                         scale_dtype: torch.dtype) -> None:
    """Replace the Linear `name` of a skeleton by an empty QuantLinear of the same shape (on meta)."""
    old = model.get_submodule(name)
    with torch.device("meta"):
        layer = QuantLinear(old.in_features, old.out_features, bits, group_width, has_g_idx, old.bias is not None,
                            scale_dtype)
    _set_submodule(model, name, layer)


def fill(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str, source: str) -> nn.Module:
    """Assign `state` to a skeleton (floats cast to `dtype`, scales kept as stored) and move it to `device`;
    a tensor too many or too few is a UserError naming `source`."""
    state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise UserError(f"{source}: unexpected tensors {', '.join(result.unexpected_keys[:5])}")
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing[:5])}")
    return model.to(device)

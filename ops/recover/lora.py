"""LoRA adapters in PEFT's layout (adapter_config.json + adapter_model.safetensors): apply, train, save.

Applying merges the adapter into the weights it targets, W <- W + s * B A with s = lora_alpha / r (or
lora_alpha / sqrt(r) with use_rslora), which is what PEFT's `merge_and_unload` computes: evaluation then
runs at the base model's speed, and the adapter's parameter count is reported as its cost. A packed
quantized layer cannot absorb B A, so there the adapter stays beside it (`LoraLinear`), as in QLoRA.
Features the merge cannot represent (DoRA, fan_in_fan_out, per-module ranks, trained modules_to_save)
are refused rather than approximated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError

_PREFIX = "base_model.model."  # PEFT's key prefix in front of the base model's own module names


@dataclass(frozen=True)
class AdapterInfo:
    path: str
    rank: int
    alpha: float
    modules: int  # Linear layers changed
    parameters: int  # entries of all A and B matrices


def _config(path: Path) -> dict:
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"--adapter {path}: no adapter_config.json (expected a PEFT LoRA directory)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"--adapter {path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise UserError(f"--adapter {path}: {flag}=true is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"--adapter {path}: per-module rank_pattern/alpha_pattern is not supported")
    if cfg.get("modules_to_save"):
        raise UserError(f"--adapter {path}: modules_to_save is not supported")
    return cfg


def _pairs(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A (r, in), B (out, r)) from PEFT's keys `...<module>.lora_A[.default].weight`."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key.removeprefix(_PREFIX).replace(".default", "")
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                pairs.setdefault(name[: -len(f".{part}.weight")], {})[part] = t
                break
        else:
            raise UserError(f"--adapter {path}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
    incomplete = [n for n, p in pairs.items() if len(p) != 2]
    if incomplete:
        raise UserError(f"--adapter {path}: {incomplete[0]} has only {next(iter(pairs[incomplete[0]]))}")
    return {n: (p["lora_A"], p["lora_B"]) for n, p in pairs.items()}


class LoraLinear(nn.Module):
    """base(x) + s * B(A(x)) beside a frozen layer (nn.Linear or QuantLinear). A starts as PEFT's
    (Kaiming-uniform), B at zero, so a fresh adapter changes nothing."""

    def __init__(self, base: nn.Module, rank: int, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        device = (base.weight if isinstance(base, nn.Linear) else base.qweight).device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device)  # A (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device)  # B (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))  # (..., out) float32
        return self.base(x) + (delta * self.scale).to(x.dtype)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> dict[str, LoraLinear]:
    """Wrap every decoder-block layer whose last name part is in `targets` (e.g. q_proj, v_proj)."""
    from ..core.qlinear import QuantLinear

    chosen = {n: m for n, m in model.named_modules()
              if n.rpartition(".")[2] in targets and isinstance(m, nn.Linear | QuantLinear)
              and ".layers." in f".{n}"}
    if not chosen:
        raise UserError(f"--targets {','.join(targets)} names no Linear layer of the model's blocks")
    wrapped = {n: LoraLinear(m, rank, alpha / rank) for n, m in chosen.items()}
    for n, w in wrapped.items():
        _set(model, n, w)
    return wrapped


def lora_parameters(wrapped: dict[str, LoraLinear]) -> dict[str, nn.Parameter]:
    """The adapters' A and B weights under PEFT's names."""
    return {f"{_PREFIX}{name}.{part}.weight": getattr(m, part).weight
            for name, m in wrapped.items() for part in ("lora_A", "lora_B")}


def peft_lora_config(rank: int, alpha: float, targets: list[str], base: str) -> dict:
    """adapter_config.json of a plain LoRA adapter, as PEFT writes and reads it."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
            "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": sorted(targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
            "revision": None}


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter_dir: str) -> AdapterInfo:
    """Merge a PEFT LoRA adapter into `model` in place (float32 arithmetic, stored in the weight's dtype)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir).expanduser()
    cfg = _config(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"--adapter {path}: no adapter_model.safetensors (rechannel never loads pickle)")
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    modules = dict(model.named_modules())
    from ..core.tensorfile import read_header

    read_header(weights)  # a truncated or damaged file is named before safetensors fails on it
    tensors = load_file(str(weights))
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise UserError(f"--adapter {weights}: tensor {bad[0]!r} holds NaN or inf: the adapter is damaged or its "
                        "training diverged")
    pairs = _pairs(tensors, path)
    from ..core.qlinear import QuantLinear

    for name, (a, b) in pairs.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear | QuantLinear):
            raise UserError(f"--adapter {path}: the model has no Linear {name!r}; was it made for another model?")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
            raise UserError(f"--adapter {path}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)} but the layer is "
                            f"{layer.out_features}x{layer.in_features}")
        if isinstance(layer, QuantLinear):  # packed: keep the adapter beside the layer
            lora = LoraLinear(layer, a.shape[0], scale)
            lora.lora_A.weight.copy_(a)
            lora.lora_B.weight.copy_(b)
            _set(model, name, lora)
            continue
        w = layer.weight
        delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * scale  # (out, in)
        w.copy_((w.float() + delta).to(w.dtype))
    params = sum(a.numel() + b.numel() for a, b in pairs.values())
    return AdapterInfo(str(path), rank, alpha, len(pairs), params)

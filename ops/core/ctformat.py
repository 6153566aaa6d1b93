"""The compressed-tensors format, out and in: what llm-compressor writes and vLLM, SGLang and transformers load.

A quantized Linear is stored as `weight_packed` (R, ceil(C*bits/32)) int32, `weight_scale` (R, G),
`weight_shape` (2,) and, when asymmetric, `weight_zero_point` (ceil(R*bits/32), G) int32; the format's codes
are signed. rechannel's code q and zero z lie in [0, 2^bits) and its symmetric zero is 2^(bits-1), so with
o = 2^(bits-1) the format's code is q - o and its zero point z - o (0 when symmetric, and then not stored):
(q - o) - (z - o) = q - z, the same weight. Packing and unpacking are the library's own (pack_to_int32,
unpack_from_int32), and the config is its QuantizationConfig, so the layout is never re-implemented here.

Loading turns each packed layer back into rechannel's QuantLinear (codes repacked, never de-quantized into a
dense copy), so every command runs on a directory written by rechannel or by llm-compressor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .packed import QuantizedWeight
from .shardwriter import Fetch, write_shards

FORMAT = "compressed-tensors"
PORTABLE_BITS = (2, 4, 8)  # 32 is a multiple: every compressed-tensors version packs these alike
RUNNABLE_FORMATS = ("pack-quantized",)  # integer weights packed in int32: what QuantLinear runs
SHARD_BYTES = 2 * 1024**3  # shard the weights above 2 GB, as save_pretrained does


def cannot_hold(bits: int, act_order: bool, static_groups: bool) -> str | None:
    """Why the format cannot hold a rechannel quantization scheme, or None when it can."""
    if bits not in PORTABLE_BITS:
        return (f"{bits}-bit codes pack into int32 words differently across compressed-tensors versions (and no "
                "serving engine runs them)")
    if act_order and not static_groups:
        return ("act-order without --static-groups needs a per-column group index, which compressed-tensors "
                "(>= 0.20) no longer stores; add --static-groups (the same act-order, groups kept in column order)")
    return None


# ------------------------------------------------------------------------------------------------- out


def _ct_codes(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, zero points) in the format's signed convention, int8: (R, C) and (R, G)."""
    offset = 1 << (qw.bits - 1)
    return ((qw.codes.to(torch.int16) - offset).to(torch.int8),  # (R, C)
            (qw.zeros.to(torch.int16) - offset).to(torch.int8))  # (R, G)


def layer_tensors(name: str, qw: QuantizedWeight, sym: bool) -> dict[str, torch.Tensor]:
    """The format's tensors of one quantized Linear, packed by the library."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if qw.g_idx is not None:
        raise UserError(f"{name}: {cannot_hold(qw.bits, True, False)}")
    cols = qw.codes.shape[1]
    if cols % qw.group_width:
        raise UserError(f"--format compressed-tensors needs groups that divide every input width: {name} has {cols} "
                        f"inputs, --group-size {qw.group_width}; choose a divisor or use --format packed")
    codes, zeros = _ct_codes(qw)
    out = {f"{name}.weight_packed": pack_to_int32(codes.cpu(), qw.bits),  # (R, ceil(C*bits/32)) int32
           # (R, G) float32 holding rechannel's float16 scales exactly: the library de-quantizes in the scale's
           # dtype, so a float32 load gives rechannel's float32 weights bit for bit (0.25 bits per weight at g128)
           f"{name}.weight_scale": qw.scales.float().cpu().contiguous(),
           f"{name}.weight_shape": torch.tensor(list(qw.codes.shape), dtype=torch.int64)}
    if not sym:
        out[f"{name}.weight_zero_point"] = pack_to_int32(zeros.cpu(), qw.bits, packed_dim=0).contiguous()
    return out


@dataclass(frozen=True)
class Scheme:
    """What one quantized model holds, in rechannel's words: the grid and the sparsity pruning left."""
    bits: int
    group_size: int  # -1: one group per output row
    sym: bool
    act_order: bool
    sparsity: float  # the fraction of each target layer's weights pruned (0: none)
    pattern: str  # unstructured, or N:M


def quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`, built by the library; `ignore` names the Linears left in float."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.sym,
                            strategy="channel" if scheme.group_size == -1 else "group",
                            group_size=None if scheme.group_size == -1 else scheme.group_size,
                            actorder="weight" if scheme.act_order else None, observer="minmax")
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                format="pack-quantized", quantization_status="compressed",
                                ignore=ignore).model_dump(exclude={"quant_method"})
    out = {"version": compressed_tensors.__version__, "quant_method": FORMAT,
           "sparsity_config": _sparsity_config(scheme, ignore), "transform_config": {}, **config}
    if not scheme.sym:
        # transformers' default load builds each layer through the library's meta-device compress, which leaves
        # the asymmetric zero point unpacked, so the packed one on disk (the format, as vLLM reads it) is refused
        # as a size mismatch; its de-quantize-at-load path unpacks it correctly, so ask transformers for that
        out["dequantize"] = True
    return out


def _sparsity_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    """The sparsity metadata of a pruned and quantized model (the pruned weights are codes of exact zeros: the
    format's 2:4 bitmask layout is gone from the library since 0.15); empty when nothing was pruned."""
    if not scheme.sparsity:
        return {}
    from compressed_tensors.config import SparsityCompressionConfig

    return SparsityCompressionConfig.load_from_registry(
        "dense", global_sparsity=scheme.sparsity, sparsity_structure=scheme.pattern, targets=["Linear"],
        ignore=ignore).model_dump(exclude={"registry_requires_subclass"})


def save_compressed(state: dict[str, torch.Tensor], config: dict[str, Any], tokenizer: Any,
                    out_dir: str | Path, fetch: Fetch | None = None) -> Path:
    """Write a compressed-tensors directory atomically: config.json (the model's config dict, with
    `quantization_config` in it), the weights sharded as save_pretrained shards them, and the tokenizer.
    `state` holds the tensors, or with `fetch` their layout only (meta tensors): each is then fetched when
    written, one at a time, so a model larger than memory can be written from disk."""
    from .atomic import atomic_path

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        split = write_shards(tmp, state, fetch or state.__getitem__, SHARD_BYTES)
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# -------------------------------------------------------------------------------------------------- in


def ct_entry(path: Path) -> dict[str, Any] | None:
    """The `quantization_config` of a compressed-tensors directory with quantized layers, else None (one with
    none loads as an ordinary directory)."""
    config = path / "config.json"
    if not config.is_file():
        return None
    q = json.loads(config.read_text()).get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != FORMAT:
        return None
    return q if q.get("config_groups") else None


def scheme_name(weights: dict[str, Any] | None, activations: dict[str, Any] | None) -> str:
    """The usual short name of a scheme: W4A16, W8A8, W4A8, FP8, NVFP4-like FP4 ..."""
    def part(args: dict[str, Any] | None, letter: str) -> str:
        if not args:
            return f"{letter}16"
        return f"{letter}{args.get('num_bits')}" if args.get("type", "int") == "int" else f"FP{args.get('num_bits')}"

    w, a = part(weights, "W"), part(activations, "A")
    return w if w.startswith("FP") and w == a else w + a


def check_runnable(path: Path, q: dict[str, Any]) -> list[dict[str, Any]]:
    """The config groups, each checked to be a scheme QuantLinear runs: integer weights of 2, 3, 4 or 8 bits,
    per group or per channel, packed in int32, with no activation quantization. Anything else (FP8, NVFP4,
    int8 activations such as W4A8 or W8A8, a KV-cache scheme) is one line naming the scheme."""
    groups = list(q["config_groups"].values())
    if q.get("kv_cache_scheme"):
        kv = scheme_name(None, q["kv_cache_scheme"]).removeprefix("W16")
        raise UserError(f"{path}: compressed-tensors scheme with a quantized KV cache ({kv}) is not one rechannel "
                        "runs: it runs weight-only integer quantization (W2/W3/W4/W8A16)")
    for g in groups:
        w, a, o = g.get("weights"), g.get("input_activations"), g.get("output_activations")
        name = scheme_name(w, a)
        problem = None
        if a or o:
            problem = "quantized activations"
        elif not w or w.get("type", "int") != "int":
            problem = "floating-point weights" if w else "no quantized weights"
        elif w.get("num_bits") not in (2, 3, 4, 8):
            problem = f"{w.get('num_bits')}-bit weights"
        elif w.get("strategy") not in ("group", "channel"):
            problem = f"the {w.get('strategy')} strategy"
        elif (g.get("format") or q.get("format")) not in RUNNABLE_FORMATS:
            problem = f"the {g.get('format') or q.get('format')} format"
        if problem:
            raise UserError(f"{path}: compressed-tensors scheme {name} ({problem}) is not one rechannel runs: it runs "
                            "integer weights of 2, 3, 4 or 8 bits per group or channel, pack-quantized, activations "
                            "in float (W4A16, W8A16)")
    return groups


def _targets_match(name: str, module: nn.Module, targets: list[str]) -> bool:
    import re

    for t in targets:
        if t.startswith("re:") and re.match(t[3:], name):
            return True
        if t == name or t == type(module).__name__:
            return True
    return False


def quantized_layers(model: nn.Module, q: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, dict]:
    """{Linear name: its weights' args} for every Linear a config group targets and `ignore` does not name."""
    ignore = q.get("ignore") or []
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _targets_match(name, module, ignore):
            continue
        for g in groups:
            if _targets_match(name, module, g.get("targets") or []):
                found[name] = g["weights"]
                break
    return found


def read_layer(name: str, state: dict[str, torch.Tensor], args: dict[str, Any]) -> QuantizedWeight:
    """One layer's QuantizedWeight from the format's tensors (popped from `state`), unpacked by the library."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits, sym = args["num_bits"], args.get("symmetric", True)
    try:
        packed, scale = state.pop(f"{name}.weight_packed"), state.pop(f"{name}.weight_scale")
        rows, cols = (int(v) for v in state.pop(f"{name}.weight_shape").tolist())
    except KeyError as e:
        raise UserError(f"{name}: the compressed-tensors weights lack {e.args[0]}") from None
    scale = scale.reshape(rows, -1)  # (R, G); per channel the file holds (R, 1)
    offset = 1 << (bits - 1)
    codes = (unpack_from_int32(packed, bits, torch.Size((rows, cols))).to(torch.int16) + offset)  # (R, C)
    if sym:
        zeros = torch.full(scale.shape, offset, dtype=torch.int16)
        state.pop(f"{name}.weight_zero_point", None)
    else:
        zp = state.pop(f"{name}.weight_zero_point")
        zeros = unpack_from_int32(zp, bits, torch.Size(scale.shape), packed_dim=0).to(torch.int16) + offset
    g_idx = state.pop(f"{name}.weight_g_idx", None)  # written by compressed-tensors < 0.20 for actorder "group"
    width = cols if args.get("strategy") == "channel" else int(args["group_size"])
    return QuantizedWeight(codes.to(torch.uint8), scale, zeros.to(torch.uint8),
                           None if g_idx is None else g_idx.to(torch.int32), bits, width)


def load_compressed(path: Path, q: dict[str, Any], dtype: torch.dtype, device: str,
                    trust_remote_code: bool = False) -> nn.Module:
    """A compressed-tensors directory as a model whose quantized Linears are QuantLinear modules: the
    library unpacks each layer's int32 words, rechannel repacks the codes in its own layout (no dense copy)."""
    from safetensors.torch import load_file

    from .fingerprint import weight_files
    from .packed import pack_rows
    from .qlinear import fill, install_quant_linear, skeleton

    groups = check_runnable(path, q)
    model = skeleton(path, dtype, trust_remote_code)
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        state.update(load_file(str(f)))
    for name, args in quantized_layers(model, q, groups).items():
        if f"{name}.weight_packed" not in state and f"{name}.weight" in state:
            continue  # a targeted layer the file keeps in float (llm-compressor's ignore list may be partial)
        qw = read_layer(name, state, args)
        install_quant_linear(model, name, qw.bits, qw.group_width, qw.g_idx is not None, qw.scales.dtype)
        state.update({f"{name}.qweight": pack_rows(qw.codes, qw.bits), f"{name}.scales": qw.scales,
                      f"{name}.qzeros": qw.zeros, **({f"{name}.g_idx": qw.g_idx} if qw.g_idx is not None else {})})
    return fill(model, state, dtype, device, str(path))

"""`rechannel inspect`: what is in a rechannel artefact, a safetensors file or a model directory.

It reads safetensors headers only (no tensor data, no torch), so it is instant even on a 7B model.
"""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..ops.core.errors import UserError
from .jsonl import STDIO, write_json
from .options import Json


def _tensor_rows(files: list[Path]) -> list[dict[str, Any]]:
    from ..ops.core.tensorfile import read_header

    rows = []
    for f in files:
        for t in read_header(f).tensors.values():
            rows.append({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "numel": t.numel,
                         "bytes": t.end - t.start, "file": f.name})
    return rows


def _describe_model(path: Path) -> dict[str, Any]:
    from ..ops.core.fingerprint import model_fingerprint, weight_files
    from ..ops.core.models import model_dir

    model_dir(str(path))
    config = jsonlib.loads((path / "config.json").read_text())
    tensors = _tensor_rows(weight_files(path))
    return {"path": str(path), "kind": "model", "fingerprint": model_fingerprint(path),
            "architecture": (config.get("architectures") or [config.get("model_type")])[0],
            "config": config, "rechannel": config.get("rechannel"),
            "parameters": _logical_parameters(tensors, config.get("quantization"), config.get("quantization_config")),
            "bytes": sum(t["bytes"] for t in tensors), "tensors": tensors}


def _logical_parameters(tensors: list[dict[str, Any]], quantization: dict[str, Any] | None,
                        compressed: dict[str, Any] | None = None) -> int:
    """The weights a model stands for: a packed layer counts its codes (bytes * 8 / bits), not the bytes
    holding them, nor its scales, zero points and group indices."""
    if isinstance(compressed, dict) and compressed.get("config_groups"):  # compressed-tensors: int32 words
        bits = next(iter(compressed["config_groups"].values())).get("weights", {}).get("num_bits", 32)
        quantization, codes, extras = {"bits": bits}, ".weight_packed", (".weight_scale", ".weight_zero_point",
                                                                          ".weight_shape", ".weight_g_idx")
    else:
        codes, extras = ".qweight", (".scales", ".qzeros", ".g_idx")
    if not isinstance(quantization, dict) or "bits" not in quantization:
        return sum(t["numel"] for t in tensors)
    bits = quantization["bits"]
    total = 0
    for t in tensors:
        if t["name"].endswith(codes):  # every stored bit is a code bit (rows padded to whole words at most)
            total += t["shape"][0] * (t["shape"][1] * t["bytes"] * 8 // max(1, t["numel"]) // bits)
        elif not t["name"].endswith(extras):
            total += t["numel"]
    return total


def _describe_file(path: Path) -> dict[str, Any]:
    from ..ops.core.tensorfile import parse_metadata, read_header

    metadata = parse_metadata(read_header(path).metadata)
    tensors = _tensor_rows([path])
    kind = metadata["rechannel"].get("kind") if isinstance(metadata.get("rechannel"), dict) else "safetensors"
    return {"path": str(path), "kind": kind, "metadata": metadata,
            "parameters": sum(t["numel"] for t in tensors), "bytes": sum(t["bytes"] for t in tensors),
            "tensors": tensors}


def describe(target: str) -> dict[str, Any]:
    """Everything `inspect` shows, as one JSON-able dict. An alias means its cached directory."""
    from ..ops.core import models as m

    path = Path(target).expanduser()
    if target in m.BUILTIN_MODELS and not path.exists():
        path = m.cached_dir(target)
        if not path.is_dir():
            raise UserError(f"{target} is not prepared yet: run `rechannel models prepare {target}`")
    if path.is_dir():
        return _describe_model(path)
    if path.is_file():
        return _describe_file(path)
    raise UserError(f"{target}: no such file or directory")


def _summary_table(d: dict[str, Any]) -> Table:
    table = Table(title=f"{d['path']} ({d['kind']})", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("parameters", f"{d['parameters']:,}")
    table.add_row("bytes", f"{d['bytes']:,}")
    if d["kind"] == "model":
        c = d["config"]
        table.add_row("fingerprint", d["fingerprint"])
        table.add_row("architecture", str(d["architecture"]))
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "dtype", "torch_dtype"):
            if key in c:
                table.add_row(key, str(c[key]))
        q = c.get("quantization")
        if isinstance(q, dict):
            table.add_row("quantization", f"{q.get('bits')}-bit, group {q.get('group_size')}, {q.get('format')}, "
                                          f"{len(q.get('layers', []))} packed layers")
        if d["rechannel"]:
            table.add_row("rechannel", jsonlib.dumps(d["rechannel"]))
    else:
        for key, value in d["metadata"].items():
            table.add_row(f"metadata.{key}", value if isinstance(value, str) else jsonlib.dumps(value, indent=1))
    return table


def _tensor_table(tensors: list[dict[str, Any]]) -> Table:
    table = Table(title="tensors")
    for col, justify in (("name", "left"), ("dtype", "left"), ("shape", "left"), ("numel", "right")):
        table.add_column(col, justify=justify)
    for t in tensors:
        table.add_row(t["name"], t["dtype"], "×".join(map(str, t["shape"])) or "scalar", f"{t['numel']:,}")
    return table


def inspect_command(
    target: Annotated[str, typer.Argument(help="A .safetensors file, a model directory, or a built-in alias.")],
    json: Json = False,
    tensors: Annotated[bool, typer.Option("--tensors/--no-tensors", help="List every tensor.")] = True,
) -> None:
    """Show the metadata and tensors of a rechannel artefact, a safetensors file or a model directory.

    [bold]Examples[/bold]

      rechannel inspect smollm2-135m --no-tensors
      rechannel inspect stats.safetensors
      rechannel inspect out/pruned --json | jq -r .fingerprint
    """
    d = describe(target)
    if not tensors:
        d.pop("tensors")
    if json:
        write_json(STDIO, d)
        return
    out = Console()
    out.print(_summary_table(d))
    if tensors:
        out.print(_tensor_table(d["tensors"]))

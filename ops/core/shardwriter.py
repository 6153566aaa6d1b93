"""Write safetensors files one tensor at a time, byte for byte as `safetensors.torch.save_file` writes them.

`save_file` needs every tensor of a file in memory at once (a 2 GB shard is 2 GB of RAM). Compressing a model
larger than memory writes its shards from tensors fetched one by one (from the compressed blocks spooled to
disk and from the source checkpoint), so it needs a writer that streams. It lays the file out exactly as
safetensors does, so the two compress paths give identical files:
- 8 bytes of little-endian header length, then compact JSON: `__metadata__` first, then the tensors in the
  order their data follows;
- that order: by dtype, in the descending order of safetensors' dtype enum (I64 before F32 before BF16 ...),
  then by name;
- the JSON padded with spaces to a multiple of 8 bytes.
tests/core/test_shardwriter.py compares the bytes with save_file's on tensors of every common dtype.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# safetensors' Dtype enum in its declared (ascending) order; files list the larger ones first
_ENUM = [("BOOL", torch.bool), ("U8", torch.uint8), ("I8", torch.int8), ("F8_E5M2", torch.float8_e5m2),
         ("F8_E4M3", torch.float8_e4m3fn), ("I16", torch.int16), ("U16", torch.uint16), ("F16", torch.float16),
         ("BF16", torch.bfloat16), ("I32", torch.int32), ("U32", torch.uint32), ("F32", torch.float32),
         ("F64", torch.float64), ("I64", torch.int64), ("U64", torch.uint64)]
_RANK = {dt: i for i, (_, dt) in enumerate(_ENUM)}
_NAME = {dt: name for name, dt in _ENUM}



def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ('F32', 'BF16', ...)."""
    return dict(_ENUM)[name]


Fetch = Callable[[str], torch.Tensor]  # name -> the tensor to write (any device; its dtype and shape as planned)


def file_order(layout: dict[str, torch.Tensor]) -> list[str]:
    """The names in the order their data is written: dtype (safetensors' enum, descending), then name."""
    return sorted(layout, key=lambda n: (-_RANK[layout[n].dtype], n))


def header(layout: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length and the padded JSON header of a file holding tensors shaped as `layout` (meta ok)."""
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in file_order(layout):
        t = layout[name]
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": _NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_file(path: str | Path, layout: dict[str, torch.Tensor], fetch: Fetch,
               metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file, holding one tensor in memory at a time; `layout` gives each tensor's
    dtype and shape (meta tensors are fine), `fetch` the tensor itself when its turn comes."""
    with open(path, "wb") as f:
        f.write(header(layout, metadata))
        for name in file_order(layout):
            t = fetch(name)
            want = layout[name]
            if t.dtype != want.dtype or tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"{name}: fetched {t.dtype} {list(t.shape)}, planned {want.dtype} {list(want.shape)}")
            f.write(_raw(t))


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian, as on every machine rechannel runs on)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """save_file's output, written without building the whole file in memory first."""
    write_file(path, tensors, tensors.__getitem__, metadata)


def write_shards(directory: Path, layout: dict[str, torch.Tensor], fetch: Fetch, max_shard_size: int | str) -> Any:
    """The weights as safetensors files split as save_pretrained splits them (huggingface_hub's rule over
    `layout`'s order: model.safetensors, or model-0000i-of-0000n.safetensors), each written tensor by
    tensor; returns the split (its index, when sharded)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(layout, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        write_file(Path(directory) / filename, {n: layout[n] for n in names}, fetch, metadata={"format": "pt"})
    return split

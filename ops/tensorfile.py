"""Read a safetensors file's header without torch: the metadata, and each tensor's dtype, shape and bytes.

The header is 8 bytes of little-endian length, then that many bytes of JSON. Reading it alone makes
`inspect` and the model fingerprint cheap even for a 7B model: no tensor data is loaded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from rechannel.ops.errors import UserError

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]  # in file order


def read_header(path: str | Path) -> Header:
    """Parse the header of `path`; a file that is not safetensors is a UserError naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER:
                raise UserError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = {}
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = t["data_offsets"]
        tensors[name] = TensorInfo(name, t["dtype"], tuple(t["shape"]), base + b, base + e)
    return Header(path, dict(metadata), tensors)


def parse_metadata(metadata: dict[str, str]) -> dict[str, object]:
    """Metadata values that hold JSON (as rechannel writes them) decoded; other strings kept as they are."""
    out: dict[str, object] = {}
    for k, v in metadata.items():
        try:
            out[k] = json.loads(v) if v[:1] in "{[" else v
        except json.JSONDecodeError:
            out[k] = v
    return out

"""Read a safetensors file's header without torch: the metadata, and each tensor's dtype, shape and bytes.

The header is 8 bytes of little-endian length, then that many bytes of JSON. Reading it alone makes
`inspect` and the model fingerprint cheap even for a 7B model: no tensor data is loaded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

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


DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str | Path) -> Header:
    """Parse and check the header of `path`; a file that is not safetensors, or whose header points past its
    end (a truncated copy), is a UserError naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER:
                raise UserError(f"{path}: not a safetensors file (header length {n})")
            raw = f.read(n)
            size = f.seek(0, 2)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a safetensors file") from None
    if len(raw) < n:
        raise UserError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: damaged safetensors header (__metadata__ must map strings to strings)")
    tensors = [_tensor_info(path, name, t, 8 + n, size) for name, t in header.items()]
    return Header(path, dict(metadata), {t.name: t for t in sorted(tensors, key=lambda t: t.start)})


def _tensor_info(path: Path, name: str, entry: object, base: int, size: int) -> TensorInfo:
    """One header entry, checked: its byte range lies inside the file and fits its dtype and shape."""
    try:
        dtype, shape, (b, e) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]  # type: ignore[index]
        ok = isinstance(b, int) and isinstance(e, int) and all(isinstance(s, int) and s >= 0 for s in shape)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{path}: damaged safetensors header (entry {name!r})")
    info = TensorInfo(name, dtype, shape, base + b, base + e)
    if not 0 <= b <= e:
        raise UserError(f"{path}: damaged safetensors header (tensor {name!r} has offsets {b}..{e})")
    if info.end > size:
        raise UserError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte {info.end}, "
                        f"the file has {size})")
    if dtype in DTYPE_BYTES and e - b != info.numel * DTYPE_BYTES[dtype]:
        raise UserError(f"{path}: damaged safetensors header (tensor {name!r}: {e - b} bytes for {dtype} "
                        f"{list(shape)})")
    return info


def parse_metadata(metadata: dict[str, str]) -> dict[str, object]:
    """Metadata values that hold JSON (as rechannel writes them) decoded; other strings kept as they are."""
    out: dict[str, object] = {}
    for k, v in metadata.items():
        try:
            out[k] = json.loads(v) if v[:1] in "{[" else v
        except json.JSONDecodeError:
            out[k] = v
    return out

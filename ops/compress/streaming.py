"""`calibrate --stream` and `compress --stream`: a model larger than memory, one decoder block at a time.

The model is a skeleton on the meta device (ops.core.streamed); a block is read from the safetensors shards,
compressed by the very function the in-memory path runs (protocols.sequential_block / one_shot_block), run
for the next block's inputs, spooled to OUTPUT.partial/ and dropped. When every block is done the output
directory is written shard by shard, one tensor at a time, from the spool and the source checkpoint, laid out
as the in-memory path lays it out: the two paths write byte-identical directories.

Resuming: OUTPUT.partial/ holds run.json (the options and the source's fingerprint), block-NNNNN.safetensors
(each finished block's output tensors and layer reports) and inputs.safetensors (the activations entering the
next block). A run killed between blocks and started again with the same options continues at the first
unfinished block; other options are refused until the spool is deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.blocks import BlockInputs, capture_first_inputs, decoder_blocks
from ..core.errors import UserError
from ..core.shardwriter import save_tensors
from ..core.streamed import Checkpoint, materialize, module_name, release
from .protocols import (
    LayerReport,
    PruneReport,
    module_paths,
    one_shot_block,
    sequential_block,
    write_stored_weights,
)


@dataclass
class StreamedModel:
    """What LoadedModel holds, for a model whose weights stay on disk: the skeleton and where to read it."""
    model: nn.Module  # parameters on the meta device but while a block is held
    tokenizer: Any
    path: Path
    fingerprint: str
    spec: str
    ckpt: Checkpoint
    device: str
    dtype: torch.dtype

    @contextmanager
    def holding(self, module: nn.Module) -> Iterator[nn.Module]:
        """The module's parameters in memory for the duration (read from the shards), then freed."""
        prefix = module_name(self.model, module)
        materialize(self.model, prefix, self.ckpt, self.device, self.dtype)
        try:
            yield module
        finally:
            release(self.model, prefix)
            self.model.tie_weights()  # a tied lm_head follows the embeddings' new (meta) parameter again


def load_streamed(spec: str, device: str, dtype: str, trust_remote_code: bool) -> StreamedModel:
    """The skeleton of a float safetensors checkpoint (an alias or .gguf is converted first, as always), its
    small buffers on `device`, and its tokenizer; quantized checkpoints are refused."""
    from accelerate.utils import set_module_tensor_to_device

    from ..core.ctformat import ct_entry
    from ..core.fingerprint import model_fingerprint
    from ..core.models import load_tokenizer, resolve_device, resolve_dtype, source_dir
    from ..core.qlinear import packed_entry
    from ..core.streamed import check_streamable, streamed_skeleton

    map_large_allocations()
    path = source_dir(spec, trust_remote_code)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if packed_entry(path) is not None or ct_entry(path) is not None:
        raise UserError(f"{spec}: --stream compresses float checkpoints; this one is already quantized")
    model = streamed_skeleton(path, torch_dtype, trust_remote_code)
    ckpt = Checkpoint(path)
    check_streamable(model, ckpt)
    for name, _ in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, device)
    tokenizer = load_tokenizer(path, trust_remote_code)
    return StreamedModel(model, tokenizer, path, model_fingerprint(path), spec, ckpt, device, torch_dtype)


def first_inputs(sm: StreamedModel, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    """Block 0's inputs: only the input embeddings are read for it."""
    with sm.holding(sm.model.get_input_embeddings()):
        return capture_first_inputs(sm.model, windows, batch_size)


# ------------------------------------------------------------------------------------------------ the spool


class Spool:
    """OUTPUT.partial/: the finished blocks and the next block's inputs, each file renamed into place whole."""

    def __init__(self, output: str, run: dict[str, Any]) -> None:
        self.dir = Path(f"{output}.partial")
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = self.dir / "run.json"
        if stamp.is_file() and self.block_file(0).is_file():
            _check_same_run(json.loads(stamp.read_text()), run, self.dir)
        else:  # a new run, or one that stopped before its first block: nothing to resume
            _write_whole(stamp, lambda p: p.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n"))

    def block_file(self, i: int) -> Path:
        return self.dir / f"block-{i:05d}.safetensors"

    def resume_point(self, sequential: bool) -> int:
        """The first block to compress: after the last one whose successors' inputs are spooled too."""
        done = 0
        while self.block_file(done).is_file():
            done += 1
        if sequential:  # blocks are spooled before the inputs they make: inputs ahead of the blocks are damage
            inputs = self.dir / "inputs.safetensors"
            after = _inputs_after(inputs) if inputs.is_file() else -1
            done = after + 1 if after + 1 <= done else 0
        return done

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], reports: list[LayerReport],
                   quantized: dict[str, list[str]]) -> None:
        """`quantized`: each packed layer's output tensor names in the order they were made (the file orders
        by dtype; the output's shards follow the making order)."""
        meta = {"layers": json.dumps([vars(r) for r in reports]), "quantized": json.dumps(quantized)}
        _write_whole(self.block_file(i), lambda p: save_tensors(p, tensors, meta))

    def save_inputs(self, i: int, inputs: BlockInputs) -> None:
        tensors = {f"hidden.{j}": h for j, h in enumerate(inputs.hidden)}
        _write_whole(self.dir / "inputs.safetensors", lambda p: save_tensors(p, tensors, {"after_block": str(i)}))

    def load_inputs(self, kwargs: list[dict[str, Any]], device: str) -> BlockInputs:
        from safetensors.torch import load_file

        hidden = load_file(str(self.dir / "inputs.safetensors"), device=str(device))
        return BlockInputs([hidden[f"hidden.{j}"] for j in range(len(hidden))], kwargs)

    def reports(self, blocks: int) -> tuple[list[LayerReport], list[str]]:
        """The layer reports and quantized layer names of the first `blocks` spooled blocks."""
        layers, quantized = [], []
        for i in range(blocks):
            meta = _metadata(self.block_file(i))
            layers += [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in json.loads(meta["layers"])]
            quantized += list(json.loads(meta["quantized"]))
        return layers, quantized

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def _write_whole(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _metadata(path: Path) -> dict[str, str]:
    from ..core.tensorfile import read_header

    return read_header(path).metadata


def _inputs_after(path: Path) -> int:
    return int(_metadata(path).get("after_block", -1))


def _check_same_run(saved: dict[str, Any], run: dict[str, Any], spool: Path) -> None:
    diff = next((k for k in sorted(set(saved) | set(run)) if saved.get(k) != run.get(k)), None)
    if diff is not None:
        raise UserError(f"{spool} holds a killed run with other options ({diff}: {saved.get(diff)!r}, now "
                        f"{run.get(diff)!r}): rerun with its options to resume it, or delete it to start over")


def run_stamp(config: Any, fingerprint: str) -> dict[str, Any]:
    """What a resumed run must share with the killed one: every option and the source weights."""
    return {**{k: v for k, v in asdict(config).items() if k != "stream"}, "source_fingerprint": fingerprint}


# ------------------------------------------------------------------------------------------ the block loop


@dataclass
class StreamPlan:
    """How each block is compressed and what of it is kept."""
    prune: Any  # methods.PruneConfig
    out_format: str  # "compressed-tensors" or "dense"
    sym: bool  # quantization: symmetric grid (the compressed-tensors zero point)


def compress_blocks(sm: StreamedModel, plan: StreamPlan, spool: Spool, windows: torch.Tensor | None,
                    stats: dict | None, on_block: Callable[[int], None]) -> PruneReport:
    """Compress every block not yet spooled, one in memory at a time; the report of all blocks."""
    blocks = decoder_blocks(sm.model)
    sequential = windows is not None
    start = spool.resume_point(sequential)
    inputs = first_inputs(sm, windows, plan.prune.batch_size) if sequential else None
    if sequential and start > 0:
        inputs = spool.load_inputs(inputs.kwargs, sm.device)
    paths = module_paths(sm.model)
    for i in range(start):
        on_block(i)
    for i in range(start, len(blocks)):
        inputs = _compress_block(sm, blocks[i], i, plan, spool, inputs, stats, paths)
        _return_freed_memory()
        on_block(i)
    layers, quantized = spool.reports(len(blocks))
    return PruneReport(layers, dict.fromkeys(quantized))


def _compress_block(sm: StreamedModel, block: nn.Module, i: int, plan: StreamPlan, spool: Spool,
                    inputs: BlockInputs | None, stats: dict | None, paths: dict[int, str]) -> BlockInputs | None:
    """Read block i, compress it (sequentially on `inputs`, else one-shot from `stats`), spool what the output
    keeps of it and the next block's inputs, and drop it: nothing of it outlives this call."""
    with sm.holding(block):
        report = PruneReport()
        if inputs is not None:
            inputs = sequential_block(block, i, inputs, plan.prune, report, paths)
        else:
            one_shot_block(block, i, stats or {}, plan.prune, report, paths)
        tensors, made = _block_tensors(sm.model, block, report, plan)
        spool.save_block(i, tensors, report.layers, made)
        if inputs is not None:
            spool.save_inputs(i, inputs)
    return inputs


def _glibc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _return_freed_memory() -> None:
    """Hand the block's freed heap back to the system (glibc keeps it otherwise, and the next block's peak
    would stack on it); a no-op where there is no glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation above `threshold` bytes from its own memory map, returned to the system when
    freed. glibc otherwise raises the threshold as large blocks are freed (up to 32 MB), after which tensors
    of a few MB come from the heap, whose fragments accumulate block after block."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def _block_tensors(model: nn.Module, block: nn.Module, report: PruneReport,
                   plan: StreamPlan) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """What the output keeps of a compressed block, under its full names: its state in the run's dtype (the
    quantized layers' weights de-quantized from their codes for a dense output, as the in-memory path writes
    them), or for compressed-tensors the packed layers' tensors in place of their weights; and each packed
    layer's tensor names in order."""
    from ..core.ctformat import layer_tensors

    prefix = module_name(model, block)
    if plan.out_format == "dense":
        write_stored_weights(model, report.quantized)
    state = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
    made: dict[str, list[str]] = {name: [] for name in report.quantized}
    if plan.out_format == "compressed-tensors":
        for name, layer in report.quantized.items():
            del state[f"{name}.weight"]
            packed = layer_tensors(name, layer.quantized(), plan.sym)
            state.update(packed)
            made[name] = list(packed)
    return state, made


# ---------------------------------------------------------------------------------------- writing it out


class OutputTensors:
    """Fetch an output tensor by name: a block's from the spool, any other from the source checkpoint cast as
    the in-memory path casts it (to the run's dtype when loaded, then to the layout's dtype when saved)."""

    def __init__(self, sm: StreamedModel, spool: Spool, layout: dict[str, torch.Tensor]) -> None:
        from safetensors import safe_open

        self.sm, self.layout = sm, layout
        files = sorted(spool.dir.glob("block-*.safetensors"))
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.where = {name: h for h in self.handles for name in h.keys()}

    def __call__(self, name: str) -> torch.Tensor:
        want = self.layout[name].dtype
        if name in self.where:
            t = self.where[name].get_tensor(name)
        else:
            t = self.sm.ckpt.get(name)
            t = t.to(self.sm.dtype) if t.is_floating_point() else t
        return t.to(want) if t.is_floating_point() else t


def quantized_layout(spool: Spool, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each packed layer's compressed-tensors tensors as meta tensors, in the order the layer wrote them."""
    from ..core.shardwriter import torch_dtype
    from ..core.tensorfile import read_header

    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(spool.dir.glob("block-*.safetensors")):
        header = read_header(f)
        for layer, keys in json.loads(header.metadata["quantized"]).items():
            out[layer] = {k: torch.empty(header.tensors[k].shape, dtype=torch_dtype(header.tensors[k].dtype),
                                         device="meta") for k in keys}
    return {n: out[n] for n in names}


def save_dense(sm: StreamedModel, spool: Spool, output: str, entry: dict[str, Any]) -> None:
    """The dense directory as save_pretrained writes it (its own config.json and generation_config.json, the
    tied weights saved once, 2 GB shards and their index), the weights written tensor by tensor."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from ..core import models
    from ..core.atomic import atomic_path
    from ..core.shardwriter import write_shards
    from ..core.streamed import saving_order

    model = sm.model
    model.config.rechannel = entry
    layout = saving_order(model, remove_tied_weights_from_state_dict(model.state_dict(), model))  # meta tensors
    with atomic_path(output) as tmp:
        model.save_pretrained(tmp, state_dict={})  # the config files only: no tensor is given to save
        split = write_shards(tmp, layout, OutputTensors(sm, spool, layout), models.SHARD_SIZE)
        if split.is_sharded:
            index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        sm.tokenizer.save_pretrained(tmp)

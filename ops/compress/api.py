"""The `calibrate` and `compress` drivers as a Python API: a frozen config per command and one function each.

    from rechannel.ops.compress.api import CompressConfig, compress
    report = compress(CompressConfig("out/wanda50", method="wanda", calib="c4.jsonl", docs="0:500"))

Each function checks its outputs against its inputs and validates every option before the model loads (a bad
one is a one-line UserError and nothing is written), does the work, writes its file or directory, and returns
the document the CLI prints. Heavy imports (torch, transformers) wait until they are needed, so a bad option
fails fast. Progress goes through one `Progress` callback: one stage, advanced once per decoder block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import UserError
from ..core.progress import Progress, silent
from ..core.records import load_texts

DEFAULT_TARGETS = r"(self_attn|mlp)\."
DEFAULT_MODEL = "smollm2-135m"

Loader = Callable[..., Any]  # (spec, *, device, dtype, trust_remote_code) -> LoadedModel, as ops.core.models.load_model


def _load_streamed(config: Any) -> Any:
    """The model's skeleton, its weights left on disk (--stream)."""
    from .streaming import load_streamed

    return load_streamed(config.model, config.device, config.dtype, config.trust_remote_code)


def _load(config: Any, load: Loader | None) -> Any:
    """The model a config names, through the caller's loader (the CLI's tames the libraries' logging first)."""
    if load is None:
        from ..core.models import load_model as load
    return load(config.model, device=config.device, dtype=config.dtype, trust_remote_code=config.trust_remote_code)


# ---------------------------------------------------------------------------------------------- calibrate


@dataclass(frozen=True)
class CalibrateConfig:
    data: str  # JSONL of documents ('-' = stdin)
    output: str  # the statistics file (.safetensors) to write
    field: str = "text"  # the record field holding the text
    docs: str = ""  # documents to use, START:END ('' = all; 0:500 keeps 500:1000 held out)
    samples: int = 128  # calibration windows
    seqlen: int = 2048  # tokens per window
    seed: int = 0  # seed of the window draw (Python's random, as the reference code)
    targets: str = DEFAULT_TARGETS  # regex over Linear names inside a block
    hessian: bool = False  # also store H = (2/n) sum x x^T over n windows (SparseGPT and GPTQ need it)
    batch_size: int = 1  # windows per forward batch
    model: str = DEFAULT_MODEL  # built-in alias, .gguf file or model directory
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1 ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16
    trust_remote_code: bool = False  # allow code shipped with the model
    stream: bool = False  # one block in memory at a time, read from the shards: for models larger than memory


def calibrate(config: CalibrateConfig, progress: Progress = silent, load: Loader | None = None) -> dict[str, Any]:
    """Draw calibration windows (as the GPTQ/SparseGPT/Wanda code does), store each target Linear's input
    statistics (and with `hessian` its H) at `config.output` with their provenance, and return the summary:
    output, model, fingerprint, windows, seqlen, tokens, layers, hessian, seconds."""
    from ..core.models import model_paths
    from ..core.outputs import Input, Output, check_outputs

    t0 = time.perf_counter()
    check_outputs([Output("-o", config.output)],
                  [Input("--data", config.data), *(Input("--model", p) for p in model_paths(config.model))])
    texts = load_texts(config.data, config.field, config.docs)
    lm = _load_streamed(config) if config.stream else _load(config, load)
    from ..core.artifacts import Provenance, save_artifact
    from ..core.blocks import decoder_blocks
    from ..core.windows import draw_windows
    from .calibration import calibrate as collect
    from .calibration import stats_to_tensors

    windows = draw_windows(texts, lm.tokenizer, config.samples, config.seqlen, config.seed)  # (samples, seqlen)
    progress("calibrating", total=len(decoder_blocks(lm.model)))
    result = collect(lm.model, windows, config.targets, config.hessian, config.batch_size,
                     on_block=lambda i: progress("calibrating", advance=1),
                     hold=lm.holding if config.stream else None)
    args = {k: getattr(config, k) for k in ("data", "field", "docs", "samples", "seqlen", "seed", "targets", "hessian")}
    tensors, aliases = stats_to_tensors(result, windows)
    save_artifact(config.output, tensors, Provenance("calibration-stats", config.model, lm.fingerprint, args,
                                                     {"tokens": result.tokens, "aliases": aliases}))
    return {"output": config.output, "model": config.model, "fingerprint": lm.fingerprint,
            "windows": config.samples, "seqlen": config.seqlen, "tokens": result.tokens,
            "layers": len(result.stats), "hessian": config.hessian, "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------------------------- compress


@dataclass(frozen=True)
class CompressConfig:
    output: str  # the compressed model directory to write
    method: str = "wanda"  # magnitude, wanda, sparsegpt (prune); rtn, gptq (quantize)
    sparsity: float | None = None  # fraction of each layer's weights to prune (unstructured); None = 0.5
    pattern: str = "unstructured"  # unstructured, or N:M such as 2:4 (N pruned of every M)
    calib: str | None = None  # calibration JSONL: windows drawn here, sequential protocol
    stats: str | None = None  # a `calibrate` output: one-shot from its dense statistics
    sequential: bool = False  # with `stats`: rerun the sequential protocol on its stored windows
    true_sequential: bool = False  # sequential inside each block too: [q,k,v], o, [gate,up], down
    field: str = "text"  # with `calib`: the record field holding the text
    docs: str = ""  # with `calib`: documents to use, START:END
    samples: int = 128  # with `calib`: calibration windows
    seqlen: int = 2048  # with `calib`: tokens per window
    seed: int = 0  # with `calib`: seed of the window draw
    targets: str = DEFAULT_TARGETS  # regex over Linear names inside a block
    bits: int | None = None  # quantize to this many bits: 2, 3, 4 or 8; None = no quantization
    group_size: int = 128  # quantization: input columns per scale and zero point; -1 for one per output row
    sym: bool = False  # quantization: symmetric grid
    act_order: bool = False  # GPTQ: quantize columns by decreasing Hessian diagonal
    static_groups: bool = False  # GPTQ with act_order: groups fixed in the original column order
    format: str | None = None  # compressed-tensors, packed or dense; None: compressed-tensors with `bits` when the
    #                            format holds the scheme (else packed), dense without `bits`
    blocksize: int = 128  # SparseGPT and GPTQ: columns per block
    percdamp: float = 0.01  # SparseGPT and GPTQ: damping, a fraction of mean diag(H)
    batch_size: int = 1  # windows per forward batch
    error_tokens: int = 4096  # calibration tokens each layer's output error is measured on
    model: str = DEFAULT_MODEL  # built-in alias, .gguf file or model directory
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1 ...
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16
    trust_remote_code: bool = False  # allow code shipped with the model
    stream: bool = False  # one block in memory at a time, read from the shards, written out as it finishes;
    #                       resumable from OUTPUT.partial/; the same bytes as the in-memory path

    @property
    def run_sequential(self) -> bool:
        """The sequential protocol: windows from --calib, or the stored ones of --stats --sequential."""
        return self.calib is not None or (self.stats is not None and self.sequential)


@dataclass(frozen=True)
class _Plan:
    """What the options resolve to, all checked before the model loads."""
    prune: Any  # methods.PruneConfig
    quant: Any  # grid.QuantSpec or None
    out_format: str  # "compressed-tensors", "packed" or "dense"


def compress(config: CompressConfig, progress: Progress = silent, load: Loader | None = None) -> dict[str, Any]:
    """Prune or quantize every target Linear in the decoder blocks and write the model directory (packed or
    dense) at `config.output`. Returns the report: output, the config.json `rechannel` entry, totals, seconds,
    timing and the per-layer reports."""
    from ..core.models import model_paths
    from ..core.outputs import Input, Output, check_outputs

    t0 = time.perf_counter()
    check_outputs([Output("-o", config.output, "dir")],
                  [*(Input("--model", p) for p in model_paths(config.model)),
                   Input("--calib", config.calib or ""), Input("--stats", config.stats or "")])
    plan = _plan(config)
    lm = _load_streamed(config) if config.stream else _load(config, load)
    plan = _fit_format(config, plan, lm.model)
    windows, one_shot_stats, calib_desc = _windows_and_stats(config, lm)
    if one_shot_stats is not None and not config.run_sequential:
        _check_stats(one_shot_stats, lm, plan.prune, config.stats)
    t_prune = time.perf_counter()
    if config.stream:
        report, spool = _stream_protocol(config, plan, lm, windows, one_shot_stats, progress)
    else:
        report = _run_protocol(config, plan, lm, windows, one_shot_stats, progress)
    entry = _entry(config, plan, lm, calib_desc)
    t_save = time.perf_counter()
    if config.stream:
        _save_streamed(config, plan, lm, report, entry, spool)
    else:
        _save(config, plan, lm, report, entry)
    end = time.perf_counter()
    timing = {"load": round(t_prune - t0, 2), "prune": round(t_save - t_prune, 2), "save": round(end - t_save, 2)}
    totals = {**report.totals(),
              "error_tokens": min(config.error_tokens, windows.numel()) if config.run_sequential else None}
    if plan.quant is not None:
        totals.update(_sizes(config.output, lm.model, list(report.quantized)))
    return {"output": config.output, **entry, "totals": totals, "seconds": round(end - t0, 2), "timing": timing,
            "layers": [vars(r) for r in report.layers]}


def _plan(config: CompressConfig) -> _Plan:
    """Every option checked, in the order the CLI has always reported them, before anything loads."""
    from .methods import needs_data

    quant, out_format = _quant_spec(config)
    prune = _prune_config(config, quant)
    if config.calib and config.stats:
        raise UserError("give --calib or --stats, not both")
    if config.true_sequential and not (config.calib or (config.stats and config.sequential)):
        raise UserError("--true-sequential refines the sequential protocol: give --calib, or --stats with --sequential")
    if config.stream and out_format == "packed":
        raise UserError(_STREAM_FORMATS)
    if needs_data(config.method) and not (config.calib or config.stats):
        what = "--act-order and GPTQ need" if config.act_order else f"--method {config.method} needs"
        raise UserError(f"{what} calibration data: --calib FILE.jsonl or --stats FILE.safetensors")
    return _Plan(prune, quant, out_format)


FORMATS = ["compressed-tensors", "packed", "dense"]
_STREAM_FORMATS = ("--stream writes compressed-tensors or dense directories; rechannel's packed format (3 bits, "
                   "act-order without --static-groups, groups that do not divide every input width) is written "
                   "from a model in memory: drop --stream, or choose a scheme compressed-tensors holds")


def _quant_spec(config: CompressConfig) -> tuple[Any, str]:
    """(QuantSpec or None, output format), checked. Quantized models default to compressed-tensors (what vLLM,
    SGLang and transformers load) and fall back to rechannel's packed format for the schemes it cannot hold."""
    from ..core.ctformat import cannot_hold
    from ..core.errors import unknown_choice
    from .grid import QuantSpec, check_spec

    fmt = config.format
    if fmt is not None and fmt not in FORMATS:
        raise unknown_choice("format", fmt, FORMATS)
    if config.bits is None:
        if fmt == "packed":
            raise UserError("--format packed needs --bits: only quantized weights pack")
        if config.act_order or config.static_groups or config.sym:
            raise UserError("--sym, --act-order and --static-groups need --bits")
        if fmt == "compressed-tensors":
            raise UserError("--format compressed-tensors holds quantized weights (with --bits); compressed-tensors "
                            ">= 0.15 stores no sparse layout, so a pruned model is written dense: plain safetensors "
                            "every tool loads, its pattern in config.json's `rechannel` entry")
        return None, fmt or "dense"
    spec = QuantSpec(config.bits, config.group_size, config.sym, config.act_order, config.static_groups)
    check_spec(spec)
    why = cannot_hold(spec.bits, spec.act_order, spec.static_groups)
    if fmt == "compressed-tensors" and why:
        raise UserError(f"--format compressed-tensors cannot hold this scheme: {why}; use --format packed")
    return spec, fmt or ("packed" if why else "compressed-tensors")


def _fit_format(config: CompressConfig, plan: _Plan, model: Any) -> _Plan:
    """compressed-tensors groups must divide every quantized layer's input width (the library and vLLM's
    kernels assume whole groups); rechannel's packed format allows a shorter last group. Checked on the loaded
    model before any work: the default format falls back to packed, an explicit one is refused."""
    from dataclasses import replace

    if plan.out_format != "compressed-tensors" or plan.quant is None or plan.quant.group_size == -1:
        return plan
    width = plan.quant.group_size
    ragged = [(n, m.in_features) for n, m in _target_layers(model, config.targets) if m.in_features % width]
    if not ragged:
        return plan
    if config.stream:
        name, cols = ragged[0]
        raise UserError(f"{_STREAM_FORMATS} ({name} has {cols} inputs, --group-size {width})")
    if config.format == "compressed-tensors":
        name, cols = ragged[0]
        raise UserError(f"--format compressed-tensors needs groups that divide every input width: {name} has {cols} "
                        f"inputs, --group-size {width}; choose a divisor of the widths or use --format packed")
    return replace(plan, out_format="packed")


def _prune_config(config: CompressConfig, quant: Any) -> Any:
    """The methods' PruneConfig, every option validated: a bad one is a one-line error and nothing is written."""
    from ..core.errors import unknown_choice
    from .masks import parse_pattern
    from .methods import PRUNERS, QUANTIZERS, PruneConfig

    method, sparsity, pattern = config.method, config.sparsity, config.pattern
    if method not in PRUNERS + QUANTIZERS:
        raise unknown_choice("method", method, PRUNERS + QUANTIZERS)
    if method in QUANTIZERS:
        if quant is None:
            raise UserError(f"--method {method} quantizes: give --bits (2, 3, 4 or 8)")
        if sparsity is not None or pattern != "unstructured":
            raise UserError(f"--method {method} does not prune; for pruning and quantization in one call use "
                            "--method sparsegpt --bits B (joint) or --method wanda|magnitude --bits B")
        if quant.act_order and method == "rtn":
            raise UserError("--act-order orders GPTQ's columns by calibration statistics: it needs --method gptq")
        sparsity, pat = 0.0, parse_pattern("unstructured")
    else:
        if quant is not None and quant.act_order:
            raise UserError("--act-order is GPTQ's: it needs --method gptq")
        sparsity, pat = _sparsity(sparsity, pattern, parse_pattern(pattern))
    return PruneConfig(method, sparsity, pat, quant, config.targets, config.blocksize, config.percdamp,
                       config.batch_size, config.error_tokens, config.true_sequential)


def _sparsity(sparsity: float | None, pattern: str, pat: Any) -> tuple[float, Any]:
    """(sparsity, Pattern) of a pruning method: N:M fixes the fraction, unstructured defaults to 0.5."""
    if pat.structured:
        if sparsity is not None and abs(sparsity - pat.n / pat.m) > 1e-9:
            raise UserError(f"--pattern {pattern} prunes {pat.n} of every {pat.m} weights ({pat.n / pat.m:g}); "
                            f"--sparsity {sparsity} contradicts it: leave --sparsity out")
        return pat.n / pat.m, pat
    if sparsity is None:
        return 0.5, pat
    if not 0 < sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: must be strictly between 0 and 1")
    return sparsity, pat


def _windows_and_stats(config: CompressConfig, lm: Any) -> tuple:
    """(windows (N, T) or None, one-shot statistics or None, description of the calibration for the report)."""
    from ..core.artifacts import load_artifact
    from ..core.windows import draw_windows
    from .calibration import stats_from_tensors

    if config.calib:
        texts = load_texts(config.calib, config.field, config.docs)
        windows = draw_windows(texts, lm.tokenizer, config.samples, config.seqlen, config.seed)
        calib_args = {k: getattr(config, k) for k in ("field", "docs", "samples", "seqlen", "seed")}
        return windows, None, {"source": config.calib, **calib_args}
    if config.stats:
        names = ["windows"] if config.sequential else None  # the sequential protocol needs only the windows
        tensors, meta = load_artifact(config.stats, kind="calibration-stats", fingerprint=lm.fingerprint,
                                      model=lm.spec, names=names)
        windows = tensors.pop("windows").long()
        desc = {"source": config.stats,
                **{k: meta["args"].get(k) for k in ("data", "docs", "samples", "seqlen", "seed")}}
        one_shot = None if config.sequential else stats_from_tensors(tensors, windows, meta.get("aliases"))
        return windows, one_shot, desc
    return None, None, None


def _check_stats(stats: dict, lm: Any, cfg: Any, path: str) -> None:
    """A statistics file must cover every target layer, with Hessians where the method needs them."""
    from ..core.blocks import decoder_blocks
    from .calibration import select_targets
    from .methods import needs_hessian

    for i, block in enumerate(decoder_blocks(lm.model)):
        for name in select_targets(block, cfg.targets):
            s = stats.get(f"layers.{i}.{name}")
            if s is None:
                raise UserError(f"{path} has no statistics for layers.{i}.{name}; calibrate with matching --targets")
            if needs_hessian(cfg.method) and s.hessian is None:
                raise UserError(f"{path} has no Hessians: {cfg.method} needs `rechannel calibrate --hessian`")


def _stage(config: CompressConfig, plan: _Plan) -> str:
    """The progress stage's name: 'wanda 2:4', 'gptq 4-bit', 'sparsegpt unstructured 4-bit'."""
    from .methods import PRUNERS

    quant = plan.quant
    label = f"{config.method} {plan.prune.pattern}" if quant is None or config.method in PRUNERS else config.method
    return label + (f" {quant.bits}-bit" if quant is not None else "")


def _run_protocol(config: CompressConfig, plan: _Plan, lm: Any, windows: Any, one_shot_stats: dict | None,
                  progress: Progress) -> Any:
    """Compress the model in place, sequentially on `windows` (N, T) or one-shot; the PruneReport."""
    from ..core.blocks import decoder_blocks
    from .protocols import prune_one_shot, prune_sequential

    stage = _stage(config, plan)
    progress(stage, total=len(decoder_blocks(lm.model)))
    tick = lambda i: progress(stage, advance=1)  # noqa: E731
    if config.run_sequential:
        return prune_sequential(lm.model, windows, plan.prune, on_block=tick)
    return prune_one_shot(lm.model, one_shot_stats or {}, plan.prune, on_block=tick)


def _entry(config: CompressConfig, plan: _Plan, lm: Any, calib_desc: dict | None) -> dict[str, Any]:
    """How the model was made: the `rechannel` entry of its config.json, and the head of the report."""
    protocol = ("true-sequential" if config.true_sequential else "sequential") if config.run_sequential else "one-shot"
    entry = {"method": config.method, "sparsity": plan.prune.sparsity, "pattern": str(plan.prune.pattern),
             "protocol": protocol, "targets": config.targets, "calibration": calib_desc,
             "source": {"model": config.model, "fingerprint": lm.fingerprint}}
    if config.method in ("sparsegpt", "gptq"):
        entry.update(blocksize=config.blocksize, percdamp=config.percdamp)
    if plan.quant is not None:
        entry.update(quantization={**plan.quant.describe(), "format": plan.out_format})
    return entry


def _save(config: CompressConfig, plan: _Plan, lm: Any, report: Any, entry: dict[str, Any]) -> None:
    """Write the model directory: compressed-tensors or packed codes (every rechannel command loads both), or
    dense weights."""
    from ..core.models import save_model
    from ..core.qlinear import save_packed
    from .protocols import write_stored_weights

    if plan.out_format == "compressed-tensors":
        _save_compressed_tensors(config, plan, lm, report, entry)
    elif plan.out_format == "packed":
        save_packed(lm.model, lm.tokenizer, report.quantized, config.output, entry,
                    {"method": config.method, **plan.quant.describe()})
    else:
        write_stored_weights(lm.model, report.quantized)
        save_model(lm.model, lm.tokenizer, config.output, entry)


def _save_compressed_tensors(config: CompressConfig, plan: _Plan, lm: Any, report: Any, entry: dict[str, Any]) -> None:
    """The compressed-tensors directory: quantized layers packed by the library, the rest in 16-bit floats, the
    sparsity of a pruned model as metadata; config.json keeps the `rechannel` entry beside `quantization_config`."""
    from ..core.ctformat import layer_tensors, save_compressed

    packed = {name: layer_tensors(name, layer.quantized(), plan.quant.sym) for name, layer in report.quantized.items()}
    state, model_config = _ct_layout(plan, lm.model, packed, entry)
    save_compressed(state, model_config, lm.tokenizer, config.output)


def _ct_layout(plan: _Plan, model: Any, packed: dict[str, dict[str, Any]],
               entry: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors by name in the order they are saved, config.json) of a compressed-tensors directory; the
    tensors are real, or meta tensors for a model streamed from disk (its layout only)."""
    from torch import nn

    from ..core.ctformat import Scheme, quantization_config
    from ..core.qlinear import half_state

    quant = plan.quant
    state = half_state(model, {f"{n}.weight" for n in packed})
    for tensors in packed.values():
        state.update(tensors)
    scheme = Scheme(quant.bits, quant.group_size, quant.sym, quant.act_order, plan.prune.sparsity,
                    str(plan.prune.pattern))
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in packed]
    half = next(t.dtype for k, t in state.items() if t.is_floating_point() and not k.endswith(".weight_scale"))
    model_config = model.config.to_dict()
    model_config.update(rechannel=entry, dtype=str(half).removeprefix("torch."),
                        quantization_config=quantization_config(scheme, ignore))
    model_config.pop("quantization", None)
    return state, model_config


def _stream_protocol(config: CompressConfig, plan: _Plan, lm: Any, windows: Any, one_shot_stats: dict | None,
                     progress: Progress) -> tuple[Any, Any]:
    """Compress block by block from disk into the spool (resuming a killed run); (PruneReport, Spool)."""
    from ..core.blocks import decoder_blocks
    from .streaming import Spool, StreamPlan, compress_blocks, run_stamp

    stage = _stage(config, plan)
    progress(stage, total=len(decoder_blocks(lm.model)))
    spool = Spool(config.output, run_stamp(config, lm.fingerprint))
    sym = plan.quant is not None and plan.quant.sym
    report = compress_blocks(lm, StreamPlan(plan.prune, plan.out_format, sym), spool,
                             windows if config.run_sequential else None, one_shot_stats,
                             on_block=lambda i: progress(stage, advance=1))
    return report, spool


def _save_streamed(config: CompressConfig, plan: _Plan, lm: Any, report: Any, entry: dict[str, Any],
                   spool: Any) -> None:
    """The output directory written tensor by tensor from the spool and the source, as _save writes it from
    memory; the spool is removed once the directory is in place."""
    from ..core.ctformat import save_compressed
    from .streaming import OutputTensors, quantized_layout, save_dense

    if plan.out_format == "compressed-tensors":
        state, model_config = _ct_layout(plan, lm.model, quantized_layout(spool, list(report.quantized)), entry)
        save_compressed(state, model_config, lm.tokenizer, config.output, fetch=OutputTensors(lm, spool, state))
    else:
        save_dense(lm, spool, config.output, entry)
    spool.remove()


def _target_layers(model: Any, targets: str) -> list[tuple[str, Any]]:
    """(full name, Linear) of the target Linears inside the decoder blocks: what compress prunes or quantizes."""
    from ..core.blocks import decoder_blocks
    from .calibration import select_targets

    paths = {id(m): name for name, m in model.named_modules()}
    return [(paths[id(layer)], layer) for block in decoder_blocks(model)
            for layer in select_targets(block, targets).values()]


def _sizes(output: str, model: Any, quantized: list[str]) -> dict[str, Any]:
    """Bytes on disk against the fp16 size of the same weights: in total, and for the quantized layers alone
    (their codes, scales, zero points and group indices as written, against their float16 weights)."""
    from pathlib import Path

    from ..core.tensorfile import read_header

    files = [read_header(f) for f in sorted(Path(output).glob("*.safetensors"))]
    params = sum(p.numel() for p in model.parameters())
    layers = sum(model.get_submodule(n).weight.numel() for n in quantized)
    prefixes = tuple(f"{n}." for n in quantized)
    packed = sum(t.end - t.start for h in files for name, t in h.tensors.items()
                 if name.startswith(prefixes) and not name.endswith(".bias"))
    total = sum(f.stat().st_size for f in Path(output).glob("*.safetensors"))
    return {"bytes": total, "fp16_bytes": 2 * params, "size_ratio_fp16": round(total / (2 * params), 4),
            "quantized_parameters": layers, "quantized_bytes": packed,
            "quantized_ratio_fp16": round(packed / (2 * layers), 4) if layers else None}

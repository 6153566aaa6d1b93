"""`rechannel compress`: prune (magnitude, Wanda, SparseGPT; unstructured or N:M) and quantize (RTN, GPTQ;
packed or de-quantized output) a model."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from ..ops.core.errors import UserError
from . import options
from .calibrate import BatchSize, Docs, Field, Samples, Seed, Seqlen, Targets


def _config(method: str, sparsity: float | None, pattern: str, quant: Any, targets: str, blocksize: int,
            percdamp: float, batch_size: int, error_tokens: int, true_sequential: bool = False) -> Any:
    """Validate every option before the model loads: a bad one is a one-line error and nothing is written."""
    from ..ops.compress.masks import parse_pattern
    from ..ops.compress.methods import PRUNERS, QUANTIZERS, PruneConfig
    from ..ops.core.errors import unknown_choice

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
        return PruneConfig(method, 0.0, parse_pattern("unstructured"), quant, targets, blocksize, percdamp,
                           batch_size, error_tokens, true_sequential)
    if quant is not None and quant.act_order:
        raise UserError("--act-order is GPTQ's: it needs --method gptq")
    pat = parse_pattern(pattern)
    if pat.structured:
        if sparsity is not None and abs(sparsity - pat.n / pat.m) > 1e-9:
            raise UserError(f"--pattern {pattern} prunes {pat.n} of every {pat.m} weights ({pat.n / pat.m:g}); "
                            f"--sparsity {sparsity} contradicts it: leave --sparsity out")
        sparsity = pat.n / pat.m
    elif sparsity is None:
        sparsity = 0.5
    elif not 0 < sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: must be strictly between 0 and 1")
    return PruneConfig(method, sparsity, pat, quant, targets, blocksize, percdamp, batch_size, error_tokens,
                       true_sequential)


def _quant_spec(bits: int | None, group_size: int, sym: bool, act_order: bool, static_groups: bool,
                fmt: str | None) -> tuple[Any, str]:
    """(QuantSpec or None, output format), checked."""
    from ..ops.compress.grid import QuantSpec, check_spec
    from ..ops.core.errors import unknown_choice

    if fmt is not None and fmt not in ("packed", "dense"):
        raise unknown_choice("format", fmt, ["packed", "dense"])
    if bits is None:
        if fmt == "packed":
            raise UserError("--format packed needs --bits: only quantized weights pack")
        if act_order or static_groups or sym:
            raise UserError("--sym, --act-order and --static-groups need --bits")
        return None, "dense"
    spec = QuantSpec(bits, group_size, sym, act_order, static_groups)
    check_spec(spec)
    return spec, fmt or "packed"


def _windows_and_stats(calib: str | None, stats: str | None, sequential: bool, lm: Any, calib_args: dict) -> tuple:
    """(windows or None, one-shot statistics or None, description of the calibration for the report)."""
    from ..ops.compress.calibration import stats_from_tensors
    from ..ops.core.artifacts import load_artifact
    from ..ops.core.windows import draw_windows
    from .calibrate import load_texts

    if calib:
        texts = load_texts(calib, calib_args["field"], calib_args["docs"])
        windows = draw_windows(texts, lm.tokenizer, calib_args["samples"], calib_args["seqlen"], calib_args["seed"])
        return windows, None, {"source": calib, **calib_args}
    if stats:
        names = ["windows"] if sequential else None  # the sequential protocol needs only the windows
        tensors, meta = load_artifact(stats, kind="calibration-stats", fingerprint=lm.fingerprint, model=lm.spec,
                                      names=names)
        windows = tensors.pop("windows").long()
        desc = {"source": stats, **{k: meta["args"].get(k) for k in ("data", "docs", "samples", "seqlen", "seed")}}
        one_shot = None if sequential else stats_from_tensors(tensors, windows, meta.get("aliases"))
        return windows, one_shot, desc
    return None, None, None


def _check_stats(stats: dict, lm: Any, cfg: Any, path: str) -> None:
    from ..ops.compress.calibration import select_targets
    from ..ops.compress.methods import needs_hessian
    from ..ops.core.blocks import decoder_blocks

    for i, block in enumerate(decoder_blocks(lm.model)):
        for name in select_targets(block, cfg.targets):
            s = stats.get(f"layers.{i}.{name}")
            if s is None:
                raise UserError(f"{path} has no statistics for layers.{i}.{name}; calibrate with matching --targets")
            if needs_hessian(cfg.method) and s.hessian is None:
                raise UserError(f"{path} has no Hessians: {cfg.method} needs `rechannel calibrate --hessian`")


def compress_command(
    output: Annotated[str, typer.Option("--output", "-o", help="The compressed model directory.")],
    method: Annotated[str, typer.Option(help="magnitude, wanda, sparsegpt (prune); rtn, gptq (quantize).")] = "wanda",
    sparsity: Annotated[float | None, typer.Option(help="Fraction of each layer's weights to prune (unstructured). \\[default: 0.5]", show_default=False)] = None,
    pattern: Annotated[str, typer.Option(help="unstructured, or N:M such as 2:4 or 4:8 (N pruned of every M).")] = "unstructured",
    calib: Annotated[str | None, typer.Option(help="Calibration JSONL: windows drawn here, sequential protocol.")] = None,
    stats: Annotated[str | None, typer.Option(help="A `calibrate` output: one-shot from its dense statistics.")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="With --stats: rerun the sequential protocol on its stored windows.")] = False,
    true_sequential: Annotated[bool, typer.Option("--true-sequential", help="Sequential inside each block too, as GPTQ's option: \\[q,k,v], then o, then \\[gate,up], then down, each calibrated through the layers already compressed.")] = False,
    field: Field = "text",
    docs: Docs = "",
    samples: Samples = 128,
    seqlen: Seqlen = 2048,
    seed: Seed = 0,
    targets: Targets = r"(self_attn|mlp)\.",
    bits: Annotated[int | None, typer.Option(help="Quantize to this many bits: 2, 3, 4 or 8.", show_default=False)] = None,
    group_size: Annotated[int, typer.Option(help="Quantization: input columns per scale and zero point; -1 for one per output row.")] = 128,
    sym: Annotated[bool, typer.Option("--sym", help="Quantization: symmetric grid (zero point in the middle).")] = False,
    act_order: Annotated[bool, typer.Option("--act-order", help="GPTQ: quantize columns by decreasing Hessian diagonal.")] = False,
    static_groups: Annotated[bool, typer.Option("--static-groups", help="GPTQ with --act-order: groups fixed in the original column order, so running the model needs no reordering.")] = False,
    fmt: Annotated[str | None, typer.Option("--format", help="packed (quantized integers, rechannel loads it; the default with --bits) or dense (de-quantized weights plain transformers loads).", show_default=False)] = None,
    blocksize: Annotated[int, typer.Option(min=1, help="SparseGPT and GPTQ: columns per block.")] = 128,
    percdamp: Annotated[float, typer.Option(min=0.0, help="SparseGPT and GPTQ: damping, a fraction of mean diag(H).")] = 0.01,
    batch_size: BatchSize = 1,
    error_tokens: Annotated[int, typer.Option(min=1, help="Calibration tokens each layer's output error is measured on.")] = 4096,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Prune or quantize every Linear in the decoder blocks and write a model directory; report on stdout.

    [bold]Examples[/bold]

      rechannel compress --method wanda --sparsity 0.5 --calib c4.jsonl --docs 0:500 -o out/wanda50
      rechannel compress --method sparsegpt --pattern 2:4 --stats stats-h.safetensors -o out/sgpt24
      rechannel compress --method magnitude --sparsity 0.5 -o out/mag50 | jq .totals
      rechannel compress --method gptq --bits 4 --group-size 128 --calib c4.jsonl -o out/gptq4
      rechannel compress --method rtn --bits 8 --group-size -1 --format dense -o out/rtn8

    wanda, sparsegpt and gptq use the reference sequential protocol with --calib (or --stats --sequential): each block is calibrated on the outputs of the already-compressed blocks before it. --stats alone compresses one-shot from dense statistics. Embeddings and lm_head are never compressed. Quantized models are written packed (model-packed.safetensors, which every rechannel command loads) unless --format dense.
    """
    from ..ops.compress.methods import PRUNERS, needs_data
    from ..ops.compress.protocols import prune_one_shot, prune_sequential, write_stored_weights
    from ..ops.core.blocks import decoder_blocks
    from ..ops.core.models import model_paths, save_model
    from ..ops.core.outputs import Input, Output, check_outputs
    from ..ops.core.qlinear import save_packed
    from .console import progress
    from .jsonl import STDIO, JsonlWriter

    t0 = time.perf_counter()
    check_outputs([Output("-o", output, "dir")], [*(Input("--model", p) for p in model_paths(model)),
                                                  Input("--calib", calib or ""), Input("--stats", stats or "")])
    quant, out_format = _quant_spec(bits, group_size, sym, act_order, static_groups, fmt)
    cfg = _config(method, sparsity, pattern, quant, targets, blocksize, percdamp, batch_size, error_tokens,
                  true_sequential)
    if calib and stats:
        raise UserError("give --calib or --stats, not both")
    if true_sequential and not (calib or (stats and sequential)):
        raise UserError("--true-sequential refines the sequential protocol: give --calib, or --stats with --sequential")
    if needs_data(method) and not (calib or stats):
        what = "--act-order and GPTQ need" if act_order else f"--method {method} needs"
        raise UserError(f"{what} calibration data: --calib FILE.jsonl or --stats FILE.safetensors")
    lm = options.load(model, device, dtype, trust_remote_code)
    calib_args = {"field": field, "docs": docs, "samples": samples, "seqlen": seqlen, "seed": seed}
    windows, one_shot_stats, calib_desc = _windows_and_stats(calib, stats, sequential, lm, calib_args)
    run_sequential = calib is not None or (stats is not None and sequential)
    if one_shot_stats is not None and not run_sequential:
        _check_stats(one_shot_stats, lm, cfg, stats)
    t_prune = time.perf_counter()
    with progress() as bar:
        label = f"{method} {cfg.pattern}" if quant is None or method in PRUNERS else method
        label += f" {quant.bits}-bit" if quant is not None else ""
        task = bar.add_task(label, total=len(decoder_blocks(lm.model)))
        tick = lambda i: bar.advance(task)  # noqa: E731
        if run_sequential:
            report = prune_sequential(lm.model, windows, cfg, on_block=tick)
        else:
            report = prune_one_shot(lm.model, one_shot_stats or {}, cfg, on_block=tick)
    entry = {"method": method, "sparsity": cfg.sparsity, "pattern": str(cfg.pattern),
             "protocol": ("true-sequential" if true_sequential else "sequential") if run_sequential else "one-shot",
             "targets": targets,
             "calibration": calib_desc, "source": {"model": model, "fingerprint": lm.fingerprint}}
    if method in ("sparsegpt", "gptq"):
        entry.update(blocksize=blocksize, percdamp=percdamp)
    if quant is not None:
        entry.update(quantization={**quant.describe(), "format": out_format})
    t_save = time.perf_counter()
    if out_format == "packed":
        save_packed(lm.model, lm.tokenizer, report.quantized, output, entry, {"method": method, **quant.describe()})
    else:
        write_stored_weights(lm.model, report.quantized)
        save_model(lm.model, lm.tokenizer, output, entry)
    end = time.perf_counter()
    timing = {"load": round(t_prune - t0, 2), "prune": round(t_save - t_prune, 2), "save": round(end - t_save, 2)}
    totals = {**report.totals(), "error_tokens": min(error_tokens, windows.numel()) if run_sequential else None}
    if quant is not None:
        totals.update(_sizes(output, lm.model, report))
    doc = {"output": output, **entry, "totals": totals, "seconds": round(end - t0, 2), "timing": timing,
           "layers": [vars(r) for r in report.layers]}
    with JsonlWriter(STDIO) as out:
        out.write(doc)


def _sizes(output: str, model: Any, report: Any) -> dict[str, Any]:
    """Bytes on disk against the fp16 size of the same weights: in total, and for the quantized layers alone
    (packed codes, scales, zero points and group indices against their float16 weights)."""
    from pathlib import Path

    files = sum(f.stat().st_size for f in Path(output).glob("*.safetensors"))
    params = sum(p.numel() for p in model.parameters())
    layers = sum(q.in_features * q.out_features for q in report.quantized.values())
    packed = sum(sum(t.numel() * t.element_size() for t in q.buffers()) for q in report.quantized.values())
    return {"bytes": files, "fp16_bytes": 2 * params, "size_ratio_fp16": round(files / (2 * params), 4),
            "quantized_parameters": layers, "quantized_bytes": packed,
            "quantized_ratio_fp16": round(packed / (2 * layers), 4) if layers else None}

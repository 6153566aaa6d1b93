"""`rechannel compress`: prune (magnitude, Wanda, SparseGPT; unstructured or N:M) and quantize (RTN, GPTQ;
packed or de-quantized output) a model."""

from __future__ import annotations

from typing import Annotated

import typer

from . import options
from .calibrate import BatchSize, Docs, Field, Samples, Seed, Seqlen, Targets

Output = Annotated[str, typer.Option("--output", "-o", help="The compressed model directory.")]
Method = Annotated[str, typer.Option(help="magnitude, wanda, sparsegpt (prune); rtn, gptq (quantize).")]
Sparsity = Annotated[float | None, typer.Option(help="Fraction of each layer's weights to prune (unstructured). \\[default: 0.5]", show_default=False)]
Pattern = Annotated[str, typer.Option(help="unstructured, or N:M such as 2:4 or 4:8 (N pruned of every M).")]
Calib = Annotated[str | None, typer.Option(help="Calibration JSONL: windows drawn here, sequential protocol.")]
Stats = Annotated[str | None, typer.Option(help="A `calibrate` output: one-shot from its dense statistics.")]
Sequential = Annotated[bool, typer.Option("--sequential", help="With --stats: rerun the sequential protocol on its stored windows.")]
TrueSequential = Annotated[bool, typer.Option("--true-sequential", help="Sequential inside each block too, as GPTQ's option: \\[q,k,v], then o, then \\[gate,up], then down, each calibrated through the layers already compressed.")]
Bits = Annotated[int | None, typer.Option(help="Quantize to this many bits: 2, 3, 4 or 8.", show_default=False)]
GroupSize = Annotated[int, typer.Option(help="Quantization: input columns per scale and zero point; -1 for one per output row.")]
Sym = Annotated[bool, typer.Option("--sym", help="Quantization: symmetric grid (zero point in the middle).")]
ActOrder = Annotated[bool, typer.Option("--act-order", help="GPTQ: quantize columns by decreasing Hessian diagonal.")]
StaticGroups = Annotated[bool, typer.Option("--static-groups", help="GPTQ with --act-order: groups fixed in the original column order, so running the model needs no reordering.")]
Format = Annotated[str | None, typer.Option("--format", help="compressed-tensors (the default with --bits: what vLLM, SGLang and transformers load, and rechannel), packed (rechannel's own layout; the default for what compressed-tensors cannot hold: 3-bit, act-order without --static-groups) or dense (float weights; the default without --bits, and the only format for a pruned model without --bits).", show_default=False)]
Blocksize = Annotated[int, typer.Option(min=1, help="SparseGPT and GPTQ: columns per block.")]
Percdamp = Annotated[float, typer.Option(min=0.0, help="SparseGPT and GPTQ: damping, a fraction of mean diag(H).")]
Stream = Annotated[bool, typer.Option("--stream", help="For models larger than memory: one decoder block in memory at a time, read from the safetensors shards, compressed, spooled to OUTPUT.partial/ and dropped; the directory is then written tensor by tensor. Byte-identical to the in-memory output; a killed run resumes at its first unfinished block when started again with the same options. Writes compressed-tensors or dense.")]
ErrorTokens = Annotated[int, typer.Option(min=1, help="Calibration tokens each layer's output error is measured on.")]


def compress_command(
    output: Output,
    method: Method = "wanda",
    sparsity: Sparsity = None,
    pattern: Pattern = "unstructured",
    calib: Calib = None,
    stats: Stats = None,
    sequential: Sequential = False,
    true_sequential: TrueSequential = False,
    field: Field = "text",
    docs: Docs = "",
    samples: Samples = 128,
    seqlen: Seqlen = 2048,
    seed: Seed = 0,
    targets: Targets = r"(self_attn|mlp)\.",
    bits: Bits = None,
    group_size: GroupSize = 128,
    sym: Sym = False,
    act_order: ActOrder = False,
    static_groups: StaticGroups = False,
    fmt: Format = None,
    blocksize: Blocksize = 128,
    percdamp: Percdamp = 0.01,
    batch_size: BatchSize = 1,
    error_tokens: ErrorTokens = 4096,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
    stream: Stream = False,
) -> None:
    """Prune or quantize every Linear in the decoder blocks and write a model directory; report on stdout.

    [bold]Examples[/bold]

      rechannel compress --method wanda --sparsity 0.5 --calib c4.jsonl --docs 0:500 -o out/wanda50
      rechannel compress --method sparsegpt --pattern 2:4 --stats stats-h.safetensors -o out/sgpt24
      rechannel compress --method magnitude --sparsity 0.5 -o out/mag50 | jq .totals
      rechannel compress --method gptq --bits 4 --group-size 64 --calib c4.jsonl -o out/gptq4
      rechannel compress --method sparsegpt --pattern 2:4 --bits 4 --group-size 64 --calib c4.jsonl -o out/sgpt24-4
      rechannel compress --method rtn --bits 8 --group-size -1 --format dense -o out/rtn8

    wanda, sparsegpt and gptq use the reference sequential protocol with --calib (or --stats --sequential): each block is calibrated on the outputs of the already-compressed blocks before it. --stats alone compresses one-shot from dense statistics. Embeddings and lm_head are never compressed. Quantized models are written in the compressed-tensors format (as llm-compressor writes them: vLLM, SGLang and transformers load it, and so does every rechannel command) unless it cannot hold the scheme: 3 bits, act-order without --static-groups, or groups that do not divide a layer's input width (SmolLM2's 576 with --group-size 128); those are written packed (model-packed.safetensors), which only rechannel loads.
    """
    from ..ops.compress.api import CompressConfig, compress
    from .console import bars
    from .jsonl import STDIO, JsonlWriter

    config = CompressConfig(
        output=output, method=method, sparsity=sparsity, pattern=pattern, calib=calib, stats=stats,
        sequential=sequential, true_sequential=true_sequential, field=field, docs=docs, samples=samples,
        seqlen=seqlen, seed=seed, targets=targets, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
        static_groups=static_groups, format=fmt, blocksize=blocksize, percdamp=percdamp, batch_size=batch_size,
        error_tokens=error_tokens, model=model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        stream=stream)
    with bars() as report:
        doc = compress(config, progress=report, load=options.load)
    with JsonlWriter(STDIO) as out:
        out.write(doc)

"""`rechannel generate`: complete prompts with a model, JSONL in and out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer

from ..ops.core.errors import UserError
from . import options


def _inputs(prompts: list[str], input_path: str | None, field: str) -> tuple[list[dict], list[str]]:
    """Records to complete (one per PROMPT argument, or the JSONL input with every field kept), and where each
    came from for error messages; an empty prompt is refused here, before the model loads."""
    from ..ops.core.records import read_jsonl

    if prompts and input_path:
        raise UserError("give PROMPT arguments or --input, not both")
    if prompts:
        records, where = [{field: p} for p in prompts], [f"PROMPT {i + 1}" for i in range(len(prompts))]
    else:
        read = read_jsonl(input_path or "-", require=(field,))
        for r in read:
            r.field(field, str)
        records, where = [r.data for r in read], [r.where for r in read]
    for rec, name in zip(records, where, strict=True):
        if not rec[field]:
            raise UserError(f"{name}: the prompt is empty: nothing to complete")
    return records, where


def generate_command(
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompt texts; without them, JSONL is read.")] = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="JSONL file of records ('-' = stdin).")] = None,
    field: Annotated[str, typer.Option(help="The record field holding the prompt.")] = "prompt",
    output: Annotated[str, typer.Option("--output", "-o", help="Where the records go ('-' = stdout).")] = "-",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy; above 0 samples.")] = 0.0,
    stop: Annotated[list[str] | None, typer.Option(help="Cut the completion at this string (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (under torchrun, rank r samples with seed + r).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward batch.")] = 8,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Complete prompts; each output record is its input plus "completion" and "completion_tokens".

    [bold]Examples[/bold]

      rechannel generate "The capital of France is" --max-new-tokens 8
      echo '{"id": 7, "prompt": "2 + 2 ="}' | rechannel generate | jq -r .completion
      rechannel generate -i questions.jsonl --field question --stop $'\\n' -o answers.jsonl
    """
    from ..ops.core.distributed import join, refuse_stdin, together
    from ..ops.core.generate import GenerateConfig
    from ..ops.core.models import model_paths
    from ..ops.core.outputs import Input, Output, check_outputs
    from .jsonl import JsonlWriter

    world = join()

    def read() -> tuple[list[dict], list[str]]:
        check_outputs([Output("-o", output)], [Input("--input", input or ""), *(Input("--model", p) for p in model_paths(model))])
        if not prompts:
            refuse_stdin("--input", input, world)
        return _inputs(prompts or [], input, field)

    records, where = together(read, world)  # every rank reads and checks the input
    cfg = GenerateConfig(max_new_tokens, temperature, seed + world.rank, batch_size, tuple(stop or ()))
    done = _completions([r[field] for r in records], where, cfg, (model, device, dtype, trust_remote_code), world)
    if not world.main:  # under torchrun, rank 0 writes
        return
    with JsonlWriter(output) as out:
        for rec, (text, n) in zip(records, done, strict=True):
            out.write({**rec, "completion": text, "completion_tokens": n})


def _completions(texts: list[str], where: list[str], cfg, model: tuple, world) -> Iterable[tuple[str, int]]:
    """(completion, new tokens) of every text in input order: streamed as they come in a single process;
    under torchrun each rank completes its contiguous share and every rank gets all of them back."""
    from ..ops.core.distributed import concat, gather, rank_device, sharded
    from ..ops.core.generate import check_prompt_lengths, complete

    def shard() -> Iterable[tuple[str, int]]:
        mine = sharded(range(len(texts)), world, "prompts")
        spec, device, dtype, trust_remote_code = model
        lm = options.load(spec, rank_device(device, world), dtype, trust_remote_code)
        check_prompt_lengths(lm.tokenizer, lm.model.config, [texts[i] for i in mine], cfg.max_new_tokens,
                             [where[i] for i in mine])
        return complete(lm.model, lm.tokenizer, [texts[i] for i in mine], cfg)

    if world.size == 1:
        return shard()
    return concat(gather(lambda: list(shard()), world))

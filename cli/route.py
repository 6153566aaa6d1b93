"""`rechannel route`: pick a bank's prompt for every input record (IDP), JSONL in and out."""

from __future__ import annotations

from typing import Annotated

import typer

from ..ops.core.errors import unknown_choice
from . import options


def route_command(
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="The prompt bank (.safetensors) from train-prompts.")],
    by: Annotated[str, typer.Option(help="attention (IDP: the prompt the input attends to most) or entropy "
                                         "(the prompt under which the model is least uncertain; M passes).")] = "attention",
    field: Annotated[str, typer.Option(help="The record field holding the text to route.")] = "text",
    layers: Annotated[str, typer.Option(help="Layers attention routing reads: first (the first 1/8: cheap), all, "
                                             "A:B or i,j,k.")] = "first",
    input: Annotated[str, typer.Option("--input", "-i", help="JSONL records ('-' = stdin).")] = "-",
    output: Annotated[str, typer.Option("--output", "-o", help="Where the records go ('-' = stdout).")] = "-",
    batch_size: Annotated[int, typer.Option(min=1, help="Inputs per forward batch.")] = 8,
    model: options.Model = "smollm2-135m",
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Choose a prompt of the bank for every record; each record gains "route".

    [bold]Examples[/bold]

      rechannel route --model out/wanda50 --prompts bank.safetensors < questions.jsonl > routed.jsonl
      rechannel route -m out/gptq3 -p bank.safetensors --field question --by entropy -i q.jsonl | jq .route.prompt
      rechannel route -m out/wanda50 -p bank.safetensors --layers all < q.jsonl

    The prompts' keys and values are computed once; each input then runs once with every prompt in front of it (each at the positions it was trained at) and the prompt that receives the most attention from the input's tokens (mean over heads, tokens and --layers) is chosen. The record gains "route": {"prompt", "scores", "by", "layers"}.
    """
    from ..ops.core.blocks import decoder_blocks
    from ..ops.core.models import model_paths
    from ..ops.core.outputs import Input, Output, check_outputs
    from ..ops.core.records import read_jsonl
    from ..ops.recover.prompts import load_prompt_bank
    from ..ops.recover.routing import BY, bank_kv, parse_layers, route_rows, routing_ids
    from .console import progress
    from .jsonl import JsonlWriter

    if by not in BY:
        raise unknown_choice("by", by, BY)
    check_outputs([Output("-o", output)], [Input("--input", input), Input("--prompts", prompts),
                                           *(Input("--model", p) for p in model_paths(model))])
    records = read_jsonl(input, require=(field,))
    texts = [r.field(field, str) for r in records]
    lm = options.load(model, device, dtype, trust_remote_code)
    bank = load_prompt_bank(prompts, lm)
    picked = parse_layers(layers, len(decoder_blocks(lm.model)))
    with progress() as bar:
        task = bar.add_task(f"routing by {by}", total=len(texts))
        routes = route_rows(lm.model, bank_kv(lm.model, bank), routing_ids(lm.tokenizer, texts), by, picked,
                            batch_size, lm.tokenizer.pad_token_id or 0, lambda n: bar.advance(task, n))
    with JsonlWriter(output) as out:
        for rec, (k, scores) in zip(records, routes, strict=True):
            info = {"prompt": k, "scores": [round(v, 6) for v in scores], "by": by, **({"layers": picked} if by == "attention" else {})}
            out.write({**rec.data, "route": info})

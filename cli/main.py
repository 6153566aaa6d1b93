"""The `rechannel` entry point: the command table and the error boundary.

Exit status: 0 success; 1 a failure the user can fix, printed as one line `error: ...` (traceback only
with --debug); 2 a usage error (typer's own); 130 with "error: interrupted" on Ctrl-C (143 on SIGTERM). A closed
stdout (`| head`) ends the run quietly. Only typer and rich are imported here, so `--help` is instant; each command imports torch and
transformers inside its body.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import typer

from ..ops.core.errors import UserError
from ..ops.core.version import __version__
from . import (
    align,
    calibrate,
    compress,
    eval,
    generate,
    inspect,
    models,
    route,
    sources,
    table,
    train_prompts,
)

HELP = """Compress a causal LM, measure what it lost, and win the knowledge back with routed soft prompts.

[bold]Examples[/bold]

  rechannel models prepare smollm2-135m
  rechannel inspect smollm2-135m --no-tensors
  rechannel generate "The capital of France is" --max-new-tokens 8
  jq -c '{id, prompt: .question}' q.jsonl | rechannel generate | jq -r .completion

Records travel as JSON Lines on stdin/stdout ("-"); tensors as safetensors; models in Hugging Face layout. Logs and progress go to stderr. Exit 0 on success, 1 with "error: ..." for a fixable failure, 2 for a usage error. The default model everywhere is the built-in alias smollm2-135m.
"""

app = typer.Typer(name="rechannel", help=HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode="rich",
                  context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        print(f"rechannel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (accepted anywhere on the line)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """(global options)"""


app.add_typer(models.app, name="models")
app.command("inspect")(inspect.inspect_command)
app.command("generate")(generate.generate_command)
app.command("calibrate")(calibrate.calibrate_command)
app.command("compress")(compress.compress_command)
app.command("eval")(eval.eval_command)
app.command("train-prompts")(train_prompts.train_prompts_command)
app.command("sources")(sources.sources_command)
app.command("route")(route.route_command)
app.command("align")(align.align_command)
app.command("table")(table.table_command)


def _quiet_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's final flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class Interrupted(SystemExit):
    """Ctrl-C or SIGTERM: unwinds like any exception (atomic writers remove their temporaries), and click,
    which would turn a KeyboardInterrupt into "Aborted!" and exit 1, lets a SystemExit through."""


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(128 + signum)


def _one_line(e: BaseException) -> str:
    """The message on one line: a library's multi-line text is folded, never spread over the terminal."""
    return " ".join(str(e).split())


def _leave() -> None:
    """Close the torchrun process group if the command joined one (only then is torch imported)."""
    if "torch.distributed" in sys.modules:
        from ..ops.core.distributed import leave

        leave()


SHARDED = ("eval", "route", "generate", "align", "train-prompts")  # the commands that run under torchrun


def _refuse_unsharded(args: list[str]) -> None:
    """Under torchrun, a command that does not shard its work would run N times over and N ranks would write one
    output: refused (rank 0 says so, every rank exits 1)."""
    from ..ops.core.distributed import RankFailed, world

    command = next((a for a in args if not a.startswith("-")), None)
    size = world().size
    if size > 1 and command is not None and command not in SHARDED:
        raise RankFailed(f"{command} does not run under torchrun ({size} processes): run it in one process; "
                         f"these shard their work: {', '.join(SHARDED)}")


def _speaks(e: UserError) -> bool:
    """Under torchrun a failure gathered from the ranks is raised on each of them: rank 0 alone prints it."""
    from ..ops.core.distributed import RankFailed, world

    return not isinstance(e, RankFailed) or world().main


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("RECHANNEL_DEBUG"))
    args = [a for a in args if a != "--debug"]
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        _refuse_unsharded(args)
        app(args=args, prog_name="rechannel")
    except Interrupted as e:
        print(f"error: {'interrupted' if e.code == 128 + signal.SIGINT else 'terminated'}", file=sys.stderr)
        sys.exit(e.code)
    except UserError as e:
        if debug:
            traceback.print_exc()
        if _speaks(e):
            print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        _quiet_stdout()
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug, not the user's fault: say so in one line unless asked for more
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {type(e).__name__}: {_one_line(e)} (run again with --debug for the traceback)",
                  file=sys.stderr)
        sys.exit(1)
    finally:
        _leave()


if __name__ == "__main__":
    main()

"""`rechannel align`: where, token by token, a teacher's distillation signal points toward success."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..ops.core.errors import UserError
from . import options

SELF = "self"


def _pass_rate(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--select-pass-rate {text!r}: write LOW:HIGH, e.g. 0.1:0.9") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise UserError(f"--select-pass-rate {text!r}: need 0 <= LOW <= HIGH <= 1")
    return lo, hi


def _questions(data: str, field: str, id_field: str, verifier: Any, limit: int | None) -> list[Any]:
    from ..ops.align.diagnosis import Question
    from ..ops.align.verifiers import check_record
    from ..ops.core.records import read_jsonl

    records = read_jsonl(data, require=(field,))
    records = records[:limit] if limit else records
    for r in records:
        r.field(field, str)
        check_record(verifier, r)
    return [Question(i, r.data, r.data.get(id_field, i)) for i, r in enumerate(records)]


def _check_fields(contexts: list[Any], questions: list[Any]) -> None:
    for c in contexts:
        for name in c.fields():
            missing = next((q for q in questions if name not in q.record), None)
            if missing is not None:
                raise UserError(f"record {missing.index + 1}: context {c.name} needs the field {name!r}")


def _scorers(student: Any, teachers: list[str], contexts: list[Any], load: Any) -> list[Any]:
    """Every teacher model with every context, except the student itself with no context (q = p)."""
    from ..ops.align.contexts import prompt_ids
    from ..ops.align.diagnosis import Scorer

    out = []
    for spec in teachers:
        lm = student if spec == SELF else load(spec)
        ids = prompt_ids(lm.tokenizer)
        for ctx in contexts:
            if spec == SELF and ctx.name == "none":
                continue
            name = f"{spec if spec == SELF else Path(spec).name}+{ctx.name.split('/')[-1]}"
            if any(s.name == name for s in out):  # two teachers whose directories share a name
                name = f"{spec}+{ctx.name}"
            out.append(Scorer(name, lm.model, lambda rec, c=ctx, f=ids: f(c.render(rec))))
    if not out:
        raise UserError("no teacher: the student with no context is the student itself; add --context reference "
                        "or a --teacher model")
    return out


RESUME_FREE = ("max_questions", "limit", "max_batch")  # may change on --resume: they change no record


def _previous(nodes: str, resume: bool, run: dict[str, Any]) -> tuple[list[dict], list[dict], int, dict]:
    """(question records, node records, bytes) of the whole questions already written: a question's record
    closes its block; what follows the last one (a block cut off by a kill) is dropped on resume. The file's
    first record holds the settings of the run that wrote it: another run's file is refused."""
    from ..ops.core.records import parse_object

    if not resume:
        return [], [], 0, {}
    if nodes == "-":
        raise UserError("--resume needs --nodes FILE: the node records written so far are read back from it")
    if not Path(nodes).exists():
        return [], [], 0, {}
    records, kept, keep = [], 0, 0
    with open(nodes, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):  # the last line, cut off mid-write
                break
            if raw.strip():
                records.append(parse_object(raw, f"{nodes}:{lineno}"))
            if records and records[-1].get("kind") in ("question", "run"):
                kept, keep = len(records), f.tell()
    if records:  # checked on every record read, closed block or not: a foreign file is never cut back
        _same_run(nodes, records[0], run)
    records = records[:kept]
    return ([r for r in records if r.get("kind") == "question"], [r for r in records if r.get("kind") == "node"],
            keep, records[0] if records else {})


def run_record(config: dict[str, Any]) -> dict[str, Any]:
    """The first record of a node file: what --resume must find unchanged."""
    from ..ops.core.version import __version__

    return {"kind": "run", "rechannel": __version__,
            "config": {k: v for k, v in config.items() if k not in RESUME_FREE}}


def _same_run(nodes: str, head: dict[str, Any], run: dict[str, Any]) -> None:
    if head.get("kind") != "run" or not isinstance(head.get("config"), dict):
        raise UserError(f"{nodes}:1: not a node file written by `rechannel align` (no run record first); "
                        "--resume continues only its own runs")
    was, now = head["config"], run["config"]
    diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if diff:
        raise UserError(f"{nodes}: written by another run (different {', '.join(diff)}); --resume continues only "
                        "the same run: use the same options or another --nodes file")


def _outputs(output: str, nodes: str, plot: str | None, data: str, specs: list[str], files: list[str]) -> None:
    """Every output path checked against every input before anything loads."""
    from ..ops.core.models import model_paths
    from ..ops.core.outputs import Input, Output, check_outputs

    outs = [Output("-o", output), Output("--nodes", nodes)]
    if plot:
        from .plots import ALIGN_FIGURES

        outs += [Output("--plot", str(Path(plot) / name)) for name in ALIGN_FIGURES]
    ins = [Input("--data", data), *(Input("--student/--teacher", p) for s in specs for p in model_paths(s)),
           *(Input("--context/--prompt", f) for f in files)]
    check_outputs(outs, ins)


def align_command(
    data: Annotated[str, typer.Option("--data", "-d", help="JSONL questions ('-' = stdin).")],
    output: Annotated[str, typer.Option("--output", "-o", help="The summary JSON ('-' = stdout).")],
    student: Annotated[str, typer.Option(help="The student: alias, .gguf or model directory.",
                                         rich_help_panel="Model")] = "smollm2-135m",
    teacher: Annotated[list[str] | None, typer.Option(help="A teacher model with the student's tokenizer, or "
                                                      "'self' (repeatable; default self).")] = None,
    context: Annotated[list[str] | None, typer.Option(help="What each teacher sees before the rollout: none, "
                                                      "reference or template:FILE (repeatable; default reference)."
                                                      )] = None,
    field: Annotated[str, typer.Option(help="The record field holding the question.")] = "question",
    prompt: Annotated[str, typer.Option(help="What the student sees: none (the question field) or "
                                        "template:FILE ({field} placeholders filled from the record).")] = "none",
    id_field: Annotated[str, typer.Option(help="The record field naming the question (else its index).")] = "id",
    verifier: Annotated[str, typer.Option(help="gsm8k, mc, exact or regex:PATTERN (reads the 'answer' field).")
                        ] = "gsm8k",
    rollouts: Annotated[int, typer.Option(min=1, help="Student rollouts per question.")] = 8,
    continuations: Annotated[int, typer.Option(min=1, help="Student continuations per candidate (S_k).")] = 8,
    candidates: Annotated[int, typer.Option(min=1, help="Top tokens of the student and of each teacher in K.")
                          ] = 4,
    budget: Annotated[int, typer.Option(help="Nodes per question.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature of rollouts and continuations "
                                               "(p and q stay the models' own distributions).")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Rollout length at most.")] = 256,
    beta: Annotated[float, typer.Option(help="β of JSD(β), in (0, 1): the teacher's weight in the mixture, as in GKD and TRL.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of rollouts, nodes and continuations.")] = 0,
    max_batch: Annotated[int | None, typer.Option(min=1, help="Continuations decoded together at most (default: "
                                                  "all of a node's); lower it if a large model runs out of memory.")
                         ] = None,
    select_pass_rate: Annotated[str | None, typer.Option(help="LOW:HIGH: analyse only questions whose rollouts "
                                                         "pass at a rate in this range, e.g. 0.1:0.9.")] = None,
    max_questions: Annotated[int | None, typer.Option(min=1, help="Stop after this many analysed questions.")
                             ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Read only the first N questions.")] = None,
    nodes: Annotated[str, typer.Option(help="Where node records go ('-' = stdout), question by question.")] = "-",
    resume: Annotated[bool, typer.Option("--resume", help="Skip questions already in --nodes FILE.")] = False,
    plot: Annotated[str | None, typer.Option(help="Write PNG figures into this directory.")] = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    trust_remote_code: options.TrustRemoteCode = False,
) -> None:
    """Diagnose distillation per token: does a teacher's gradient point where the student's success rises?

    Node records go to stdout (or --nodes), the summary to -o, a table to stderr.

    [bold]Examples[/bold]

      rechannel align --data gsm8k.jsonl --context reference -o summary.json > nodes.jsonl
      rechannel align --student out/gptq-4 --teacher smollm2-135m --teacher self \\
          --context none --context reference --data gsm8k.jsonl --select-pass-rate 0.1:0.9 -o s.json
      jq 'select(.kind == "node") | .teachers["self+reference"].align.rkl' nodes.jsonl
    """
    from ..ops.align.contexts import Context, get_context, student_view
    from ..ops.align.diagnosis import AlignConfig
    from ..ops.align.verifiers import get_verifier

    if output == "-" and nodes == "-":
        raise UserError("the node records already go to stdout: write the summary to a file (-o FILE) or the "
                        "records elsewhere (--nodes FILE)")
    if budget < 1:
        raise UserError(f"--budget {budget}: at least one node per question")
    if not 0.0 < beta < 1.0:
        raise UserError(f"--beta {beta}: must be in (0, 1)")
    cfg = AlignConfig(rollouts, continuations, candidates, budget, temperature, max_new_tokens, seed, beta,
                      _pass_rate(select_pass_rate), max_batch)
    teachers, contexts_given = teacher or [SELF], context or ["reference"]
    templates = [c.removeprefix("template:") for c in [*contexts_given, prompt] if c.startswith("template:")]
    _outputs(output, nodes, plot, data, [student, *(t for t in teachers if t != SELF)], templates)
    check = get_verifier(verifier)
    view = student_view(prompt, field)
    contexts = [get_context(c, view) for c in contexts_given]
    questions = _questions(data, field, id_field, check, limit)
    _check_fields([Context("--prompt", view), *contexts], questions)
    head = run_record({"student": student, "teacher": teachers, "context": contexts_given, "verifier": verifier,
                       "data": data, "field": field, "id_field": id_field, "prompt": prompt, "limit": limit,
                       **cfg.__dict__})
    old_q, old_nodes, keep, old_head = _previous(nodes, resume, head)
    lm = options.load(student, device, dtype, trust_remote_code)
    if old_head.get("student_fingerprint") not in (None, lm.fingerprint):
        raise UserError(f"{nodes}: written for a student with fingerprint {old_head['student_fingerprint']}, but "
                        f"{student} now has {lm.fingerprint}; --resume continues only the same run")
    scorers = _scorers(lm, teachers, contexts,
                       lambda spec: options.load_teacher(spec, lm, device, dtype, trust_remote_code))
    from .align_run import QuestionWriter, run

    writer = QuestionWriter(nodes, keep if resume and keep else None, {**head, "student_fingerprint": lm.fingerprint})
    run(lm, Context("none", view), scorers, check, cfg, questions, old_q, old_nodes, writer, output, max_questions,
        plot, {"student": student, "teachers": [s.name for s in scorers], "verifier": verifier, "data": data,
               "field": field, "prompt": prompt, **cfg.__dict__})

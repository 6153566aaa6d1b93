"""`align` as a Python API: where, token by token, a teacher's distillation signal points toward success.

`align(AlignRunConfig(data="q.jsonl"))` reads the questions, loads the student and its teachers, diagnoses
question after question (ops/align/diagnosis.py) and returns the summary document (ops/align/summary.py).
Each finished question's records go to `on_question` as they are made, so a caller can keep them safe before
the next question starts; `previous` hands back what an interrupted run of the same settings already made
(--resume), and the summary covers both. Nothing here writes a file: the CLI owns the node file and -o.

Only light modules are imported at the top: `rechannel --help` imports this module's package, not torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..core.errors import UserError
from ..core.progress import Progress, silent

if TYPE_CHECKING:
    from ..core.models import LoadedModel
    from .contexts import Context
    from .diagnosis import AlignConfig, Diagnosis, Question, Scorer
    from .verifiers import Verifier

SELF = "self"  # the teacher that is the student itself
RESUME_FREE = ("max_questions", "limit", "max_batch")  # may change on --resume: they change no record

OnQuestion = Callable[[dict[str, Any], list[dict[str, Any]]], None]  # (question record, its node records)


@dataclass(frozen=True)
class AlignRunConfig:
    """Every option of `rechannel align`, with its defaults. Made, it is checked (UserError, one line) before
    any file is read; the numerics of one question are `numerics()` (ops/align/diagnosis.AlignConfig)."""

    data: str  # JSONL questions ('-' = stdin)
    output: str | None = None  # where the CLI writes the summary (-o); align() itself writes nothing
    student: str = "smollm2-135m"  # alias, .gguf or model directory
    teacher: tuple[str, ...] = (SELF,)  # models with the student's tokenizer, or 'self'
    context: tuple[str, ...] = ("reference",)  # what each teacher sees: none, reference or template:FILE
    field: str = "question"  # the record field holding the question
    prompt: str = "none"  # what the student sees: none (the question field) or template:FILE
    id_field: str = "id"  # the record field naming the question (else its index)
    verifier: str = "gsm8k"  # gsm8k, mc, exact or regex:PATTERN (reads the 'answer' field)
    rollouts: int = 8  # student rollouts per question
    continuations: int = 8  # student continuations per candidate (S_k)
    candidates: int = 4  # top tokens of the student and of each teacher in K
    budget: int = 64  # nodes per question
    temperature: float = 1.0  # of rollouts and continuations (p and q stay the models' own distributions)
    max_new_tokens: int = 256  # rollout length at most
    beta: float = 0.5  # β of JSD(β), in (0, 1): the teacher's weight in the mixture
    seed: int = 0  # of rollouts, nodes and continuations
    max_batch: int | None = None  # continuations decoded together at most (None: all of a node's)
    select_pass_rate: str | None = None  # LOW:HIGH: analyse only questions whose rollouts pass at such a rate
    max_questions: int | None = None  # stop after this many analysed questions
    limit: int | None = None  # read only the first N questions
    nodes: str = "-"  # where the CLI writes node records ('-' = stdout); names the file in --resume's errors
    resume: bool = False  # the CLI reads `nodes` back and passes it as align(previous=...)
    plot: str | None = None  # where the CLI writes its figures
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        # lists accepted, tuples kept: the config stays hashable and its run record compares by value
        object.__setattr__(self, "teacher", tuple(self.teacher))
        object.__setattr__(self, "context", tuple(self.context))
        if self.budget < 1:
            raise UserError(f"--budget {self.budget}: at least one node per question")
        if not 0.0 < self.beta < 1.0:
            raise UserError(f"--beta {self.beta}: must be in (0, 1)")
        _pass_rate(self.select_pass_rate)
        for name in ("rollouts", "continuations", "candidates", "max_new_tokens", "max_batch", "max_questions",
                     "limit"):  # the CLI's typer checks these first (min=1); a library caller meets them here
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: must be at least 0")

    def numerics(self) -> AlignConfig:
        """The per-question settings the diagnosis runs with (and records: they are the summary's config)."""
        from .diagnosis import AlignConfig

        return AlignConfig(self.rollouts, self.continuations, self.candidates, self.budget, self.temperature,
                           self.max_new_tokens, self.seed, self.beta, _pass_rate(self.select_pass_rate),
                           self.max_batch)


@dataclass(frozen=True)
class Previous:
    """What --resume read back from the node file: its first record (None: the file held none) and the
    records of its whole question blocks, in file order."""

    head: dict[str, Any] | None = None
    questions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    nodes: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class _Inputs:
    """What align reads and parses before any model loads."""

    numerics: AlignConfig
    verifier: Verifier
    view: str  # the template of what the student sees
    contexts: list[Context]  # one per --context, each around the student's view
    questions: list[Question]


def align(config: AlignRunConfig, progress: Progress = silent, on_question: OnQuestion | None = None,
          previous: Previous | Callable[[], Previous] | None = None,
          on_run: Callable[[dict[str, Any]], None] | None = None, world: Any = None) -> dict[str, Any]:
    """Diagnose every question of `config.data` not already in `previous`; return the summary document.

    world: ops.core.distributed.world() under torchrun (the CLI passes it): the questions are dealt to the
    ranks (_analyse), each on its own device; without it the call is a single process.

    previous: what an interrupted run of the same settings wrote, or a function that reads it (called once the
    inputs are checked, before any model loads: a node file that cannot be read is reported after a bad
    question file, as the CLI always did). Another run's records, or another student's, are refused.
    on_run: called once the models are loaded and checked, before the first question, with the run record
    (the settings --resume must find unchanged, and the student's fingerprint): the node file's first record.
    on_question: called with each finished question's record and node records, in order.
    progress: stages "questions" and "nodes" (the nodes of the question under way)."""
    from ..core.distributed import World, join, together

    world = join(world or World())
    inputs, head, old, lm, scorers = together(lambda: _prepare(config, previous, world), world)  # one fails: all stop
    if on_run is not None:
        on_run({**head, "student_fingerprint": lm.fingerprint})
    done = {q["question"] for q in old.questions}
    todo = [q for q in inputs.questions if q.qid not in done]
    questions, nodes = _analyse(_diagnosis(lm, inputs, scorers), todo, old, config, progress, on_question, world)
    from .summary import summarise

    names = [s.name for s in scorers]
    return summarise(questions, nodes, names, {"student": config.student, "teachers": names,
                                               "verifier": config.verifier, "data": config.data,
                                               "field": config.field, "prompt": config.prompt,
                                               **inputs.numerics.__dict__})


def _prepare(config: AlignRunConfig, previous: Previous | Callable[[], Previous] | None, world: Any) -> tuple:
    """(inputs, run record, what --resume found, the student, the scorers): read, loaded and checked."""
    from ..core.distributed import rank_device, refuse_stdin

    refuse_stdin("--data", config.data, world)
    inputs = _read_inputs(config)
    if world.size > len(inputs.questions):
        raise UserError(f"{world.size} ranks for {len(inputs.questions)} questions: start at most "
                        f"{len(inputs.questions)} processes (torchrun --nproc-per-node), or give more questions")
    config = replace(config, device=rank_device(config.device, world))  # under torchrun: this rank's GPU
    head = run_record(config)
    old = previous() if callable(previous) else previous or Previous()
    if old.head is not None:
        same_run(config.nodes, old.head, head)
    lm = _load_student(config, old.head or {})
    scorers = _scorers(lm, list(config.teacher), inputs.contexts, lambda spec: _load_teacher(spec, lm, config))
    return inputs, head, old, lm, scorers


def run_record(config: AlignRunConfig) -> dict[str, Any]:
    """The first record of a node file (less the student's fingerprint): what --resume must find unchanged."""
    from ..core.version import __version__

    settings = {"student": config.student, "teacher": list(config.teacher), "context": list(config.context),
                "verifier": config.verifier, "data": config.data, "field": config.field, "id_field": config.id_field,
                "prompt": config.prompt, "limit": config.limit, **config.numerics().__dict__}
    return {"kind": "run", "rechannel": __version__,
            "config": {k: v for k, v in settings.items() if k not in RESUME_FREE}}


def same_run(nodes: str, head: dict[str, Any], run: dict[str, Any]) -> None:
    """Refuse to continue a node file whose first record is not `run`'s settings (`nodes` names the file)."""
    if head.get("kind") != "run" or not isinstance(head.get("config"), dict):
        raise UserError(f"{nodes}:1: not a node file written by `rechannel align` (no run record first); "
                        "--resume continues only its own runs")
    was = head["config"]
    now = orjson.loads(orjson.dumps(run["config"]))  # as the file holds it: tuples read back as lists
    diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if diff:
        raise UserError(f"{nodes}: written by another run (different {', '.join(diff)}); --resume continues only "
                        "the same run: use the same options or another --nodes file")


def _pass_rate(text: str | None) -> tuple[float, float] | None:
    """LOW:HIGH -> (low, high) within [0, 1]."""
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--select-pass-rate {text!r}: write LOW:HIGH, e.g. 0.1:0.9") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise UserError(f"--select-pass-rate {text!r}: need 0 <= LOW <= HIGH <= 1")
    return lo, hi


def _read_inputs(config: AlignRunConfig) -> _Inputs:
    """Verifier, student view, contexts and questions, each checked in this order (the CLI's error order)."""
    from .contexts import Context, get_context, student_view
    from .verifiers import get_verifier

    verifier = get_verifier(config.verifier)
    view = student_view(config.prompt, config.field)
    contexts = [get_context(c, view) for c in config.context]
    questions = _questions(config, verifier)
    _check_fields([Context("--prompt", view), *contexts], questions)
    return _Inputs(config.numerics(), verifier, view, contexts, questions)


def _questions(config: AlignRunConfig, verifier: Verifier) -> list[Question]:
    """The first `limit` records of --data, each holding the question field and what the verifier reads."""
    from ..core.records import read_jsonl
    from .diagnosis import Question
    from .verifiers import check_record

    records = read_jsonl(config.data, require=(config.field,))
    records = records[:config.limit] if config.limit else records
    for r in records:
        r.field(config.field, str)
        check_record(verifier, r)
    return [Question(i, r.data, r.data.get(config.id_field, i)) for i, r in enumerate(records)]


def _check_fields(contexts: list[Context], questions: list[Question]) -> None:
    """Every field a template names is in every record: found now, not at question 900."""
    for c in contexts:
        for name in c.fields():
            missing = next((q for q in questions if name not in q.record), None)
            if missing is not None:
                raise UserError(f"record {missing.index + 1}: context {c.name} needs the field {name!r}")


def _load(spec: str, config: AlignRunConfig) -> LoadedModel:
    from ..core.models import load_model

    return load_model(spec, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code)


def _load_student(config: AlignRunConfig, old_head: dict[str, Any]) -> LoadedModel:
    """The student, refused when --resume's node file was written for other weights under the same name."""
    lm = _load(config.student, config)
    if old_head.get("student_fingerprint") not in (None, lm.fingerprint):
        raise UserError(f"{config.nodes}: written for a student with fingerprint {old_head['student_fingerprint']}, "
                        f"but {config.student} now has {lm.fingerprint}; --resume continues only the same run")
    return lm


def _load_teacher(spec: str, student: LoadedModel, config: AlignRunConfig) -> LoadedModel:
    """A teacher model, refused unless its distributions compare with the student's token by token."""
    from ..recover.api import check_teacher

    teacher = _load(spec, config)
    check_teacher(teacher, student, spec)
    return teacher


def _scorers(student: LoadedModel, teachers: list[str], contexts: list[Context],
             load: Callable[[str], LoadedModel]) -> list[Scorer]:
    """Every teacher model with every context, except the student itself with no context (q = p)."""
    from .contexts import prompt_ids
    from .diagnosis import Scorer

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


def _diagnosis(lm: LoadedModel, inputs: _Inputs, scorers: list[Scorer]) -> Diagnosis:
    """The student shown its view of each record, against every teacher scorer."""
    from .contexts import Context, prompt_ids
    from .diagnosis import Diagnosis, Scorer

    view, student_prompt = Context("none", inputs.view), prompt_ids(lm.tokenizer)
    student = Scorer("student", lm.model, lambda rec: student_prompt(view.render(rec)))
    return Diagnosis(student, lm.tokenizer, scorers, inputs.verifier, inputs.numerics, _stop_ids(lm))


def _analyse(diag: Diagnosis, todo: list[Question], old: Previous, config: AlignRunConfig, progress: Progress,
             on_question: OnQuestion | None, world: Any) -> tuple[list[dict], list[dict]]:
    """(question records, node records) of the old run and of `todo` in order, until max_questions questions
    (old ones included) passed the pass-rate filter.

    Under torchrun the questions go out in rounds: question i of `todo` to rank i mod W; each round's records
    come back to every rank in question order, so that the stop after max_questions falls on the very question
    one process stops at, and rank 0 hands out whole questions as they finish (the node file stays resumable).
    Each question is seeded by its index alone, so its records do not depend on the rank that ran it."""
    from functools import partial

    from ..core.distributed import gather

    questions, nodes = list(old.questions), list(old.nodes)
    analysed = sum(q["selected"] for q in old.questions)
    progress("questions", total=len(todo))
    progress("nodes", total=config.budget)

    def run(q: Question | None) -> tuple[dict, list[dict]] | None:
        progress("nodes", total=config.budget)
        return None if q is None else diag.run(q, on_node=lambda: progress("nodes", advance=1))

    for start in range(0, len(todo), world.size):
        if config.max_questions is not None and analysed >= config.max_questions:
            break
        batch = todo[start:start + world.size]
        mine = batch[world.rank] if world.rank < len(batch) else None
        for head, recs in gather(partial(run, mine), world)[:len(batch)]:
            if config.max_questions is not None and analysed >= config.max_questions:
                break
            if on_question is not None:
                on_question(head, recs)
            questions.append(head)
            nodes += recs
            analysed += head["selected"]
            progress("questions", advance=1)
    return questions, nodes


def _stop_ids(lm: LoadedModel) -> set[int]:
    """The tokens that end a rollout: the tokenizer's end of sequence and the model's generation config's."""
    ids = {lm.tokenizer.eos_token_id}
    extra = getattr(lm.model.generation_config, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return {i for i in ids if i is not None}

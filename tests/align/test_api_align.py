"""ops/align/api.align as a library: the records it hands out and the summary it returns are what
`rechannel align` writes for the same options, and a run continued from `previous` is the uninterrupted one."""

from __future__ import annotations

import json

import orjson
import pytest

from conftest import run_inproc

VERIFIER = "regex:([aeiou])"
SMALL = dict(rollouts=4, continuations=4, candidates=2, budget=4, max_new_tokens=8, verifier=VERIFIER, device="cpu")


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("api-align") / "q.jsonl"
    rows = [{"id": f"q{i}", "question": f"Question {i}: what is two plus two?", "answer": a} for i, a in enumerate("aeo")]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _cli_args(config) -> list[str]:
    return ["align", "--student", config.student, "--data", config.data, "-o", config.output,
            *(x for k, v in SMALL.items() for x in (f"--{k.replace('_', '-')}", str(v)))]


def _collect():
    """on_run and on_question callbacks writing into one list, as the node file holds them."""
    records: list[dict] = []
    return records, records.append, lambda head, nodes: records.extend([*nodes, head])


def test_records_and_summary_are_what_the_cli_writes(tiny_model, questions, tmp_path):
    from rechannel.ops.align.api import AlignRunConfig, align

    config = AlignRunConfig(data=str(questions), output=str(tmp_path / "s.json"), student=str(tiny_model), **SMALL)
    records, on_run, on_question = _collect()
    stages: dict[str, int] = {}

    def progress(stage, advance=0, total=None, note=None):
        stages[stage] = stages.get(stage, 0) + advance

    summary = align(config, progress, on_question, on_run=on_run)
    r = run_inproc(*_cli_args(config))
    assert r.returncode == 0, r.stderr.decode()
    # byte for byte: the CLI's stdout is the records align handed out, written as JSON Lines
    assert r.stdout == b"".join(orjson.dumps(x) + b"\n" for x in records)
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(orjson.dumps(summary))
    assert records[0]["kind"] == "run" and [x["question"] for x in records if x["kind"] == "question"] == \
        ["q0", "q1", "q2"]
    assert stages == {"questions": 3, "nodes": summary["nodes"]}


def test_previous_continues_the_same_run(tiny_model, questions):
    from rechannel.ops.align.api import AlignRunConfig, Previous, align
    from rechannel.ops.core.errors import UserError

    config = AlignRunConfig(data=str(questions), student=str(tiny_model), **SMALL)
    whole, on_run, on_question = _collect()
    full = align(config, on_question=on_question, on_run=on_run)
    part, on_run, on_question = _collect()
    align(AlignRunConfig(data=str(questions), student=str(tiny_model), max_questions=1, **SMALL),
          on_question=on_question, on_run=on_run)
    assert part == whole[:len(part)] and len(part) < len(whole)
    old = Previous(part[0], [x for x in part if x["kind"] == "question"], [x for x in part if x["kind"] == "node"])
    rest: list[dict] = []
    summary = align(config, on_question=lambda head, nodes: rest.extend([*nodes, head]), previous=lambda: old)
    assert part + rest == whole and summary == full
    other = Previous({**part[0], "config": {**part[0]["config"], "seed": 1}}, old.questions, old.nodes)
    with pytest.raises(UserError, match="written by another run \\(different seed\\)"):
        align(config, previous=other)


def test_config_is_checked_when_made(questions):
    from rechannel.ops.align.api import AlignRunConfig
    from rechannel.ops.core.errors import UserError

    with pytest.raises(UserError, match="--budget 0: at least one node"):
        AlignRunConfig(data=str(questions), budget=0)
    with pytest.raises(UserError, match="LOW <= HIGH"):
        AlignRunConfig(data=str(questions), select_pass_rate="0.9:0.1")
    with pytest.raises(UserError, match="--rollouts 0"):
        AlignRunConfig(data=str(questions), rollouts=0)
    config = AlignRunConfig(data=str(questions), teacher=["self"], select_pass_rate="0.2:0.8")
    assert config.teacher == ("self",) and config.numerics().pass_rate == (0.2, 0.8)


def test_a_run_record_read_back_from_its_file_is_the_same_run():
    """A pass-rate range is a tuple in the config and a list in the file: --resume must still accept it."""
    from rechannel.ops.align.api import AlignRunConfig, run_record, same_run
    from rechannel.ops.core.errors import UserError

    cfg = AlignRunConfig(data="q.jsonl", output="s.json", select_pass_rate="0.1:0.9")
    head = orjson.loads(orjson.dumps(run_record(cfg)))
    same_run("nodes.jsonl", head, run_record(cfg))
    other = AlignRunConfig(data="q.jsonl", output="s.json", select_pass_rate="0.2:0.9")
    with pytest.raises(UserError, match="different pass_rate"):
        same_run("nodes.jsonl", head, run_record(other))

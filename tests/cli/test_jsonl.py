"""JSONL conventions: bad lines name file:line, unknown fields pass through, outputs are atomic."""

from __future__ import annotations

import math

import orjson
import pytest

from rechannel.cli.jsonl import JsonlWriter, write_json
from rechannel.ops.core.errors import UserError
from rechannel.ops.core.records import Record, read_jsonl


def test_records_keep_every_field_and_skip_blank_lines(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"prompt": "a", "meta": {"k": [1, 2]}}\n\n{"prompt": "b", "id": 7}\n')
    recs = read_jsonl(str(p), require=("prompt",))
    assert [r.data for r in recs] == [{"prompt": "a", "meta": {"k": [1, 2]}}, {"prompt": "b", "id": 7}]
    assert recs[1].where == f"{p}:3"


@pytest.mark.parametrize("line, why", [
    (b'{"prompt": "a"', "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'"just a string"', "expected a JSON object, got str"),
    (b'{"other": 1}', "missing field 'prompt'"),
])
def test_bad_line_is_reported_with_file_and_line(tmp_path, line, why):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n' + line + b"\n")
    with pytest.raises(UserError) as e:
        read_jsonl(str(p), require=("prompt",))
    assert str(e.value).startswith(f"{p}:2: ")
    assert why in str(e.value)


def test_field_type_check_names_the_line():
    rec = Record({"prompt": 3}, "x.jsonl:4")
    with pytest.raises(UserError, match=r"x.jsonl:4: field 'prompt' should be str, got int"):
        rec.field("prompt", str)
    assert Record({"n": 3}, "x:1").field("n", int) == 3
    with pytest.raises(UserError):  # a bool is not a number here
        Record({"n": True}, "x:1").field("n", int)


def test_empty_and_missing_inputs_are_user_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    with pytest.raises(UserError, match="no records"):
        read_jsonl(str(tmp_path / "empty.jsonl"))
    assert read_jsonl(str(tmp_path / "empty.jsonl"), allow_empty=True) == []
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(str(tmp_path / "absent.jsonl"))


def test_writer_to_file_is_atomic_under_an_exception(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_bytes(b'{"old": true}\n')
    with pytest.raises(RuntimeError), JsonlWriter(str(target)) as out:
        out.write({"new": 1})
        raise RuntimeError("boom")
    assert target.read_bytes() == b'{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary left behind
    with JsonlWriter(str(target)) as out:
        out.write({"new": 1})
    assert target.read_bytes() == b'{"new":1}\n'


def test_nonfinite_numbers_become_null_with_a_warning(tmp_path, capsys):
    target = tmp_path / "out.jsonl"
    with JsonlWriter(str(target)) as out:
        out.write({"ppl": math.inf, "loss": [1.5, math.nan], "ok": 2.0})
    assert orjson.loads(target.read_bytes()) == {"ppl": None, "loss": [1.5, None], "ok": 2.0}
    assert "2 non-finite number(s)" in capsys.readouterr().err


def test_tensors_and_paths_serialise(tmp_path):
    import torch

    target = tmp_path / "doc.json"
    write_json(str(target), {"t": torch.tensor([1.0, 2.0]), "p": tmp_path, "d": torch.float16})
    doc = orjson.loads(target.read_bytes())
    assert doc == {"t": [1.0, 2.0], "p": str(tmp_path), "d": "torch.float16"}

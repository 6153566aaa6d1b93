"""Task readers on files in each published format, metrics against hand-computed values, and the bad-input paths."""

from __future__ import annotations

import json

import pytest

from rechannel.ops.core.errors import UserError
from rechannel.ops.evaluation.metrics import choice_metrics, mean_stderr, normalize_answer, qa_metrics
from rechannel.ops.evaluation.tasks import TASKS, get_tasks, user_task


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_choice_metrics_by_hand():
    # lengths 1 and 6: -2/1 = -2 < -3/6 = -0.5, so acc picks choice 0 and acc_norm choice 1
    m = choice_metrics([-2.0, -3.0], ["a", "bbbbbb"], gold=1)
    assert (m["pred"], m["pred_norm"], m["acc"], m["acc_norm"]) == (0, 1, 0.0, 1.0)
    assert choice_metrics([-1.0, -1.0, -5.0], ["x", "x", "x"], gold=0)["pred"] == 0  # ties go to the first


def test_squad_normalisation_exact_match_and_f1_by_hand():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert qa_metrics("the Beatles.", ["Rolling Stones", "Beatles"])["exact_match"] == 1.0
    # prediction [yuri, gagarin, was] vs gold [yuri, gagarin]: P = 2/3, R = 1, F1 = 0.8
    m = qa_metrics("Yuri Gagarin was", ["Neil Armstrong", "Yuri Gagarin"])
    assert m["exact_match"] == 0.0 and m["f1"] == pytest.approx(0.8)  # float64 2·(2/3)/(5/3): a few ulps
    assert qa_metrics("", ["x"]) == {"exact_match": 0.0, "f1": 0.0}


def test_stderr_is_sample_sd_over_sqrt_n():
    # mean 0.75, sample variance (3 * 0.0625 + 0.5625) / 3 = 0.25, stderr sqrt(0.25 / 4) = 0.25
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)  # dyadic values: every float64 step is exact
    assert mean_stderr([1]) is None


def test_readers_build_the_harness_templates(tmp_path):
    d = tmp_path
    _write(d / "tasks/arc_easy/test.jsonl", _jsonl([{"query": "Question: Why?", "choices": ["a b", "c"], "gold": 1,
                                                      "id": "q1"}]))
    _write(d / "tasks/piqa/valid.jsonl", _jsonl([{"goal": "Open a jar", "sol1": "twist", "sol2": "bite"}]))
    _write(d / "tasks/piqa/valid-labels.lst", "0\n")
    _write(d / "tasks/openbookqa/test.tsv", "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
                                           "7-1\tFog is near:\t(A) a marsh (B) a desert (C) ice (D) sun\tx\tA\n")
    _write(d / "tasks/winogrande/dev.jsonl", _jsonl([{"context_options": ["Ann helped Bo so Ann", "Ann helped Bo so Bo"],
                                                       "continuation": "was thanked.", "gold": 1}]))
    _write(d / "tasks/commonsenseqa/dev.jsonl", _jsonl([{"id": "c1", "answerKey": "B", "question": {
        "stem": " Where? ", "choices": [{"label": "A", "text": "here"}, {"label": "B", "text": "there"}]}}]))
    _write(d / "tasks/lambada/test.jsonl", _jsonl([{"context": "He said", "continuation": "hello"}]))
    _write(d / "tasks/triviaqa/test1000.jsonl", _jsonl([{"id": "t1", "question": "Who?", "answers": ["Me", "I"]}]))
    arc = TASKS["arc_easy"].load(d)[0]
    assert arc.contexts == ("Question: Why?\nAnswer:",) * 2 and arc.continuations == (" a b", " c")
    assert (arc.gold, arc.choices, arc.id) == (1, ("a b", "c"), "q1")
    piqa = TASKS["piqa"].load(d)[0]
    assert piqa.contexts[0] == "Question: Open a jar\nAnswer:" and piqa.continuations == (" twist", " bite")
    obqa = TASKS["openbookqa"].load(d)[0]
    assert obqa.contexts[0] == "Fog is near:" and obqa.choices == ("a marsh", "a desert", "ice", "sun")
    assert obqa.gold == 0
    wino = TASKS["winogrande"].load(d)[0]
    assert wino.contexts == ("Ann helped Bo so Ann", "Ann helped Bo so Bo")
    assert wino.continuations == (" was thanked.",) * 2 and wino.gold == 1
    csqa = TASKS["commonsenseqa"].load(d)[0]
    assert csqa.contexts[0] == "Question: Where?\nA. here\nB. there\nAnswer:"
    assert csqa.continuations == (" A", " B") and csqa.gold == 1
    lam = TASKS["lambada"].load(d)[0]
    assert lam.contexts == ("He said",) and lam.continuations == (" hello",)
    qa = TASKS["triviaqa"].load(d)[0]
    assert qa.prompt == "Question: Who?\nAnswer:" and qa.answers == ("Me", "I")


def test_bad_task_files_name_file_and_line(tmp_path):
    bad = _write(tmp_path / "mc.jsonl", _jsonl([{"context": "c", "choices": ["a", "b"], "gold": 0},
                                                {"context": "c", "choices": ["a", "b"], "gold": 2}]))
    with pytest.raises(UserError, match=r"mc\.jsonl:2: gold 2 is not a choice index \(0\.\.1\)"):
        user_task(str(bad), "mc").load(tmp_path)
    missing = _write(tmp_path / "qa.jsonl", _jsonl([{"question": "q"}]))
    with pytest.raises(UserError, match=r"qa\.jsonl:1: missing field 'answers'"):
        user_task(str(missing), "qa").load(tmp_path)
    empty = _write(tmp_path / "empty.jsonl", "\n")
    with pytest.raises(UserError, match="no records"):
        user_task(str(empty), "mc").load(tmp_path)
    with pytest.raises(UserError, match="did you mean 'qa'"):
        user_task(str(bad), "qq")
    _write(tmp_path / "tasks/piqa/valid.jsonl", _jsonl([{"goal": "g", "sol1": "a", "sol2": "b"}] * 2))
    _write(tmp_path / "tasks/piqa/valid-labels.lst", "0\n")
    with pytest.raises(UserError, match="1 labels for 2 rows"):
        TASKS["piqa"].load(tmp_path)
    with pytest.raises(UserError, match="did you mean 'winogrande'"):
        get_tasks("winogrand")

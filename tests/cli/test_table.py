"""table --recovery on hand-made results files: average, recovered share, extra parameters, latency."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


def _doc(path, acc_a, em_b, fingerprint, compression=None, adapter=None, prompts=None, extra=0, ppl=30.0):
    results = {"arc_easy": {"acc,none": acc_a, "samples": 10, "seconds": 2.0},
               "triviaqa": {"exact_match,none": em_b, "samples": 30, "seconds": 4.0},
               "wikitext2": {"ppl,none": ppl, "windows": 4}}
    config = {"fingerprint": fingerprint, "compression": compression, "extra_parameters": extra,
              **({"adapter": adapter} if adapter else {}), **({"prompts": prompts} if prompts else {})}
    path.write_text(json.dumps({"results": results, "config": config}))
    return str(path)


def test_recovery_columns_by_hand(tmp_path):
    wanda = {"method": "wanda", "sparsity": 0.5, "pattern": "unstructured"}
    files = [_doc(tmp_path / "d.json", 0.6, 0.4, "D", ppl=30.0),  # avg 0.5
             _doc(tmp_path / "w.json", 0.4, 0.2, "W", wanda, ppl=70.0),  # avg 0.3: lost 0.2; ppl +40
             _doc(tmp_path / "i.json", 0.5, 0.3, "W", wanda, prompts={"route": "attention", "prompts": 4}, extra=1000,
                  ppl=50.0),
             _doc(tmp_path / "l.json", 0.45, 0.25, "W", wanda, adapter={"rank": 8}, extra=21000, ppl=40.0)]
    r = run_cli("table", *files, "--recovery", "--json")
    assert r.returncode == 0, r.stderr.decode()
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["run"] for row in rows] == ["dense", "wanda 50%", "wanda 50% + IDP (4 prompts)", "wanda 50% + LoRA r=8"]
    # float64 of decimal inputs, one cancelling difference at most: ≲ 10 ulps, far inside approx's 1e-6
    assert [row["avg"] for row in rows] == pytest.approx([0.5, 0.3, 0.4, 0.35])
    assert [row["recovered"] for row in rows] == pytest.approx([None, None, 0.5, 0.25])
    assert [row["ppl recovered"] for row in rows] == pytest.approx([None, None, 0.5, 0.75])
    assert [row["extra params"] for row in rows] == [0, 0, 1000, 21000]
    assert rows[0]["ms/example"] == pytest.approx(1000 * 6.0 / 40)  # 150 exactly: integers in float64
    md = run_cli("table", *files, "--recovery", "--markdown").stdout.decode()
    assert "wanda 50%: LoRA / IDP extra parameters = 21.0x" in md


def test_recovery_is_undefined_when_nothing_was_lost():
    from rechannel.ops.evaluation.metrics import recovered_share

    assert recovered_share(0.5, 0.3, 0.4) == pytest.approx(0.5)  # (0.4 − 0.3) / 0.2 in float64: a few ulps
    assert recovered_share(0.316, 0.316 + 1e-17, 0.33) is None  # equal up to rounding: nothing lost
    assert recovered_share(0.3, 0.5, 0.4) is None  # compression scored better: no loss to recover


def test_runs_that_describe_alike_keep_their_own_column(tmp_path):
    """Two banks of the same model and size: the transposed table shows both, told apart by file name."""
    wanda = {"method": "wanda", "sparsity": 0.5, "pattern": "unstructured"}
    bank = {"route": "attention", "prompts": 4}
    files = [_doc(tmp_path / "w.json", 0.4, 0.2, "W", wanda),
             _doc(tmp_path / "router.json", 0.5, 0.3, "W", wanda, prompts=bank, ppl=50.0),
             _doc(tmp_path / "balanced.json", 0.45, 0.3, "W", wanda, prompts=bank, ppl=60.0)]
    md = run_cli("table", *files, "--transpose", "--markdown").stdout.decode().splitlines()
    assert md[0] == ("| task metric | wanda 50% | wanda 50% + IDP (4 prompts) [router.json] "
                     "| wanda 50% + IDP (4 prompts) [balanced.json] |")
    assert next(line for line in md if line.startswith("| wikitext2 ppl")) == "| wikitext2 ppl | 30.000 | 50.000 | 60.000 |"

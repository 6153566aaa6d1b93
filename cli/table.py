"""`rechannel table`: put several `eval` results side by side (rich table, markdown, or JSONL)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..ops.core.errors import UserError
from .options import Json


def _load(path: str) -> dict[str, Any]:
    import orjson

    try:
        doc = orjson.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except orjson.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected an eval results file") from None
    if not isinstance(doc, dict) or "results" not in doc:
        raise UserError(f"{path}: not an eval results file (no 'results')")
    results = doc["results"]
    if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
        raise UserError(f"{path}: not an eval results file ('results' must map each task to its metrics)")
    if not isinstance(doc.get("config") or {}, dict):
        raise UserError(f"{path}: not an eval results file ('config' must be an object)")
    return doc


def _label(path: str, doc: dict[str, Any]) -> str:
    """What was evaluated: the compression (or dense), plus any adapter or prompt bank in use."""
    config = doc.get("config") or {}
    c = config.get("compression")
    label = "dense" if not c else _compression_label(c)
    if config.get("adapter"):
        label += f" + LoRA r={config['adapter'].get('rank')}"
    bank = config.get("prompts") or {}
    route, m = bank.get("route", "none"), bank.get("prompts")
    if route == "attention":
        label += f" + IDP ({m} prompts)"
    elif route in ("entropy", "oracle"):
        label += f" + {m} prompts by {route}"
    elif route == "random":
        label += f" + {m} prompts at random"
    elif route != "none":
        label += " + 1 prompt" if m == 1 else f" + prompt {route.removeprefix('fixed:')} of {m}"
    if config.get("loader", "rechannel") != "rechannel":
        label += f" (loaded by {config['loader']})"
    return label


def _compression_label(c: dict[str, Any]) -> str:
    """'wanda 50%', 'sparsegpt 2:4', 'gptq 4-bit g128', 'rtn 3-bit row', 'sparsegpt 50% + 4-bit g128'."""
    q = c.get("quantization")
    parts = []
    if c.get("method") not in ("rtn", "gptq"):
        amount = c.get("pattern") if c.get("pattern") != "unstructured" else format(c.get("sparsity"), ".0%")
        parts.append(f"{c.get('method')} {amount}")
    if q:
        group = "row" if q.get("group_size") == -1 else f"g{q.get('group_size')}"
        extra = " act-order" if q.get("act_order") else ""
        name = f"{c.get('method')} " if c.get("method") in ("rtn", "gptq") else ""
        parts.append(f"{name}{q.get('bits')}-bit {group}{extra}")
    return " + ".join(parts)


def _rows(paths: list[str], metrics: set[str] | None) -> tuple[list[str], list[dict[str, Any]]]:
    docs = [(p, _load(p)) for p in paths]
    columns = []  # in the order the tasks and metrics first appear
    for _, d in docs:
        for task, m in d["results"].items():
            for metric in m:
                name = metric.split(",")[0]
                if (metric.endswith(",none") and "stderr" not in metric and name != "nll"
                        and (metrics is None or name in metrics) and f"{task} {name}" not in columns):
                    columns.append(f"{task} {name}")
    if (metrics is None or "size" in metrics) and any("model_bytes" in (d.get("config") or {}) for _, d in docs):
        columns.insert(0, "size MB")
    rows = []
    for p, d in docs:
        row = {"run": _label(p, d), "file": p}
        if "model_bytes" in (d.get("config") or {}):
            row["size MB"] = round(d["config"]["model_bytes"] / 1e6, 1)
        for task, m in d["results"].items():
            for metric, v in m.items():
                if f"{task} {metric.split(',')[0]}" in columns:
                    row[f"{task} {metric.split(',')[0]}"] = v
        rows.append(row)
    _disambiguate(rows)
    return columns, rows


def _disambiguate(rows: list[dict[str, Any]]) -> None:
    """Runs that describe alike (two banks of the same model and size) get their file name in brackets:
    a transposed table keys its columns by run, and the second would silently replace the first."""
    from collections import Counter
    from pathlib import Path

    counts = Counter(r["run"] for r in rows)
    for r in rows:
        if counts[r["run"]] > 1:
            r["run"] += f" [{Path(r['file']).name}]"


RECOVERY_COLUMNS = ["avg", "recovered", "ppl recovered", "extra params", "ms/example"]


def _is_plain(doc: dict[str, Any]) -> bool:
    """No adapter and no prompt in front: the model as it is."""
    config = doc.get("config") or {}
    return not config.get("adapter") and (config.get("prompts") or {}).get("route", "none") == "none"


def _recovery(rows: list[dict[str, Any]], docs: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """Add the average score, the share of the compression loss recovered (against the plain run of the same
    model and the plain dense run), extra parameters and latency to each row; notes for under the table.
    With every file's per-example scores, averages and shares get paired-bootstrap intervals (stats.py)."""
    from ..ops.evaluation.metrics import ms_per_example

    fps = [(d.get("config") or {}).get("fingerprint") for d in docs]
    dense = next((i for i, d in enumerate(docs) if _is_plain(d) and not d["config"].get("compression")), None)
    for row, d in zip(rows, docs, strict=True):
        row["extra params"] = d.get("config", {}).get("extra_parameters", 0)
        row["ms/example"] = ms_per_example(d["results"])
    if dense is not None and all(d.get("per_example") for d in docs):
        from .table_stats import recovery_with_intervals

        notes = recovery_with_intervals(rows, docs, fps, dense, columns)
    else:
        notes = _recovery_plain(rows, docs, fps, dense)
    _ppl_recovered(rows, docs, fps, dense)
    return notes + _parameter_notes(rows, docs, fps)


def _ppl_recovered(rows: list[dict[str, Any]], docs: list[dict[str, Any]], fps: list[Any], dense: int | None) -> None:
    """The recovered share of WikiText-2 perplexity, where all three runs measured it."""
    from ..ops.evaluation.metrics import recovered_share

    ppl = [-((d["results"].get("wikitext2") or {}).get("ppl,none") or float("nan")) for d in docs]  # higher is better
    for i, (row, d) in enumerate(zip(rows, docs, strict=True)):
        base = next((j for j, e in enumerate(docs) if fps[j] == fps[i] and _is_plain(e)), None)
        row["ppl recovered"] = None
        if dense is not None and base is not None and not _is_plain(d) and not math.isnan(ppl[i] + ppl[base] + ppl[dense]):
            row["ppl recovered"] = recovered_share(ppl[dense], ppl[base], ppl[i])


def _recovery_plain(rows: list[dict[str, Any]], docs: list[dict[str, Any]], fps: list[Any],
                    dense: int | None) -> list[str]:
    """Averages and shares from the task means alone (files without per-example scores): a share only where
    dense and compressed differ by more than 1.96 standard errors of their difference."""
    from ..ops.evaluation.metrics import average_score, average_stderr, recovered_share

    avg = [average_score(d["results"]) for d in docs]
    se = [average_stderr(d["results"]) for d in docs]
    noisy = set()
    for i, (row, d) in enumerate(zip(rows, docs, strict=True)):
        base = next((j for j, e in enumerate(docs) if fps[j] == fps[i] and _is_plain(e)), None)
        row["avg"] = avg[i]
        row["recovered"] = None
        if dense is not None and base is not None and not _is_plain(d) and None not in (avg[dense], avg[base], avg[i]):
            gap_se = math.hypot(se[dense] or 0.0, se[base] or 0.0)
            if avg[dense] - avg[base] > 1.96 * gap_se:
                row["recovered"] = recovered_share(avg[dense], avg[base], avg[i])
            else:
                noisy.add(rows[base]["run"])
    return [f"{run}: no recovered share: its average is within 1.96 standard errors of the dense model's"
            for run in noisy]


def _parameter_notes(rows: list[dict[str, Any]], docs: list[dict[str, Any]], fps: list[Any]) -> list[str]:
    notes = []
    for fp in dict.fromkeys(fps):
        mine = [(r, d) for r, d in zip(rows, docs, strict=True) if d["config"].get("fingerprint") == fp]
        lora = [r["extra params"] for r, d in mine if d["config"].get("adapter")]
        idp = [r["extra params"] for r, d in mine if (d["config"].get("prompts") or {}).get("route") in ("attention", "entropy")]
        if lora and idp and idp[0]:
            label = next((r["run"] for r, d in mine if _is_plain(d)), mine[0][0]["run"])
            notes.append(f"{label}: LoRA / IDP extra parameters = {lora[0] / idp[0]:.1f}x")
    return notes


def _check_metrics(wanted: set[str], columns: list[str]) -> None:
    """Every metric asked for must appear in some file (`columns`: all of theirs): a typo must not print an
    empty table."""
    found = {"size" if c == "size MB" else c.split(" ")[-1] for c in columns}
    missing = sorted(wanted - found)
    if missing:
        from ..ops.core.errors import did_you_mean

        raise UserError(f"--metrics: no file has the metric {missing[0]!r}{did_you_mean(missing[0], found)}; "
                        f"the files have: {', '.join(sorted(found))}")


def _plot(path: str, results: list[str], rows: list[dict[str, Any]]) -> None:
    from .plots import attention_figure

    curves = []
    for p, row in zip(results, rows, strict=True):
        profile = _load(p).get("attention_profile")
        if profile:
            curves.append((row["run"], profile["prefix"], profile["mass"]))
    if not curves:
        raise UserError("--plot-attention: none of the files has an attention profile (eval --attention-profile N)")
    attention_figure(path, curves)


Results = Annotated[list[str], typer.Argument(help="eval results files (-o outputs).")]
Markdown = Annotated[bool, typer.Option("--markdown", help="A markdown table on stdout.")]
Metrics = Annotated[str | None, typer.Option(help="Only these metrics, comma-separated (e.g. acc,ppl).")]
Transpose = Annotated[bool, typer.Option("--transpose", help="One row per task metric, one column per file "
                                                             "(reads better for many tasks).")]
Recovery = Annotated[bool, typer.Option("--recovery", help="Add the average score (acc; exact match for QA), the "
                                        "share of the compression loss recovered, extra parameters and ms per example.")]
PlotAttention = Annotated[str | None, typer.Option(help="Also write a PNG of the files' per-layer attention "
                                                        "profiles (eval --attention-profile N).")]


def table_command(results: Results, json: Json = False, markdown: Markdown = False, metrics: Metrics = None,
                  transpose: Transpose = False, recovery: Recovery = False, plot_attention: PlotAttention = None,
                  ) -> None:
    """Compare eval results side by side: one row per file, one column per task metric.

    [bold]Examples[/bold]

      rechannel table dense.json out/*.json
      rechannel table dense.json wanda50.json --markdown >> RESULTS.md
      rechannel table *.json --json | jq -c .
      rechannel table dense.json wanda50.json --metrics acc,exact_match
      rechannel table dense.json wanda50.json wanda50-idp.json wanda50-lora.json --recovery

    With --recovery, "recovered" is (avg - avg of the same model without prompts or adapter) / (avg dense - that), so 1 means back to the dense model; "ppl recovered" is the same for WikiText-2 perplexity.
    """
    wanted = _check_options(results, json, markdown, metrics, plot_attention)
    columns, rows = _rows(results, wanted)
    if plot_attention:
        _plot(plot_attention, results, rows)
    notes = []
    if recovery:
        columns += RECOVERY_COLUMNS
        notes = _recovery(rows, [_load(p) for p in results], columns)
    if json:
        from .jsonl import STDIO, JsonlWriter

        with JsonlWriter(STDIO) as out:
            out.write_all(rows)
        return
    rows = [{k: (f"{v:.1f}" if k in ("size MB", "ms/example") and isinstance(v, float) else v) for k, v in r.items()}
            for r in rows]
    first = "run"
    if transpose:  # rows become the task metrics, columns the runs
        runs = [r["run"] for r in rows]
        rows = [{"run": c, **{r["run"]: r.get(c) for r in rows}} for c in columns]
        columns, first = runs, "task metric"
    (_print_markdown if markdown else _print_rich)(first, columns, rows, notes, transpose)


def _check_options(results: list[str], json: bool, markdown: bool, metrics: str | None,
                   plot_attention: str | None) -> set[str] | None:
    """The metrics asked for (None: all), after every check that needs no table."""
    if json and markdown:
        raise UserError("--json and --markdown: choose one output format")
    if plot_attention:
        from ..ops.core.outputs import Input, Output, check_outputs

        check_outputs([Output("--plot-attention", plot_attention)], [Input("RESULTS", p) for p in results])
    wanted = {m.strip() for m in metrics.split(",") if m.strip()} if metrics is not None else None
    if wanted is not None and not wanted:
        raise UserError("--metrics is empty: name at least one metric, e.g. acc,ppl")
    if wanted is not None:
        _check_metrics(wanted, _rows(results, None)[0])
    return wanted


def _cell(v: Any) -> str:
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"  # an interval
    return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))


def _print_markdown(first: str, columns: list[str], rows: list[dict[str, Any]], notes: list[str],
                    transpose: bool) -> None:
    print(f"| {first} | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for r in rows:
        print(f"| {r['run']} | " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    for note in notes:
        print(f"\n{note}")


def _print_rich(first: str, columns: list[str], rows: list[dict[str, Any]], notes: list[str],
                transpose: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table()
    t.add_column(first)
    for c in columns:
        t.add_column(c, justify="right")
    if not transpose:
        t.add_column("file", style="dim")
    for r in rows:
        t.add_row(r["run"], *(_cell(r.get(c)) for c in columns), *([] if transpose else [r["file"]]))
    Console().print(t)
    for note in notes:
        print(note)

"""rechannel eval against lm-evaluation-harness: the same model, local data, templates and limit, one run.

Writes harness task definitions for the local files (the same templates as rechannel's registry), runs
`lm_eval` (hf backend, from the Python given by --harness-python) and `rechannel eval` one after the
other on the same machine, and reports each task's acc / acc_norm from both, their difference in points,
and examples per second, wall clock including model load for both. Appends a dated section to --out.

    python tests/bench/eval_vs_harness.py --harness-python .venv-harness/bin/python --limit 500
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("arc_easy", "boolq", "piqa", "winogrande")

_MC = """task: rc_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
{extra}doc_to_text: "{text}"
doc_to_target: "{target}"
doc_to_choice: "{choice}"
target_delimiter: " "
num_fewshot: 0
metric_list:
{metrics}
metadata:
  version: 1.0
"""

_UTILS = '''
def piqa_docs(dataset):
    labels = [int(x) for x in open({labels!r}).read().split()]
    return dataset.map(lambda doc, i: {{**doc, "label": labels[i]}}, with_indices=True)


def wino_text(doc):  # partial scoring: the "text" is the gold index, the choices are the filled-in contexts
    return doc["gold"]


def wino_target(doc):
    return doc["continuation"]


def wino_choices(doc):
    return doc["context_options"]
'''


def _metrics(names: tuple[str, ...]) -> str:
    return "".join(f"  - metric: {n}\n    aggregation: mean\n    higher_is_better: true\n" for n in names)


def write_harness_tasks(folder: Path, data: Path) -> None:
    """The harness's view of the same files and templates rechannel's registry uses."""
    t = data / "tasks"
    specs = {
        "arc_easy": (t / "arc_easy/test.jsonl", "", "{{query}}\\nAnswer:", "{{gold}}", "{{choices}}", ("acc", "acc_norm")),
        "boolq": (t / "boolq/val.jsonl", "", "{{query}}\\nAnswer:", "{{gold}}", "{{choices}}", ("acc", "acc_norm")),
        "piqa": (t / "piqa/valid.jsonl", "process_docs: !function utils.piqa_docs\n", "Question: {{goal}}\\nAnswer:",
                 "{{label}}", "{{[sol1, sol2]}}", ("acc", "acc_norm")),
    }
    for name, (path, extra, text, target, choice, metrics) in specs.items():
        (folder / f"rc_{name}.yaml").write_text(_MC.format(name=name, path=path, extra=extra, text=text, target=target,
                                                            choice=choice, metrics=_metrics(metrics)))
    wino = _MC.format(name="winogrande", path=t / "winogrande/dev.jsonl", extra="", text="X", target="X", choice="X",
                      metrics=_metrics(("acc",)))
    wino = (wino.replace('doc_to_text: "X"', "doc_to_text: !function utils.wino_text")
                .replace('doc_to_target: "X"', "doc_to_target: !function utils.wino_target")
                .replace('doc_to_choice: "X"', "doc_to_choice: !function utils.wino_choices"))
    (folder / "rc_winogrande.yaml").write_text(wino)
    (folder / "utils.py").write_text(_UTILS.format(labels=str(t / "piqa/valid-labels.lst")))


def run_harness(python: str, model_dir: str, limit: int, batch_size: str, folder: Path, out: Path) -> tuple[dict, float]:
    cmd = [python, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--device", "cpu", "--tasks", ",".join(f"rc_{t}" for t in TASKS), "--include_path", str(folder),
           "--limit", str(limit), "--batch_size", batch_size, "--output_path", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    seconds = time.perf_counter() - t0
    results = json.loads(sorted(out.rglob("results*.json"))[-1].read_text())["results"]
    return {k.removeprefix("rc_"): v for k, v in results.items()}, seconds


def run_rechannel(model_dir: str, data: Path, limit: int, batch_size: str, out: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "rechannel.cli.main", "eval", "--model", model_dir, "--tasks", ",".join(TASKS),
           "--data-dir", str(data), "--limit", str(limit), "--batch-size", batch_size, "--device", "cpu",
           "--dtype", "float32", "-o", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["results"], time.perf_counter() - t0


def report(h: dict, r: dict, h_sec: float, r_sec: float, args: argparse.Namespace) -> str:
    n = args.limit * len(TASKS)
    lines = [f"\n## rechannel eval vs lm-evaluation-harness ({time.strftime('%Y-%m-%d')})\n",
             f"Machine: {platform.processor() or platform.machine()}, {args.threads}; model {args.model_dir}, float32, "
             f"first {args.limit} examples of each task; harness batch size {args.harness_batch}, rechannel "
             f"batch size {args.batch_size}. Wall clock includes loading the model in both.\n",
             "| task | metric | lm-eval | rechannel | difference (points) |", "|---|---|---:|---:|---:|"]
    for task in TASKS:
        for metric in ("acc", "acc_norm"):
            key = f"{metric},none"
            if key in h.get(task, {}) and key in r.get(task, {}):
                diff = 100 * (r[task][key] - h[task][key])
                lines.append(f"| {task} | {metric} | {h[task][key]:.4f} | {r[task][key]:.4f} | {diff:+.2f} |")
    lines += ["", "| tool | seconds | examples/s |", "|---|---:|---:|",
              f"| lm-eval | {h_sec:.1f} | {n / h_sec:.2f} |", f"| rechannel | {r_sec:.1f} | {n / r_sec:.2f} |",
              f"\nrechannel is {h_sec / r_sec:.2f}x the harness's examples/s.\n"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness-python", required=True, help="a Python with lm_eval installed")
    p.add_argument("--model-dir", default=str(Path.home() / ".cache/rechannel/models/smollm2-135m"))
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--harness-batch", default="1", help="lm_eval --batch_size (its default is 1)")
    p.add_argument("--batch-size", default="auto", help="rechannel eval --batch-size")
    p.add_argument("--out", default="bench-latest.md")
    args = p.parse_args()
    import os

    args.threads = f"{os.cpu_count()} cores"
    data = Path(args.data).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tasks"
        folder.mkdir()
        write_harness_tasks(folder, data)
        h, h_sec = run_harness(args.harness_python, args.model_dir, args.limit, args.harness_batch, folder,
                               Path(tmp) / "harness")
        r, r_sec = run_rechannel(args.model_dir, data, args.limit, args.batch_size, Path(tmp) / "rechannel.json")
    text = report(h, r, h_sec, r_sec, args)
    print(text)
    with open(args.out, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()

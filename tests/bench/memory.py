"""`make bench-memory`: `compress --stream` against the in-memory path on a model several times its working set.

Writes a random Llama (float32, hidden 2048, MLP 5632, `--layers` blocks, 32k vocabulary, untied head) in
2 GB safetensors shards, then runs `rechannel compress` as a separate process for each method (wanda 50%,
dense output; gptq 4-bit g128, compressed-tensors) and each path (in memory, --stream). Each process's
anonymous resident memory (RssAnon in /proc/PID/status: the heap, not the page cache the weight files are
read through) is sampled every `--every` seconds; the peak is reported against the model's size on disk,
with the wall time, and the two paths' output directories are compared byte for byte. Writes a markdown
section to --out (default: stdout); exits 1 when the outputs differ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_model(path: Path, layers: int) -> int:
    """Save the random model (and the test suite's small tokenizer: the windows only need token ids)."""
    if (path / "config.json").is_file():
        return _size(path)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE.parent))
    from conftest import make_tokenizer

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="2GB")
    make_tokenizer().save_pretrained(tmp)
    del model
    os.replace(tmp, path)
    return _size(path)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _rss_anon(pid: int) -> int:
    """RssAnon of a process in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run(args: list[str], every: float) -> tuple[float, int, dict]:
    """(seconds, peak RssAnon, the report on stdout) of one rechannel process."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rechannel.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _rss_anon(proc.pid))
            time.sleep(every)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out = proc.stdout.read()
    proc.wait()
    watcher.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rechannel {' '.join(args)} failed with exit status {proc.returncode}")
    return seconds, peak[0], json.loads(out)


def same_directory(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(_same_file(a / n, b / n) for n in names)


def _same_file(x: Path, y: Path, chunk: int = 1 << 24) -> bool:
    if x.stat().st_size != y.stat().st_size:
        return False
    with x.open("rb") as f, y.open("rb") as g:
        while True:
            p, q = f.read(chunk), g.read(chunk)
            if p != q:
                return False
            if not p:
                return True


METHODS = {"wanda 50%": ["--method", "wanda", "--sparsity", "0.5"],
           "gptq 4-bit g128": ["--method", "gptq", "--bits", "4", "--group-size", "128"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="out/bench-memory", help="where the model and the outputs are written")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--every", type=float, default=0.02, help="seconds between RssAnon samples")
    p.add_argument("--out", default="-")
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    size = make_model(model, args.layers)
    shards = len(list(model.glob("*.safetensors")))
    calib = ["--calib", f"{args.data}/calibration/c4_en_train00000_first1000.jsonl", "--docs", "0:500",
             "--samples", str(args.samples), "--seqlen", str(args.seqlen)]
    rows, identical = [], True
    for label, flags in METHODS.items():
        outs = {}
        for stream in (False, True):
            out = work / f"{label.split()[0]}-{'stream' if stream else 'memory'}"
            subprocess.run(["rm", "-rf", str(out), f"{out}.partial"], check=True)
            seconds, peak, _ = run(["compress", "--model", str(model), "--device", "cpu", *flags, *calib, "-o", str(out),
                                    *(["--stream"] if stream else [])], args.every)
            outs[stream] = out
            rows.append((label, "--stream" if stream else "in memory", peak, seconds))
            print(f"{label} {'stream' if stream else 'memory'}: peak RssAnon {peak / 2**30:.2f} GiB, {seconds:.0f} s",
                  file=sys.stderr)
        same = same_directory(outs[False], outs[True])
        identical &= same
        rows.append((label, "outputs byte-identical" if same else "OUTPUTS DIFFER", None, None))
    _report(args, size, shards, rows)
    return 0 if identical else 1


def _report(args: argparse.Namespace, size: int, shards: int, rows: list) -> None:
    lines = [f"### compress in memory and --stream: peak anonymous memory ({datetime.date.today()}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "",
             f"Random Llama, float32, {args.layers} blocks (hidden 2048, MLP 5632, vocabulary 32000, untied): "
             f"{size / 2**30:.2f} GiB in {shards} shards. Calibration: {args.samples} C4 windows x {args.seqlen} "
             f"tokens. RssAnon sampled every {args.every} s.", "",
             "| method | path | peak RssAnon | of the model | seconds |", "|---|---|---:|---:|---:|"]
    for label, path, peak, seconds in rows:
        if peak is None:
            lines.append(f"| {label} | {path} | | | |")
        else:
            lines.append(f"| {label} | {path} | {peak / 2**30:.2f} GiB | {peak / size:.1%} | {seconds:.0f} |")
    text = "\n".join(lines) + "\n\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text)
        sys.stdout.write(text)


if __name__ == "__main__":
    sys.exit(main())

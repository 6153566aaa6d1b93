"""Every input a user can get wrong gets one line `error: ...` naming the file or option, exit 1, and no file
written or changed; output paths that would destroy an input are refused before any work; `-o` onto devices,
pipes and links does what a shell user expects."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch

from conftest import run_cli, run_inproc


def _digest(path: Path) -> str:
    """A hash of a file, or of a directory's every file (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture()
def model_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture()
def docs(tmp_path, docs_file) -> Path:
    return Path(shutil.copy(docs_file, tmp_path / "docs.jsonl"))


def _bank(path: Path, model: Path, prompts: torch.Tensor) -> Path:
    from rechannel.ops.core.artifacts import Provenance, save_artifact
    from rechannel.ops.core.fingerprint import model_fingerprint

    save_artifact(path, {"prompts": prompts}, Provenance("prompt-bank", str(model), model_fingerprint(model)))
    return path


# --- output equal to an input is refused, for every command that reads and writes files -------------------

def _overlap_cases(tmp: Path, model: Path, docs: Path) -> list[tuple[str, list[str], Path]]:
    bank = _bank(tmp / "bank.safetensors", model, torch.randn(2, 3, 64))
    results = tmp / "results.json"
    results.write_text(json.dumps({"results": {"arc_easy": {"acc,none": 0.5}}}))
    precious = tmp / "precious.jsonl"
    precious.write_text('{"keep": 1}\n')
    link = tmp / "docs-link.jsonl"
    link.symlink_to(docs)
    hard = tmp / "docs-hard.jsonl"
    os.link(docs, hard)
    m = ["--model", str(model)]
    return [
        ("calibrate-same", ["calibrate", *m, "--data", str(docs), "-o", str(docs)], docs),
        ("calibrate-symlink", ["calibrate", *m, "--data", str(docs), "-o", str(link)], docs),
        ("calibrate-hardlink", ["calibrate", *m, "--data", str(docs), "-o", str(hard)], docs),
        ("compress-model", ["compress", *m, "--method", "magnitude", "-o", str(model)], model),
        ("compress-inside-model", ["compress", *m, "--method", "magnitude", "-o", str(model / "sub")], model),
        ("compress-parent-of-model", ["compress", *m, "--method", "magnitude", "-o", str(tmp)], model),
        ("compress-calib", ["compress", *m, "--method", "wanda", "--calib", str(docs), "-o", str(docs)], docs),
        ("compress-file", ["compress", *m, "--method", "magnitude", "-o", str(precious)], precious),
        ("generate", ["generate", *m, "-i", str(docs), "--field", "text", "-o", str(docs)], docs),
        ("route-input", ["route", *m, "-p", str(bank), "-i", str(docs), "-o", str(docs)], docs),
        ("route-bank", ["route", *m, "-p", str(bank), "-i", str(docs), "-o", str(bank)], bank),
        ("eval-data", ["eval", *m, "--data", str(docs), "--kind", "ppl", "-o", str(docs)], docs),
        ("eval-bank", ["eval", *m, "--prompts", str(bank), "--route", "fixed:0", "-o", str(bank)], bank),
        ("train-prompts", ["train-prompts", *m, "--data", str(docs), "-o", str(docs)], docs),
        ("train-prompts-log", ["train-prompts", *m, "--data", str(docs), "-o", str(tmp / "b.safetensors"),
                               "--log", str(docs)], docs),
        ("train-prompts-lora", ["train-prompts", *m, "--data", str(docs), "--method", "lora", "-o", str(model)],
         model),
        ("align-data", ["align", "--student", str(model), "--data", str(docs), "-o", str(docs)], docs),
        ("align-nodes-is-output", ["align", "--student", str(model), "--data", str(docs), "-o", str(precious),
                                   "--nodes", str(precious)], precious),
        ("table-plot", ["table", str(results), "--plot-attention", str(results)], results),
    ]


def test_output_equal_to_an_input_is_refused_before_any_work(tiny_model, docs, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    for name, args, victim in _overlap_cases(tmp_path, model, docs):
        before = _digest(victim)
        r = run_inproc(*args)
        err = _one_line_error(r)
        assert any(k in err for k in ("would overwrite the input", "are the same place", "is not a directory")), \
            (name, err)
        assert _digest(victim) == before, name
        assert r.stdout == b"", name
    assert not list(tmp_path.glob(".*tmp-*")) and not (model / "sub").exists()


def test_output_paths_that_cannot_work_fail_before_the_model_loads(tiny_model, docs, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cases = [
        (["calibrate", "--model", str(tiny_model), "--data", str(docs), "-o", str(tmp_path)], "is a directory"),
        (["generate", "--model", str(tiny_model), "hi", "-o", str(docs / "x")], "is not a directory"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["calibrate", "--model", str(tiny_model), "--data", str(docs), "-o", str(ro / "s")],
                      "permission denied"))
    for args, needle in cases:
        assert _one_line_error(run_inproc(*args), needle)


def test_a_cache_path_that_is_a_file_is_an_error(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    r = run_inproc("generate", "hi", env={"RECHANNEL_CACHE": str(cache)})
    assert _one_line_error(r, "RECHANNEL_CACHE", "is not a directory")


# --- -o onto devices, pipes and links ----------------------------------------------------------------------

def test_dash_o_onto_a_device_node_and_a_link_to_stdout(tiny_model, tmp_path):
    node = tmp_path / "n"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    r = run_cli("generate", "--model", str(tiny_model), "Hi", "--max-new-tokens", "2", "-o", str(node))
    assert r.returncode == 0, r.stderr.decode()
    assert stat.S_ISCHR(os.stat(node).st_mode) and os.stat(node).st_rdev == os.makedev(1, 3)
    link = tmp_path / "s"
    link.symlink_to("/proc/self/fd/1")
    r = run_cli("generate", "--model", str(tiny_model), "Hi", "--max-new-tokens", "2", "-o", str(link))
    assert r.returncode == 0, r.stderr.decode()
    assert link.is_symlink() and json.loads(r.stdout)["prompt"] == "Hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n", "s"]


def test_dash_o_dev_stdout_appends_to_a_redirected_file(tiny_model, tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"earlier": true}\n')
    cmd = (f"{sys.executable} -m rechannel.cli.main generate --model {tiny_model} Hi --max-new-tokens 2 "
           f"-o /dev/stdout >> {log}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                       timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    lines = log.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": True} and json.loads(lines[1])["prompt"] == "Hi"


# --- internal errors become messages ------------------------------------------------------------------------

def test_empty_prompts_are_refused(tiny_model, tmp_path):
    assert _one_line_error(run_inproc("generate", "--model", str(tiny_model), ""), "PROMPT 1", "empty")
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    assert _one_line_error(run_inproc("generate", "--model", str(tiny_model), "-i", str(src)), f"{src}:2", "empty")


def test_a_prompt_longer_than_the_context_gives_both_lengths(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from rechannel.ops.core.generate import longest_token_chars

    tok = AutoTokenizer.from_pretrained(tiny_model)
    long = " ".join(["The capital of France is Paris."] * 25)  # the tiny model's context is 256 tokens
    assert len(tok(long)["input_ids"]) > 256 and len(long) <= 225 * longest_token_chars(tok)  # tokenized, then refused
    err = _one_line_error(run_inproc("generate", "--model", str(tiny_model), long), "PROMPT 1", "tokens", "256")
    assert "exceeds the model's context" in err
    huge = tmp_path / "huge.jsonl"
    huge.write_bytes(orjson.dumps({"prompt": "a" * 5_000_000}) + b"\n")  # refused by its length alone
    assert _one_line_error(run_inproc("generate", "--model", str(tiny_model), "-i", str(huge)), f"{huge}:1", "characters")


def test_closed_stdin_is_a_clear_error(tiny_model):
    for args in (["generate", "--model", str(tiny_model), "-i", "-"], ["route", "-p", "bank.safetensors"]):
        cmd = [sys.executable, "-m", "rechannel.cli.main", *args]
        r = subprocess.run(" ".join(cmd) + " <&-", shell=True, capture_output=True, timeout=300,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert _one_line_error(r, "stdin is closed")


def test_devices_that_are_not_here(tiny_model):
    assert _one_line_error(run_cli("generate", "--model", str(tiny_model), "hi", "--device", "cuda"), "--device cuda",
                    "no CUDA GPU")
    assert _one_line_error(run_cli("generate", "--model", str(tiny_model), "hi", "--device", "banana"), "--device 'banana'")


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _past_the_end(dst: Path) -> Path:
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "__metadata__": {"rechannel": "{}"}}).encode()
    dst.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)  # 8 bytes of data, header says 16
    return dst


def test_damaged_safetensors_files_are_named(tiny_model, tmp_path, docs):
    bank = _bank(tmp_path / "bank.safetensors", tiny_model, torch.randn(2, 3, 64))
    cut = _truncated(bank, tmp_path / "cut.safetensors")
    past = _past_the_end(tmp_path / "past.safetensors")
    for f in (cut, past):
        assert _one_line_error(run_inproc("inspect", str(f)), str(f))
        assert _one_line_error(run_inproc("route", "--model", str(tiny_model), "-p", str(f), "-i", str(docs)), str(f))
        assert _one_line_error(run_inproc("compress", "--model", str(tiny_model), "--method", "wanda", "--stats", str(f),
                                "-o", str(tmp_path / "out")), str(f))
    broken = Path(shutil.copytree(tiny_model, tmp_path / "broken-model"))
    _truncated(tiny_model / "model.safetensors", broken / "model.safetensors")
    for args in (["inspect", str(broken)], ["generate", "--model", str(broken), "hi"]):
        assert _one_line_error(run_inproc(*args), "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()


def test_broken_model_directories_say_which_file(tiny_model, tmp_path):
    def variant(name: str, change) -> Path:
        d = Path(shutil.copytree(tiny_model, tmp_path / name))
        change(d)
        return d

    not_json = variant("not-json", lambda d: (d / "config.json").write_text("{nope"))
    no_tok = variant("no-tok", lambda d: [(d / f).unlink() for f in os.listdir(d) if f.startswith(("tokenizer",
                                                                                                   "special"))])
    unknown = variant("unknown", lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((tiny_model / "config.json").read_text()), "model_type": "nosuchformer"})))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + os.urandom(4092))
    cases = [(not_json, "config.json", "not valid JSON"), (no_tok, "no tokenizer files"),
             (unknown, "config.json", "nosuchformer"), (garbage, "not a GGUF file"), (bad_gguf, str(bad_gguf))]
    for model, *needles in cases:
        assert _one_line_error(run_inproc("generate", "--model", str(model), "hi",
                                env={"RECHANNEL_CACHE": str(tmp_path / "cache")}), *needles)


def test_table_on_a_results_file_of_the_wrong_shape(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": [1, 2]}))
    assert _one_line_error(run_inproc("table", str(bad)), str(bad), "'results'")


# --- bad input silently accepted before ---------------------------------------------------------------------

def test_a_prompt_bank_of_nan_is_refused(tiny_model, tmp_path, docs):
    nan = _bank(tmp_path / "nan.safetensors", tiny_model, torch.full((2, 3, 64), float("nan")))
    out = tmp_path / "r.json"
    assert _one_line_error(run_inproc("eval", "--model", str(tiny_model), "--data", str(docs), "--kind", "ppl",
                            "--prompts", str(nan), "--route", "fixed:0", "-o", str(out)), str(nan), "non-finite")
    assert _one_line_error(run_inproc("route", "--model", str(tiny_model), "-p", str(nan), "-i", str(docs)), str(nan))
    assert not out.exists()


def test_metrics_over_nan_log_likelihoods_are_not_reported():
    from rechannel.ops.core.errors import UserError
    from rechannel.ops.evaluation.evaluator import _refuse_nonfinite

    _refuse_nonfinite("arc_easy", [[-1.0, -2.0], [-0.5, -3.0]])
    with pytest.raises(UserError, match="arc_easy: 1 of 2 examples"):
        _refuse_nonfinite("arc_easy", [[-1.0, float("nan")], [-0.5, -3.0]])


def test_table_options_that_select_nothing(tmp_path):
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"results": {"arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.1}}}))
    assert _one_line_error(run_inproc("table", str(res), "--metrics", "nosuch"), "--metrics", "nosuch")
    assert _one_line_error(run_inproc("table", str(res), "--metrics", "accc"), "did you mean 'acc'")
    assert _one_line_error(run_inproc("table", str(res), "--json", "--markdown"), "--json and --markdown")
    assert run_inproc("table", str(res), "--metrics", "acc").returncode == 0


def test_empty_task_list_is_an_error(tiny_model):
    assert _one_line_error(run_inproc("eval", "--model", str(tiny_model), "--tasks", ""), "--tasks is empty")
    assert _one_line_error(run_inproc("eval", "--model", str(tiny_model), "--tasks", ","), "--tasks is empty")


def test_resume_refuses_another_runs_node_file(tiny_model, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "x", "answer": "#### 4"}\n')
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"kind": "run", "config": {"data": "elsewhere.jsonl", "seed": 7}}) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "some other file"}\n')
    for nodes, needle in ((other, "written by another run"), (plain, "not a node file")):
        before = nodes.read_bytes()
        assert _one_line_error(run_inproc("align", "--student", str(tiny_model), "--data", str(questions), "-o",
                                str(tmp_path / "s.json"), "--nodes", str(nodes), "--resume"), str(nodes), needle)
        assert nodes.read_bytes() == before
    assert not (tmp_path / "s.json").exists()


# --- signals and help ---------------------------------------------------------------------------------------

def test_ctrl_c_prints_one_line_and_exits_130(tiny_model):
    p = subprocess.Popen([sys.executable, "-m", "rechannel.cli.main", "generate", "--model", str(tiny_model)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    time.sleep(4)  # blocked reading stdin, past the imports
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.decode().strip().splitlines() == ["error: interrupted"]


def test_every_help_text_renders_all_its_words():
    """rich markup eats unescaped [words]: every option's help, and each command's text, must keep its words."""
    import re

    import typer
    from rich.text import Text

    from rechannel.cli.main import app

    markup = re.compile(r"\[/?(bold|dim|red|yellow|green|italic)\]")

    def check(where: str, text: str | None) -> None:
        if not text:
            return
        words = re.findall(r"[A-Za-z0-9_]+", markup.sub("", text))
        plain = Text.from_markup(text).plain
        lost = [w for w in words if w not in plain]
        assert not lost, f"{where}: help loses {lost}"

    def walk(cmd, path: str) -> None:
        check(path, cmd.help)
        for p in cmd.params:
            check(f"{path} {p.name}", getattr(p, "help", None))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "rechannel")

"""Data parallelism under torchrun (gloo, CPU): eval, route and generate in 2 processes give what 1 process gives,
and the failures of a sharded run (too many ranks, one rank failing, a GPU that is not there) are one line on
rank 0, exit 1 on every rank, and no output file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import make_docs, run_cli
from rechannel.ops.core.distributed import RankFailed, World, _raise_failures

LOGLIK_TOL = 1e-5  # float32 sums over a few dozen tokens, batched differently in each process: ~1e-6 apart


def _env(**extra: str) -> dict:
    return {**os.environ, "CI": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, n: int = 2, cwd=None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node n rechannel ARGS` on this CPU (gloo), as a user starts it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(_free_port()), "-m", "rechannel.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, env=_env(), timeout=600, cwd=cwd, stdin=subprocess.DEVNULL)


def ranks(per_rank: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """One `rechannel` process per argument list, joined as torchrun's environment would join them (rank r gets
    per_rank[r]): how a test makes one rank see other input than the others."""
    port, n = str(_free_port()), len(per_rank)
    procs = [subprocess.Popen([sys.executable, "-m", "rechannel.cli.main", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r, args in enumerate(per_rank)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Built-in tasks of four kinds, small: ARC-Easy (mc, 5), LAMBADA (last word, 5), TriviaQA (qa, 3),
    WikiText-2 (perplexity, 7 windows of 32 tokens)."""
    d = tmp_path_factory.mktemp("data")
    files = {
        "tasks/arc_easy/test.jsonl": _jsonl([{"query": f"Question: which is {i}?", "choices": ["a fox", "the capital",
                                              "Paris"], "gold": i % 3, "id": f"a{i}"} for i in range(5)]),
        "tasks/lambada/test.jsonl": _jsonl([{"context": f"The capital of France is Paris {i}, said the",
                                             "continuation": "fox"} for i in range(5)]),
        "tasks/triviaqa/test1000.jsonl": _jsonl([{"id": f"t{i}", "question": f"Capital of France {i}?",
                                                  "answers": ["Paris"]} for i in range(3)]),
        "perplexity/wikitext2_test.raw": "\n".join(make_docs(30)),
    }
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


def test_shards_are_contiguous_balanced_and_cover_the_input():
    for n in (5, 7, 64):
        for size in (1, 2, 3, 5):
            shards = [World(r, size, r).shard(n) for r in range(size)]
            assert [i for s in shards for i in s] == list(range(n))  # rank order is input order
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_a_failure_names_its_rank_unless_every_rank_failed_alike():
    w = World(0, 3, 0)
    _raise_failures([None, None, None], w)
    with pytest.raises(RankFailed, match=r"^rank 1 of 3: bad line$"):
        _raise_failures([None, "bad line", "other"], w)
    with pytest.raises(RankFailed, match=r"^same$"):
        _raise_failures(["same", "same", "same"], w)


def _records(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def _close(a, b) -> bool:
    """Records equal, floats (and lists of them) within LOGLIK_TOL."""
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= LOGLIK_TOL
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def test_eval_under_torchrun_equals_one_process(tiny_model, data_dir, tmp_path):
    args = ["eval", "-m", str(tiny_model), "--tasks", "arc_easy,lambada,triviaqa,wikitext2", "--data-dir",
            str(data_dir), "--seqlen", "32", "--windows", "7", "--batch-size", "2", "--device", "cpu"]
    one = run_cli(*args, "-o", str(tmp_path / "one.json"))
    two = torchrun(*args, "-o", str(tmp_path / "two.json"))
    assert one.returncode == 0, one.stderr.decode()
    assert two.returncode == 0, two.stderr.decode()
    a, b = _records(one.stdout), _records(two.stdout)
    assert len(a) == len(b) == 5 + 5 + 3 + 7  # rank 0 alone writes, every example once, in input order
    assert all(_close(x, y) for x, y in zip(a, b, strict=True)), "a record differs between 1 and 2 processes"
    ra = json.loads((tmp_path / "one.json").read_text())
    rb = json.loads((tmp_path / "two.json").read_text())
    for task, metric in (("arc_easy", "acc,none"), ("arc_easy", "acc_norm,none"), ("lambada", "acc,none"),
                         ("triviaqa", "exact_match,none"), ("triviaqa", "f1,none")):
        assert ra["results"][task][metric] == rb["results"][task][metric], (task, metric)
    # perplexity: the same window NLLs (each within LOGLIK_TOL / 31 tokens per mean) summed in another order
    assert rb["results"]["wikitext2"]["ppl,none"] == pytest.approx(ra["results"]["wikitext2"]["ppl,none"], rel=1e-6)
    assert ra["per_example"]["arc_easy"]["id"] == rb["per_example"]["arc_easy"]["id"]
    assert (ra["config"]["world_size"], rb["config"]["world_size"]) == (1, 2)


def test_route_and_generate_under_two_ranks_equal_one_process(tiny_model, docs_file, tmp_path):
    bank = tmp_path / "bank.safetensors"
    r = run_cli("train-prompts", "--model", str(tiny_model), "--data", str(docs_file), "--num-prompts", "2",
                "--prompt-len", "2", "--steps", "2", "--batch", "2", "--seqlen", "16", "--objective", "lm",
                "--device", "cpu", "-o", str(bank))
    assert r.returncode == 0, r.stderr.decode()
    texts = tmp_path / "texts.jsonl"
    texts.write_text(_jsonl([{"text": t, "prompt": t[:30], "id": i} for i, t in enumerate(make_docs(5, seed=3))]))
    route = ["route", "-m", str(tiny_model), "-p", str(bank), "--batch-size", "2", "--device", "cpu", "-i", str(texts)]
    one, two = run_cli(*route), ranks([route, route])
    assert one.returncode == 0 and [p.returncode for p in two] == [0, 0], two[1].stderr.decode()
    assert two[1].stdout == b""  # only rank 0 writes
    a, b = _records(one.stdout), _records(two[0].stdout)
    assert [r["id"] for r in b] == list(range(5))
    assert [r["route"]["prompt"] for r in a] == [r["route"]["prompt"] for r in b]
    assert all(_close(x["route"]["scores"], y["route"]["scores"]) for x, y in zip(a, b, strict=True))
    mc = tmp_path / "mc.jsonl"
    mc.write_text(_jsonl([{"id": i, "context": t[:40], "choices": ["Paris", "Rome", "a fox"], "gold": i % 3}
                          for i, t in enumerate(make_docs(5, seed=4))]))
    banked = ["eval", "-m", str(tiny_model), "--data", str(mc), "--prompts", str(bank), "--route", "attention",
              "--device", "cpu", "-o"]
    one, two = run_cli(*banked, str(tmp_path / "b1.json")), ranks([[*banked, str(tmp_path / "b2.json")]] * 2)
    assert one.returncode == 0 and [p.returncode for p in two] == [0, 0], two[0].stderr.decode()
    assert all(_close(x, y) for x, y in zip(_records(one.stdout), _records(two[0].stdout), strict=True))
    r1, r2 = (json.loads((tmp_path / f"b{n}.json").read_text())["results"]["mc"] for n in (1, 2))
    assert r1["routing"] == r2["routing"] and r1["acc,none"] == r2["acc,none"]
    gen = ["generate", "-m", str(tiny_model), "-i", str(texts), "--max-new-tokens", "4", "--device", "cpu"]
    one, two = run_cli(*gen), ranks([gen, gen])
    assert one.returncode == 0 and [p.returncode for p in two] == [0, 0], two[0].stderr.decode()
    assert [r["completion"] for r in _records(one.stdout)] == [r["completion"] for r in _records(two[0].stdout)]


def test_more_ranks_than_examples_is_one_line_and_writes_nothing(tiny_model, tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(_jsonl([{"id": i, "context": "The capital is", "choices": ["Paris", "Rome"], "gold": 0}
                          for i in range(2)]))
    args = ["eval", "-m", str(tiny_model), "--data", str(mc), "--device", "cpu", "-o", str(tmp_path / "r.json")]
    got = ranks([args] * 3)
    assert [p.returncode for p in got] == [1, 1, 1]
    assert got[0].stderr.decode().strip() == ("error: 3 ranks for 2 mc examples: start at most 2 processes "
                                              "(torchrun --nproc-per-node), or give more input")
    assert got[1].stderr == got[2].stderr == b"" and got[0].stdout == b""
    assert not (tmp_path / "r.json").exists()


def test_a_failing_rank_stops_every_rank_and_rank_0_says_why(tiny_model, tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    rows = [{"id": i, "context": "The capital is", "choices": ["Paris", "Rome"], "gold": 0} for i in range(4)]
    good.write_text(_jsonl(rows))
    bad.write_text(_jsonl(rows[:1]) + '{"id": 1, "context": "x", "choices": ["a"], "gold": 3}\n')
    out = tmp_path / "r.json"
    args = ["eval", "-m", str(tiny_model), "--kind", "mc", "--device", "cpu", "-o", str(out), "--data"]
    got = ranks([[*args, str(good)], [*args, str(bad)]])  # rank 1's copy of the file is damaged
    assert [p.returncode for p in got] == [1, 1]
    lines = got[0].stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: rank 1 of 2: {bad}:2: gold 3"), lines
    assert got[1].stderr == b"" and got[0].stdout == b"" and not out.exists()


def test_a_gpu_asked_for_where_there_is_none_is_one_line(tiny_model, tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text(_jsonl([{"prompt": "a"}, {"prompt": "b"}]))
    args = ["generate", "-m", str(tiny_model), "-i", str(texts), "--device", "cuda"]
    got = ranks([args, args])
    assert [p.returncode for p in got] == [1, 1]
    assert got[0].stderr.decode().splitlines() == [
        "error: --device cuda under torchrun: this machine finds no CUDA GPU; use --device cpu (gloo) or auto"]
    assert got[1].stderr == b""


def test_stdin_is_refused_under_torchrun(tiny_model):
    args = ["generate", "-m", str(tiny_model), "--device", "cpu"]
    got = ranks([args, args])
    assert [p.returncode for p in got] == [1, 1]
    assert b"under torchrun every rank reads the input itself" in got[0].stderr


def _tensor(path, name):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)


def test_train_prompts_global_batch_over_two_ranks_equals_one_and_resumes(tiny_model, docs_file, tmp_path):
    import torch

    def train(out, steps, *extra):
        return ["train-prompts", "-m", str(tiny_model), "--data", str(docs_file), "--num-prompts", "2",
                "--prompt-len", "2", "--assign", "balanced", "--objective", "kd", "--teacher", str(tiny_model),
                "--steps", str(steps), "--batch", "4", "--seqlen", "16", "--save-every", "1", "--device", "cpu",
                "-o", str(out), *extra]

    one = run_cli(*train(tmp_path / "one.safetensors", 3))
    assert one.returncode == 0, one.stderr.decode()
    two = ranks([train(tmp_path / "two.safetensors", 3)] * 2)
    assert [p.returncode for p in two] == [0, 0], two[1].stderr.decode()
    assert two[1].stdout == b"" and json.loads(two[0].stdout)["output"] == str(tmp_path / "two.safetensors")
    want = _tensor(tmp_path / "one.safetensors", "prompts")  # (2, 2, d)
    assert torch.allclose(_tensor(tmp_path / "two.safetensors", "prompts"), want, rtol=0, atol=1e-5)
    # 2 ranks stop after step 2; one process resumes from their checkpoint and ends where the 1-rank run ended
    part = ranks([train(tmp_path / "resumed.safetensors", 2)] * 2)
    assert [p.returncode for p in part] == [0, 0], part[0].stderr.decode()
    done = run_cli(*train(tmp_path / "resumed.safetensors", 3, "--resume"))
    assert done.returncode == 0, done.stderr.decode()
    assert torch.allclose(_tensor(tmp_path / "resumed.safetensors", "prompts"), want, rtol=0, atol=1e-5)


def test_lora_global_batch_over_two_ranks_equals_one(tiny_model, docs_file, tmp_path):
    import torch

    args = ["train-prompts", "-m", str(tiny_model), "--data", str(docs_file), "--method", "lora", "--rank", "2",
            "--objective", "lm", "--steps", "2", "--batch", "4", "--seqlen", "16", "--save-every", "0",
            "--device", "cpu", "-o"]
    one = run_cli(*args, str(tmp_path / "one"))
    two = ranks([[*args, str(tmp_path / "two")]] * 2)
    assert one.returncode == 0 and [p.returncode for p in two] == [0, 0], two[0].stderr.decode()
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    assert not (tmp_path / "two.ckpt").exists()


def test_a_global_batch_smaller_than_the_world_is_refused(tiny_model, docs_file, tmp_path):
    args = ["train-prompts", "-m", str(tiny_model), "--data", str(docs_file), "--objective", "lm", "--steps", "1",
            "--batch", "1", "--num-prompts", "1", "--seqlen", "16", "--device", "cpu", "-o", str(tmp_path / "b.safetensors")]
    got = ranks([args] * 2)
    assert [p.returncode for p in got] == [1, 1] and got[1].stderr == b""
    assert got[0].stderr.decode().splitlines() == ["error: 2 ranks for 1 training windows per step: give a global "
                                                   "batch of at least 2, or start fewer processes"]
    assert not (tmp_path / "b.safetensors").exists()


def test_align_under_two_ranks_equals_one_process(tiny_model, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(_jsonl([{"question": f"Say a vowel {i}.", "answer": "a"} for i in range(3)]))
    args = ["align", "--student", str(tiny_model), "--teacher", str(tiny_model), "--context", "none", "--data",
            str(questions), "--rollouts", "2", "--continuations", "2", "--candidates", "2", "--budget", "2",
            "--max-new-tokens", "6", "--verifier", "regex:([aeiou])", "--device", "cpu", "-o"]
    one = run_cli(*args, str(tmp_path / "one.json"))
    two = ranks([[*args, str(tmp_path / "two.json")]] * 2)  # 3 questions: rank 0 runs 2 of them, rank 1 one
    assert one.returncode == 0 and [p.returncode for p in two] == [0, 0], two[0].stderr.decode()
    a, b = _records(one.stdout), _records(two[0].stdout)
    assert [r["kind"] for r in a] == [r["kind"] for r in b] and two[1].stdout == b""
    assert sum(r["kind"] == "question" for r in b) == 3
    assert all(_close(x, y) for x, y in zip(a, b, strict=True)), "a node record differs between 1 and 2 processes"
    sa, sb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert _close(sa["overall"], sb["overall"]) and sa["questions"] == sb["questions"]


def test_a_command_that_does_not_shard_is_refused_under_torchrun(tiny_model, tmp_path):
    args = ["compress", "-m", str(tiny_model), "--method", "magnitude", "-o", str(tmp_path / "m")]
    got = ranks([args, args])
    assert [p.returncode for p in got] == [1, 1] and got[1].stderr == b""
    assert got[0].stderr.decode().splitlines() == [
        "error: compress does not run under torchrun (2 processes): run it in one process; these shard their "
        "work: eval, route, generate, align, train-prompts"]
    assert not (tmp_path / "m").exists()


def test_the_random_route_depends_on_the_example_alone():
    from rechannel.ops.recover.prompts import random_row

    rows = [random_row(f"question {i}", "arc_easy", 5) for i in range(200)]
    assert rows == [random_row(f"question {i}", "arc_easy", 5) for i in range(200)]  # no hidden generator state
    assert set(rows) == set(range(5)) and max(rows.count(k) for k in range(5)) < 80  # spread over every row

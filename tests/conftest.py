"""Shared fixtures: tiny random Llama models built in-process, and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, or they fight
    os.environ["OMP_NUM_THREADS"] = "1"  # (inherited by the CLI subprocesses too)

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "A quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.",
    "Question: what is two plus two?\nAnswer: four.",
    "Compression removes weights, and prompts redirect what the model already knows.",
]


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences: ~300 tokens, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def make_tiny_llama(path: Path, seed: int = 0, layers: int = 2, hidden: int = 64, pad_vocab: int = 0,
                    intermediate: int | None = None, tie: bool = False, shard: str | None = None) -> Path:
    """Save a random Llama (GQA, 2 layers) with its tokenizer in Hugging Face layout at `path`; `pad_vocab`
    extra embedding rows past the tokenizer's tokens, as some model families pad theirs; the MLP is
    2 * hidden + 8 wide unless `intermediate` says otherwise; `tie` ties lm_head to the embeddings; `shard`
    (e.g. "40KB") saves the weights in shards of at most that size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer) + pad_vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden + 8,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty, private model cache for one test."""
    monkeypatch.setenv("RECHANNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `rechannel ARGS` as a real process: real exit status, stdout and stderr kept apart.

    The process sees no GPU unless `env` gives it one: what the CLI tests compare against (CPU float32
    references, fp16 exports, bit-exact resumes) is the CPU path; the GPU paths have their own tests."""
    full_env = {**os.environ, "CI": "true", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rechannel.cli.main", *args], input=input,
                          capture_output=True, env=full_env, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)


def _interpret_kernels_without_gpu() -> None:
    """Triton kernels run in its interpreter on a machine without a GPU; must precede any kernel import."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_kernels_without_gpu()

# The longest modules first, so that with one worker per core neither waits on them at the end
FIRST = ("test_kernel_compile.py", "test_readme.py", "test_real_model.py", "test_prompt_training.py", "test_align.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order


EIFFEL = ("The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the "
          "tallest structure in Paris. ")


def max_logit_gap_with_transformers(model_dir, tokens: int = 64) -> float:
    """Max |logit difference| on a `tokens`-token text between rechannel's load of `model_dir` and plain
    transformers' from_pretrained of it, both in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from rechannel.ops.core import models

    ours = models.load_model(str(model_dir), device="cpu", dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    ids = ours.tokenizer(EIFFEL * 3, return_tensors="pt").input_ids[:, :tokens]
    assert ids.shape[1] == tokens
    with torch.no_grad():
        return (ours.model(ids).logits - theirs(ids).logits).abs().max().item()


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    """Documents of very different lengths made from the corpus sentences (some short, some long)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture(scope="session")
def docs_file(tmp_path_factory) -> Path:
    import orjson

    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"text": t, "id": i}) + b"\n" for i, t in enumerate(make_docs())))
    return path


def run_inproc(*args: str, input: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rechannel ARGS` in this process (no interpreter start, torch already imported): exit status, stdout and
    stderr as run_cli gives them. For the many checks that fail fast; run_cli stays for signals, devices and
    anything that depends on a fresh process."""
    import contextlib
    import io
    import signal

    from rechannel.cli.main import main

    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, write_through=True)
    stderr = io.TextIOWrapper(err, write_through=True)
    stdin = io.TextIOWrapper(io.BytesIO(input or b""))
    saved_env, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ.update({"CI": "true", **(env or {})})
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            old_stdin, sys.stdin = sys.stdin, stdin
            try:
                main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            finally:
                sys.stdin = old_stdin
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for s, h in handlers.items():
            signal.signal(s, h)
    return subprocess.CompletedProcess(["rechannel", *args], code, out.getvalue(), err.getvalue())


def check_prompts_route_align(run, model: str, teacher: str, docs_file: Path, tmp_path: Path) -> None:
    """train-prompts, route and align take `model` (a compressed directory) as it is: a 2-prompt bank trains on
    it, routes inputs there, and align compares it with `teacher`. `run` is run_cli or run_inproc."""
    import json

    bank = tmp_path / "bank.safetensors"
    r = run("train-prompts", "--model", model, "--data", str(docs_file), "--num-prompts", "2", "--prompt-len", "2",
            "--steps", "2", "--batch", "2", "--seqlen", "16", "--objective", "lm", "--device", "cpu", "-o", str(bank))
    assert r.returncode == 0, r.stderr.decode()
    r = run("route", "--model", model, "-p", str(bank), "--device", "cpu",
            input=b'{"text": "the cat sat"}\n{"text": "on a mat"}\n')
    assert r.returncode == 0, r.stderr.decode()
    assert [json.loads(line)["route"]["prompt"] in (0, 1) for line in r.stdout.splitlines()] == [True, True]
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Say a vowel.", "answer": "a"}\n')
    r = run("align", "--student", model, "--teacher", teacher, "--context", "none", "--data", str(questions),
            "--rollouts", "2", "--continuations", "2", "--candidates", "2", "--budget", "2", "--max-new-tokens", "6",
            "--verifier", "regex:([aeiou])", "--device", "cpu", "-o", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr.decode()
    nodes = [json.loads(line) for line in r.stdout.splitlines() if json.loads(line)["kind"] == "node"]
    assert nodes and all(f"{Path(teacher).name}+none" in n["teachers"] for n in nodes)

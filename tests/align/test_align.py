"""align end to end on tiny models: node records that an independent float64 computation reproduces,
Monte-Carlo S_k against exact enumeration, resume, figures, and bad input."""

from __future__ import annotations

import json
import math

import orjson
import pytest
import torch

from conftest import make_tiny_llama, run_cli

VERIFIER = "regex:([aeiou])"  # the last vowel of the completion must be the record's answer: S varies by token


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("align") / "q.jsonl"
    rows = [{"id": f"q{i}", "question": f"Question {i}: what is two plus two?", "answer": a, "extra": i}
            for i, a in enumerate("aeo")]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory):
    """Another model of the same tokenizer whose output layer is padded by 8 rows, as Qwen2.5-7B's is
    against Qwen2.5-0.5B's: distributions are compared over the columns both have."""
    return make_tiny_llama(tmp_path_factory.mktemp("teacher") / "model", seed=3, pad_vocab=8)


SMALL = ["--rollouts", "4", "--continuations", "4", "--candidates", "2", "--budget", "5", "--max-new-tokens", "10",
         "--verifier", VERIFIER, "--device", "cpu"]


def _align(tiny_model, questions, out, *extra):
    return run_cli("align", "--student", str(tiny_model), "--data", str(questions), "-o", str(out), *SMALL, *extra)


def _records(text: bytes) -> list[dict]:
    return [json.loads(line) for line in text.decode().splitlines()]


@pytest.fixture(scope="module")
def full_run(tiny_model, questions, second_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = _align(tiny_model, questions, out / "summary.json", "--teacher", "self", "--teacher", str(second_teacher),
               "--context", "reference", "--context", "none", "--plot", str(out / "figs"))
    assert r.returncode == 0, r.stderr.decode()
    return out, _records(r.stdout), json.loads((out / "summary.json").read_text()), r.stderr.decode()


def _independent(node: dict, teacher: str, beta: float = 0.5) -> tuple[dict, float]:
    """Alignments on K and the teacher advantage from the record's p, q, S alone (plain float64 Python)."""
    tiny = 5e-324  # the smallest float64: a probability stored as 0 (underflow) keeps log() in its domain
    p = [max(k["p"], tiny) for k in node["K"]]
    q = [max(k["q"][teacher], tiny) for k in node["K"]]
    s = [k["S"] for k in node["K"]]
    adv = math.log(q[0]) - math.log(p[0])  # the sampled token's reward, over the full vocabulary
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    v = sum(a * b for a, b in zip(p, s, strict=True))
    ideal = [a * (b - v) for a, b in zip(p, s, strict=True)] if len(set(s)) > 1 else [0.0] * len(p)  # S flat: 0
    kl = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    m = [(1 - beta) * a + beta * b for a, b in zip(p, q, strict=True)]
    kl_m = sum(a * math.log(a / b) for a, b in zip(p, m, strict=True))
    grads = {"rkl": [a * (math.log(b) - math.log(a) + kl) for a, b in zip(p, q, strict=True)],
             "fkl": [b - a for a, b in zip(p, q, strict=True)],
             "jsd": [(1 - beta) * a * (-math.log(a / c) + kl_m) for a, c in zip(p, m, strict=True)],
             "sampled": [adv * ((i == 0) - a) for i, a in enumerate(p)]}

    def cos(a, b):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return None if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)

    return {k: cos(ideal, g) for k, g in grads.items()}, sum((b - a) * c for a, b, c in zip(p, q, s, strict=True))


def test_node_records_reproduce_from_their_own_p_q_s(full_run, second_teacher):
    _, records, _, _ = full_run
    nodes = [r for r in records if r["kind"] == "node"]
    teachers = {"self+reference", f"{second_teacher.name}+reference", f"{second_teacher.name}+none"}
    assert nodes and set(nodes[0]["teachers"]) == teachers  # (self, none) is the student: left out
    defined = 0
    for node in nodes:
        assert node["K"][0]["token"] == node["token"] and len({k["token"] for k in node["K"]}) == len(node["K"])
        for t in teachers:
            align, adv = _independent(node, t)
            got = node["teachers"][t]
            # float64 both sides from the record's own p, q, S (orjson round-trips floats), |K| ≤ 9 terms:
            # ~|K|·u64 ≈ 1e-15 times the conditioning 1/(1 − p_y), ≪ 1e-6 for this model's near-flat p
            assert got["advantage"] == pytest.approx(adv, abs=1e-6)
            for name, want in align.items():
                if want is None:
                    assert got["align"][name] is None
                else:
                    defined += 1
                    assert got["align"][name] == pytest.approx(want, abs=1e-6)  # as the advantage above
            assert all(v is None or -1 <= v <= 1 for v in got["align_vocab"].values())
            assert got["kl"] >= 0 and got["js"] >= 0
    assert defined > 20  # the test saw real signal, not only undefined alignments


def test_question_records_summary_and_figures(full_run, questions):
    out, records, summary, stderr = full_run
    heads = [r for r in records if r["kind"] == "question"]
    assert [h["question"] for h in heads] == ["q0", "q1", "q2"] and all(h["selected"] for h in heads)
    assert all(len(h["correct"]) == 4 for h in heads)
    nodes = [r for r in records if r["kind"] == "node"]
    assert len(nodes) == summary["nodes"] == sum(h["nodes"] for h in heads) <= 3 * 5
    block = summary["overall"]["self+reference"]
    assert block["all"]["nodes"] == block["correct"]["nodes"] + block["incorrect"]["nodes"] == len(nodes)
    mine = [n["teachers"]["self+reference"]["align"]["rkl"] for n in nodes]
    mine = [v for v in mine if v is not None]
    assert block["all"]["align"]["rkl"]["n"] == len(mine)
    if mine:
        # fmean (exactly rounded) vs a float64 Σ of ≤ 15 cosines ≤ 1: ≤ 15·u64 ≈ 2e-15, under approx's 1e-12
        assert block["all"]["align"]["rkl"]["mean"] == pytest.approx(sum(mine) / len(mine))
    assert set(summary["per_question"]) == {"q0", "q1", "q2"}
    assert "alignment on incorrect rollouts" in stderr or "not enough nodes" in stderr
    for png in ("alignment-along-rollouts.png", "alignment-distributions.png"):
        assert (out / "figs" / png).read_bytes()[:4] == b"\x89PNG"


def test_resume_gives_the_records_of_one_uninterrupted_run(tiny_model, questions, tmp_path):
    whole = _align(tiny_model, questions, tmp_path / "a.json", "--nodes", str(tmp_path / "a.jsonl"))
    part = _align(tiny_model, questions, tmp_path / "b.json", "--nodes", str(tmp_path / "b.jsonl"),
                  "--max-questions", "1")
    assert whole.returncode == 0 and part.returncode == 0, part.stderr.decode()
    assert len([r for r in _records((tmp_path / "b.jsonl").read_bytes()) if r["kind"] == "question"]) == 1
    # a kill in the middle of the second question's block: two whole node lines and half of a third
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines(keepends=True)
    second = len((tmp_path / "b.jsonl").read_bytes().splitlines())
    assert json.loads(lines[second + 2])["kind"] == "node"
    with open(tmp_path / "b.jsonl", "ab") as f:
        f.write(lines[second] + lines[second + 1] + lines[second + 2][:40])
    rest = _align(tiny_model, questions, tmp_path / "b.json", "--nodes", str(tmp_path / "b.jsonl"), "--resume")
    assert rest.returncode == 0, rest.stderr.decode()
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a["overall"] == b["overall"]


def test_pass_rate_filter_skips_questions(tiny_model, questions, tmp_path):
    r = _align(tiny_model, questions, tmp_path / "s.json", "--select-pass-rate", "1:1")
    assert r.returncode == 0, r.stderr.decode()
    heads = [x for x in _records(r.stdout) if x["kind"] == "question"]
    assert all((h["pass_rate"] == 1.0) == h["selected"] for h in heads)
    assert all(x["question"] in {h["question"] for h in heads if h["selected"]}
               for x in _records(r.stdout) if x["kind"] == "node")


def test_bad_input_is_one_line_and_writes_nothing(tiny_model, questions, tmp_path):
    from transformers import AutoTokenizer

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answer": "a"}\n{"question": "y"}\n')
    foreign = make_tiny_llama(tmp_path / "foreign", seed=1)
    tok = AutoTokenizer.from_pretrained(foreign)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(foreign)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text('{"question": "x", "answer": "42"}\n')
    broken = tmp_path / "broken-nodes.jsonl"
    broken.write_text('{"kind": "node", "question": 0}\n{"kind": "node", \n{"kind": "question", "question": 0}\n')
    cases = [
        (_align(tiny_model, bad, tmp_path / "o.json"), f"{bad}:2: missing field 'answer'"),
        (_align(tiny_model, questions, tmp_path / "o.json", "--budget", "0"), "--budget 0"),
        (_align(tiny_model, questions, tmp_path / "o.json", "--teacher", str(foreign)), "another vocabulary"),
        (_align(tiny_model, gsm, tmp_path / "o.json", "--verifier", "gsm8k"), "no '#### <number>'"),
        (_align(tiny_model, questions, tmp_path / "o.json", "--verifier", "gsm9k"), "did you mean"),
        (_align(tiny_model, questions, tmp_path / "o.json", "--context", "none"), "no teacher"),
        (_align(tiny_model, questions, tmp_path / "o.json", "--resume"), "--resume needs --nodes FILE"),
        (_align(tiny_model, questions, tmp_path / "o.json", "--resume", "--nodes", str(broken)),
         f"{broken}:2: not valid JSON"),
        (run_cli("align", "--student", str(tiny_model), "--data", str(questions), "-o", "-"), "already go to stdout"),
    ]
    for r, message in cases:
        err = r.stderr.decode()
        assert r.returncode == 1 and message in err and err.count("\n") == 1 and err.startswith("error:"), err
        assert r.stdout == b""
    assert not (tmp_path / "o.json").exists()
    assert broken.read_text().count("\n") == 3  # a file --resume cannot read is left as it was


class _Letters:
    """A stand-in tokenizer over a 5-token vocabulary: token i is the letter 'abcde'[i]; 4 ('e') ends."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcde"[i] for i in ids if not (skip_special_tokens and i == 4))


def _exact_success(model, seq: list[int], left: int, check) -> float:
    """P(success) by enumerating every continuation at temperature 1 (tiny vocabulary, few steps)."""
    if left == 0 or seq[-1] == 4:
        return float(check(seq))
    with torch.no_grad():
        p = model(input_ids=torch.tensor([seq])).logits[0, -1].double().softmax(-1)
    return sum(float(p[x]) * _exact_success(model, seq + [x], left - 1, check) for x in range(5))


def test_monte_carlo_success_converges_to_enumeration():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rechannel.ops.align.diagnosis import AlignConfig, Diagnosis, Scorer, prompt_state
    from rechannel.ops.align.verifiers import Verifier

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked, uneven next-token distribution
    tok = _Letters()
    check = Verifier("two-c", (), lambda text, rec: text.count("c") >= 2)
    prompt, rollout, t = [0, 1], [2, 3, 1, 0], 1
    cfg = AlignConfig(continuations=3000, max_new_tokens=4, temperature=1.0)
    diag = Diagnosis(Scorer("s", model, lambda r: prompt), tok, [], check, cfg, stop_ids={4})
    kv = prompt_state(model, prompt + rollout)[1]
    cands = [0, 1, 2, 3, 4]
    s = diag._success(kv, len(prompt), rollout, t, cands, torch.Generator().manual_seed(0), {})
    ids_check = lambda seq: check.check(tok.decode(seq[len(prompt):]), {})  # noqa: E731
    exact = [_exact_success(model, prompt + rollout[:t] + [k], cfg.max_new_tokens - t - 1, ids_check)
             for k in cands]
    assert len({round(e, 3) for e in exact}) > 2  # the forced token matters
    for got, want in zip(s.tolist(), exact, strict=True):
        # `want` is a float64 sum of products of probabilities: it can land a few ulps outside [0, 1], so it is
        # clamped before the binomial standard error sqrt(w(1-w)/n) is taken. The bound is 4 standard errors of
        # the 3000-sample mean, plus the float64 rounding of the enumeration (depth 2, 25 terms: < 1e-12).
        w = min(max(want, 0.0), 1.0)
        assert abs(got - w) <= 4 * math.sqrt(w * (1 - w) / 3000) + 1e-12, (s.tolist(), exact)


def test_student_prompt_template_is_what_student_and_none_teacher_see(tiny_model, questions, tmp_path, full_run):
    template = tmp_path / "student.txt"
    template.write_text("Solve this, number {extra}.\n{question}\nAnswer with one vowel:")
    r = _align(tiny_model, questions, tmp_path / "s.json", "--prompt", f"template:{template}", "--budget", "1")
    assert r.returncode == 0, r.stderr.decode()
    heads = [x for x in _records(r.stdout) if x["kind"] == "question"]
    plain = [x for x in full_run[1] if x["kind"] == "question"]
    assert all(h["prompt_tokens"] > p["prompt_tokens"] for h, p in zip(heads, plain, strict=True))
    assert json.loads((tmp_path / "s.json").read_text())["config"]["prompt"] == f"template:{template}"
    template.write_text("{question} {nothere}")
    bad = _align(tiny_model, questions, tmp_path / "t.json", "--prompt", f"template:{template}")
    assert bad.returncode == 1 and "needs the field 'nothere'" in bad.stderr.decode()
    assert not (tmp_path / "t.json").exists()


def test_continuations_in_smaller_batches_decode_the_same_rows(tiny_model):
    """--max-batch bounds how many continuations decode together; greedy rows do not depend on it, and
    sampled rows are those of the chunks drawn one after the other from the same generator."""
    from transformers import AutoModelForCausalLM

    from rechannel.ops.align.diagnosis import prompt_state
    from rechannel.ops.align.rollouts import Sampling, continue_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = [1, 5, 9, 13, 17]
    _, kv = prompt_state(model, ids)
    first = torch.tensor([3, 8, 8, 21, 40])

    def rows(max_rows, temperature, seed=0, first=first):
        gen = torch.Generator().manual_seed(seed)
        return continue_rows(model, kv, len(ids), first, 6, gen, Sampling(temperature, {2}, max_rows))

    assert rows(None, 0.0) == rows(1, 0.0) == rows(2, 0.0) == rows(64, 0.0)
    assert [r[0] for r in rows(2, 0.0)] == first.tolist() and all(len(r) <= 6 for r in rows(2, 0.0))
    gen = torch.Generator().manual_seed(7)
    one_by_one = [row for i in range(0, 5, 2)
                  for row in continue_rows(model, kv, len(ids), first[i:i + 2], 6, gen, Sampling(1.0, {2}))]
    assert rows(2, 1.0, seed=7) == one_by_one


def test_sampling_stays_inside_the_width_shared_with_the_teachers(tmp_path):
    """A student padded wider than its teacher: its padding logits made the largest, sampling would pick them;
    drawn within the shared width it never does (the teacher has no logit for those ids)."""
    from transformers import AutoModelForCausalLM

    from rechannel.ops.align.diagnosis import prompt_state
    from rechannel.ops.align.rollouts import Sampling, continue_rows

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "wide", pad_vocab=16)).eval()
    width = model.config.vocab_size - 16
    pads = torch.arange(width, model.config.vocab_size)
    model.lm_head.register_forward_hook(lambda mod, args, out: out.index_fill(-1, pads, 30.0))  # padding wins
    ids = [1, 5, 9, 13]
    _, kv = prompt_state(model, ids)
    first = torch.tensor([3] * 8)
    free = continue_rows(model, kv, len(ids), first, 5, torch.Generator().manual_seed(0), Sampling(1.0, set()))
    bounded = continue_rows(model, kv, len(ids), first, 5, torch.Generator().manual_seed(0),
                            Sampling(1.0, set(), width=width))
    assert any(t >= width for row in free for t in row[1:])
    assert all(t < width for row in bounded for t in row) and all(len(row) == 5 for row in bounded)


def test_max_batch_is_recorded_and_runs(tiny_model, questions, tmp_path):
    r = _align(tiny_model, questions, tmp_path / "m.json", "--max-batch", "3", "--budget", "2", "--limit", "1")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads((tmp_path / "m.json").read_text())["config"]["max_batch"] == 3

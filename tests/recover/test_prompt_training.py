"""train-prompts and route on tiny models: losses against float64, the training contract, the CLI."""

from __future__ import annotations

import json

import orjson
import pytest
import torch
from safetensors.torch import load_file
from tolerances import U32, attention_mass_error, log_softmax_error, logit_error

from conftest import make_tiny_llama, run_cli
from rechannel.ops.core.models import load_model
from rechannel.ops.recover.prompt_training import (
    PromptTrainConfig,
    assign,
    balanced_assignment,
    init_bank,
    train_prompts,
)
from rechannel.ops.recover.routing import attention_scores, bank_kv
from rechannel.ops.recover.training import TrainState, token_loss

TRAIN = ("--num-prompts", "3", "--prompt-len", "4", "--batch", "4", "--seqlen", "16")


def _loss_tolerance(objective: str, logits: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol) of a float32 per-window loss against float64 on the same logits: each float32 log-prob is
    off by e = log_softmax_error; a CE token by e; a KL token Σ p_t (lt − lp) by 2e from its log-probs, by
    e·Σ p_t|lt − lp| from p_t = exp(lt), by (V + 1)·u·Σ p_t|lt − lp| from its products and Σ; the mean
    over T tokens by T·u."""
    logits, v, t = logits.detach(), logits.shape[-1], logits.shape[1]
    e = log_softmax_error(v, max(logits.abs().max().item(), teacher.abs().max().item()))
    if objective == "lm":
        return t * U32, e
    lt, lp = torch.log_softmax(teacher.double(), -1), torch.log_softmax(logits.double(), -1)
    spread = (lt.exp() * (lt - lp).abs()).sum(-1).max().item()
    return t * U32, 2 * e + (e + (v + 1) * U32) * spread


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model), device="cpu")


def test_losses_equal_float64_formulas():
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    ids = torch.randint(0, 11, (2, 5))
    p_t = torch.softmax(teacher.double(), -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits.double(), -1))).sum(-1).mean(1)
    rtol, atol = _loss_tolerance("kd", logits, teacher)  # float32 against float64: see _loss_tolerance
    torch.testing.assert_close(token_loss("kd", logits, ids, teacher).double(), kl, rtol=rtol, atol=atol)
    ce = torch.stack([torch.nn.functional.cross_entropy(logits[b, :-1].double(), ids[b, 1:]) for b in range(2)])
    rtol, atol = _loss_tolerance("lm", logits, teacher)
    torch.testing.assert_close(token_loss("lm", logits, ids, None).double(), ce, rtol=rtol, atol=atol)
    # KL of a distribution with itself: the same float32 log-softmax of the same logits twice, every term 0
    assert token_loss("kd", teacher, ids, teacher).abs().max() < 1e-6


def test_init_from_vocabulary_and_from_text(lm):
    table = lm.model.get_input_embeddings().weight
    bank = init_bank(lm.model, lm.tokenizer, 3, 4, "vocab", 0)
    assert bank.shape == (3, 4, 64)
    assert all(any(torch.equal(row, t) for t in table) for row in bank.reshape(-1, 64))
    bank = init_bank(lm.model, lm.tokenizer, 2, 5, "text:Paris", 0)
    ids = lm.tokenizer("Paris", add_special_tokens=False).input_ids
    want = table[torch.tensor(ids * 5)[:5]]
    assert torch.equal(bank[0], want) and not torch.equal(bank[1], want)
    # not rounding: the noise is N(0, 1)·1% of the std, so 0.1·std is 10σ (P < 1e-20 per entry)
    torch.testing.assert_close(bank[1], want, rtol=0, atol=0.1 * table.std().item())


def test_assignment_rules(lm):
    torch.manual_seed(3)
    bank, ids = torch.randn(3, 4, 64), torch.randint(3, 300, (5, 9))
    cfg = PromptTrainConfig(prompts=3, length=4, assign="router", route_layers=(0, 1))
    want = attention_scores(lm.model, bank_kv(lm.model, bank), ids, torch.ones_like(ids), [0, 1]).argmax(1)
    assert torch.equal(assign(lm.model, bank, ids, cfg, 0), want)
    rnd = PromptTrainConfig(prompts=3, length=4, assign="random", seed=1)
    assert torch.equal(assign(lm.model, bank, ids, rnd, 7), assign(lm.model, bank, ids, rnd, 7))
    assert not torch.equal(assign(lm.model, bank, ids, rnd, 7), assign(lm.model, bank, ids, rnd, 8))
    every = PromptTrainConfig(prompts=3, length=4, assign="all")
    assert assign(lm.model, bank, ids, every, 0).tolist() == [0, 1, 2] * 5
    scores = attention_scores(lm.model, bank_kv(lm.model, bank), ids, torch.ones_like(ids), [0, 1])
    fair = assign(lm.model, bank, ids, PromptTrainConfig(prompts=3, length=4, assign="balanced", route_layers=(0, 1)), 0)
    assert torch.equal(fair, balanced_assignment(scores, 2)) and torch.bincount(fair, minlength=3).max() <= 2


def test_balanced_assignment_by_hand():
    """Pairs from the highest score down, each prompt at most `capacity` windows: where the router would
    send all four windows to prompt 0, two go to prompt 1."""
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.05]])
    assert scores.argmax(1).tolist() == [0, 0, 0, 0]
    assert balanced_assignment(scores, 2).tolist() == [0, 0, 1, 1]
    assert balanced_assignment(scores, 4).tolist() == [0, 0, 0, 0]  # no constraint: the router's choice
    assert balanced_assignment(torch.full((2, 2), 0.5), 1).tolist() == [0, 1]  # ties: lower index first


class HiddenPromptTeacher(torch.nn.Module):
    """The model itself behind a fixed prompt: a teacher whose behaviour a prompt can match exactly."""

    def __init__(self, model, prompt):
        super().__init__()
        self.model, self.prompt = model, prompt

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, use_cache=False):
        embeds = torch.cat([self.prompt.expand(len(input_ids), -1, -1), self.model.get_input_embeddings()(input_ids)], 1)
        out = self.model(inputs_embeds=embeds, use_cache=False)
        out.logits = out.logits[:, self.prompt.shape[1]:]
        return out


def test_kd_training_finds_a_hidden_prompt_and_changes_only_the_prompts(tiny_model):
    lm = load_model(str(tiny_model), device="cpu")
    with torch.no_grad():  # a random model at its init scale barely reacts to its input; sharpen it
        lm.model.get_input_embeddings().weight.mul_(20)
        lm.model.lm_head.weight.mul_(20)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    table = lm.model.get_input_embeddings().weight
    teacher = HiddenPromptTeacher(lm.model, table[torch.tensor([[40, 41, 42, 43]])])
    torch.manual_seed(0)
    windows = torch.randint(3, 300, (64, 12))
    cfg = PromptTrainConfig(prompts=1, length=4, objective="kd", steps=30, lr=0.3, batch=4)
    losses = []
    state = train_prompts(lm.model, teacher, [windows], cfg, TrainState({"prompts": init_bank(lm.model, lm.tokenizer, 1, 4, "vocab", 0)}),
                          on_step=lambda rec, st: losses.append(rec.loss))
    assert sum(losses[-5:]) < 0.3 * sum(losses[:5]), losses
    assert state.step == 30 and state.counts == [120] and set(state.adam) == {"prompts.exp_avg", "prompts.exp_avg_sq"}
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _train(tiny_model, docs_file, out, *extra):
    return run_cli("train-prompts", "--model", str(tiny_model), "--data", str(docs_file), *TRAIN, "-o", str(out), *extra)


def test_resume_continues_exactly_where_the_run_stopped(tiny_model, docs_file, tmp_path):
    whole = _train(tiny_model, docs_file, tmp_path / "a.safetensors", "--objective", "lm", "--steps", "6")
    assert whole.returncode == 0, whole.stderr
    log = tmp_path / "b.log"
    args = ("--objective", "lm", "--save-every", "3", "--log", str(log))
    assert _train(tiny_model, docs_file, tmp_path / "b.safetensors", *args, "--steps", "3").returncode == 0
    r = _train(tiny_model, docs_file, tmp_path / "b.safetensors", *args, "--steps", "6", "--resume")
    assert r.returncode == 0, r.stderr
    a, b = load_file(tmp_path / "a.safetensors")["prompts"], load_file(tmp_path / "b.safetensors")["prompts"]
    assert torch.equal(a, b)
    steps = [orjson.loads(line)["step"] for line in log.read_bytes().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    summary = json.loads(r.stdout)  # the shares are rounded to 4 decimals: their Σ is within 3·5e-5 of 1
    assert summary["steps"] == 6 and summary["parameters"] == 3 * 4 * 64 and abs(sum(summary["assignment"]) - 1) < 1e-3
    other = _train(tiny_model, docs_file, tmp_path / "b.safetensors", *args, "--steps", "9", "--resume", "--lr", "0.5")
    assert other.returncode == 1 and "other settings (lr)" in other.stderr.decode()


def test_kd_needs_a_teacher_with_the_same_vocabulary(tiny_model, docs_file, tmp_path):
    r = _train(tiny_model, docs_file, tmp_path / "x.safetensors", "--steps", "1")
    assert r.returncode == 1 and "needs a teacher" in r.stderr.decode()
    from transformers import AutoTokenizer

    other = make_tiny_llama(tmp_path / "other", seed=1)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    r = _train(tiny_model, docs_file, tmp_path / "x.safetensors", "--steps", "1", "--teacher", str(other))
    assert r.returncode == 1 and "another vocabulary" in r.stderr.decode()
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture(scope="module")
def bank_file(tiny_model, docs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bank") / "bank.safetensors"
    peft_dir = out.parent / "peft"
    r = _train(tiny_model, docs_file, out, "--teacher", str(tiny_model), "--steps", "2", "--export-peft",
               str(peft_dir), "--member", "1")
    assert r.returncode == 0, r.stderr
    return out


def test_peft_export_gives_peft_the_same_logits(tiny_model, bank_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = load_file(bank_file)["prompts"][1]  # (P, d)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 17, 42, 9, 100]])
    with torch.no_grad():
        ours = base(inputs_embeds=torch.cat([prompt[None], base.get_input_embeddings()(ids)], 1)).logits[:, 4:]
        peft_model = PeftModel.from_pretrained(base, bank_file.parent / "peft")
        theirs = peft_model(input_ids=ids).logits[:, -5:]
    # two float32 forwards of the same 9 positions (PEFT's own call), each logit within logit_error of exact
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2 * logit_error(base, 4 + ids.shape[1]))


def test_route_cli_matches_ops_and_keeps_the_records(tiny_model, bank_file, lm, tmp_path):
    texts = ["The capital of France is", "two plus two", "Compression removes weights, and prompts redirect"]
    lines = b"".join(orjson.dumps({"text": t, "id": i}) + b"\n" for i, t in enumerate(texts))
    r = run_cli("route", "--model", str(tiny_model), "-p", str(bank_file), "--layers", "all", "--batch-size", "2",
                input=lines)
    assert r.returncode == 0, r.stderr
    out = [orjson.loads(line) for line in r.stdout.splitlines()]
    kv = bank_kv(lm.model, load_file(bank_file)["prompts"])
    for i, (rec, text) in enumerate(zip(out, texts, strict=True)):
        assert rec["id"] == i and rec["text"] == text and rec["route"]["by"] == "attention"
        ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        scores = attention_scores(lm.model, kv, ids, torch.ones_like(ids), [0, 1])[0]  # one at a time, unpadded
        # float32 attention in a padded batch of 2 against alone: each mass within attention_mass_error of
        # exact (layer 1 the worse), plus the float32 Σ over a prompt's 4 keys, 4 heads and ≤ T tokens
        keys = 3 * 4 + max(len(lm.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
        tol = 2 * attention_mass_error(lm.model, 1, keys) + (4 + 4 + keys + 3) * U32
        assert rec["route"]["scores"] == pytest.approx(scores.tolist(), abs=tol)
        assert rec["route"]["prompt"] == int(scores.argmax())


def test_route_refuses_bad_input_and_foreign_banks(tiny_model, bank_file, tmp_path):
    out = tmp_path / "routed.jsonl"
    r = run_cli("route", "--model", str(tiny_model), "-p", str(bank_file), "-o", str(out),
                input=b'{"text": "fine"}\n{"text": 3}\n')
    assert r.returncode == 1 and r.stderr.decode().startswith("error: <stdin>:2:") and not out.exists()
    other = make_tiny_llama(tmp_path / "other", seed=5)
    r = run_cli("route", "--model", str(other), "-p", str(bank_file), input=b'{"text": "fine"}\n')
    assert r.returncode == 1 and "was made for model" in r.stderr.decode()
    r = run_cli("route", "--model", str(tiny_model), "-p", str(bank_file), "--by", "attentoin", input=b'{"text": "a"}\n')
    assert r.returncode == 1 and "attention" in r.stderr.decode()


def test_eval_routes_inline_as_route_does(tiny_model, bank_file, tmp_path):
    data = tmp_path / "mc.jsonl"
    rows = [{"id": i, "context": c, "choices": [" yes", " no"], "gold": 0}
            for i, c in enumerate(["The capital of France is Paris?", "Is two plus two four?", "A quick brown fox"])]
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    r = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--prompts", str(bank_file),
                "--route", "attention", "--layers", "all", "-o", str(tmp_path / "res.json"))
    assert r.returncode == 0, r.stderr
    got = {rec["id"]: rec["prompt"] for rec in map(orjson.loads, r.stdout.splitlines())}
    routed = run_cli("route", "--model", str(tiny_model), "-p", str(bank_file), "--field", "context", "--layers", "all",
                     input=data.read_bytes())
    want = {str(rec["id"]): rec["route"]["prompt"] for rec in map(orjson.loads, routed.stdout.splitlines())}
    assert got == want
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["config"]["prompts"]["route"] == "attention" and res["config"]["extra_parameters"] == 3 * 4 * 64


def test_eval_accepts_the_routed_records(tiny_model, bank_file, tmp_path):
    rows = [{"id": i, "context": c, "choices": [" yes", " no"], "gold": 0}
            for i, c in enumerate(["The capital of France is Paris?", "Is two plus two four?"])]
    data = tmp_path / "mc.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    routed = run_cli("route", "--model", str(tiny_model), "-p", str(bank_file), "--field", "context", "--by", "entropy",
                     "-o", str(tmp_path / "routed.jsonl"), input=data.read_bytes())
    assert routed.returncode == 0, routed.stderr.decode()
    want = {str(json.loads(line)["id"]): json.loads(line)["route"]["prompt"]
            for line in (tmp_path / "routed.jsonl").read_text().splitlines()}
    r = run_cli("eval", "--model", str(tiny_model), "--data", str(tmp_path / "routed.jsonl"), "--prompts", str(bank_file),
                "--route", "record")
    assert r.returncode == 0, r.stderr.decode()
    assert {rec["id"]: rec["prompt"] for rec in map(orjson.loads, r.stdout.splitlines())} == want
    r = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--prompts", str(bank_file), "--route", "record")
    assert r.returncode == 1 and "has no 'route'" in r.stderr.decode()


def test_attention_profiles_and_their_figure(tiny_model, bank_file, tmp_path):
    rows = [{"id": i, "context": c, "choices": [" yes", " no"], "gold": 0}
            for i, c in enumerate(["The capital of France is Paris?", "Is two plus two four?", "A quick brown fox"])]
    data = tmp_path / "mc.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    files = []
    for name, extra in (("plain", ()), ("idp", ("--prompts", str(bank_file), "--route", "attention"))):
        out = tmp_path / f"{name}.json"
        r = run_cli("eval", "--model", str(tiny_model), "--data", str(data), "--attention-profile", "2", *extra,
                    "-o", str(out))
        assert r.returncode == 0, r.stderr.decode()
        profile = json.loads(out.read_text())["attention_profile"]
        assert profile["examples"] == 2 and len(profile["mass"]) == 2 and all(0 < m < 1 for m in profile["mass"])
        assert profile["prefix"] == ("prompt" if extra else "first token")
        files.append(str(out))
    png = tmp_path / "attention.png"
    r = run_cli("table", *files, "--plot-attention", str(png))
    assert r.returncode == 0, r.stderr.decode()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"results": {}, "config": {}}))
    r = run_cli("table", str(bare), "--plot-attention", str(tmp_path / "none.png"))
    assert r.returncode == 1 and "none of the files has an attention profile" in r.stderr.decode()


def test_malformed_training_data_is_refused_before_anything_is_written(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine words here"}\n{"text": 7}\n')
    out = tmp_path / "bank.safetensors"
    r = run_cli("train-prompts", "--model", str(tiny_model), "--data", str(bad), "--objective", "lm", "-o", str(out))
    assert r.returncode == 1 and r.stderr.decode().startswith(f"error: {bad}:2:") and not out.exists()
    assert not (tmp_path / "bank.safetensors.ckpt").exists()


def test_kd_loss_compares_the_columns_both_models_have():
    """A teacher whose output layer is padded past the shared tokenizer: the padding is not a token, so
    equal logits on the real columns mean zero KL whatever the padded ones hold."""
    from rechannel.ops.recover.training import token_loss

    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 30, generator=g)
    teacher = torch.cat([student, torch.randn(2, 5, 6, generator=g) * 5], -1)  # (2, 5, 36)
    ids = torch.zeros(2, 5, dtype=torch.long)
    # exact: the teacher's first 30 columns are the student's logits, the same float32 log-softmax, terms 0
    assert torch.allclose(token_loss("kd", student, ids, teacher), torch.zeros(2), atol=1e-6)
    shifted = teacher.clone()
    shifted[..., 3] += 2.0
    assert (token_loss("kd", student, ids, shifted) > 1e-3).all()


@pytest.mark.parametrize("objective", ["kd", "lm"])
def test_losses_in_token_chunks_equal_one_pass_with_gradients(objective, monkeypatch):
    """The chunked, checkpointed loss gives the one-pass loss and gradient (float64 autograd reference)."""
    import rechannel.ops.recover.training as training

    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 7, 13, generator=g) * 3).requires_grad_(True)
    teacher = torch.randn(3, 7, 13, generator=g) * 3
    ids = torch.randint(0, 13, (3, 7), generator=g)
    monkeypatch.setattr(training, "TOKEN_CHUNK", 4)  # 21 tokens: chunks of 4, the last of 1
    (grad,) = torch.autograd.grad(token_loss(objective, logits, ids, teacher).sum(), logits)
    z = logits.detach().double().requires_grad_(True)
    if objective == "kd":
        pt = teacher.double().softmax(-1)
        ref = (pt * (pt.log() - z.log_softmax(-1))).sum(-1).mean(1)
    else:
        ref = -z.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(1)
    (want,) = torch.autograd.grad(ref.sum(), z)
    rtol, atol = _loss_tolerance(objective, logits, teacher)
    loss = token_loss(objective, logits, ids, teacher).double()
    torch.testing.assert_close(loss, ref.detach(), rtol=rtol, atol=atol)
    # ∂/∂z = (softmax(z) − target) / T in float32: the softmax off by e relative, the Σ of the V upstream
    # gradients by (V + 1)·u, the target p_t by e: ≤ (2e + (V + 2)·u) / (T − 1)
    e = log_softmax_error(13, max(logits.abs().max().item(), teacher.abs().max().item()))
    torch.testing.assert_close(grad.double(), want, rtol=2 * U32, atol=(2 * e + 15 * U32) / 6)

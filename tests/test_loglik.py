"""Shared-context scoring against plain per-choice scoring in float64, and lm-evaluation-harness's split."""

from __future__ import annotations

import copy

import pytest
import torch

from rechannel.ops.loglik import ScoreUnit, encode_pair, score_units
from rechannel.ops.models import load_model


def _plain_score(model64, ids_ctx, ids_cont, soft=None):
    """What the harness does: run context+continuation whole, sum log p of the continuation tokens."""
    ids = torch.tensor([list(ids_ctx) + list(ids_cont)])
    embeds = model64.get_input_embeddings()(ids)
    if soft is not None:
        embeds = torch.cat([soft.double()[None], embeds], 1)
    logits = model64(inputs_embeds=embeds).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits, -1)
    start = len(ids_ctx) + (0 if soft is None else soft.shape[0]) - 1
    pos = torch.arange(start, start + len(ids_cont))
    target = torch.tensor(ids_cont)
    greedy = bool((logits[pos].argmax(-1) == target).all())
    return logp[pos, target].sum().item(), greedy


@pytest.fixture(scope="module")
def models(tiny_model):
    lm = load_model(str(tiny_model), device="cpu")
    return lm, copy.deepcopy(lm.model).double()


def _units(lm, prompt=None):
    tok = lm.tokenizer
    examples = [
        ("Question: what is two plus two?\nAnswer:", [" four", " five.", " the capital of France"]),
        ("The capital of", [" France is Paris", " Italy"]),
        ("A quick brown fox jumps over the lazy dog; pack my box", [" with", " with five dozen liquor jugs."]),
        ("Compression ", ["removes weights", "prompts"]),  # trailing space moves into the continuation
    ]
    units = []
    for ctx, choices in examples:
        pairs = [encode_pair(tok, ctx, c) for c in choices]
        assert all(p[0] == pairs[0][0] for p in pairs)
        units.append(ScoreUnit(tuple(pairs[0][0]), tuple(tuple(p[1]) for p in pairs), prompt))
    return units


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_context_scores_equal_plain_per_choice_scoring(models, batch_size):
    lm, model64 = models
    units = _units(lm)
    got = score_units(lm.model, units, batch_size, pad_id=lm.tokenizer.pad_token_id)
    for unit, scores in zip(units, got, strict=True):
        for cont, s in zip(unit.continuations, scores, strict=True):
            want, greedy = _plain_score(model64, unit.context, cont)
            assert s.loglik == pytest.approx(want, abs=1e-5)
            assert s.greedy == greedy and s.tokens == len(cont)


def test_soft_prompt_goes_in_front_of_every_context(models):
    lm, model64 = models
    bank = torch.randn(3, 4, lm.model.config.hidden_size) * 0.5  # (K, P, d)
    units = _units(lm, prompt=2)
    got = score_units(lm.model, units, 4, prompts=bank, pad_id=lm.tokenizer.pad_token_id)
    for unit, scores in zip(units, got, strict=True):
        for cont, s in zip(unit.continuations, scores, strict=True):
            assert s.loglik == pytest.approx(_plain_score(model64, unit.context, cont, bank[2])[0], abs=1e-5)


def test_a_greedy_continuation_is_recognised(models):
    lm, _ = models
    ctx = tuple(lm.tokenizer("The capital of France", add_special_tokens=False).input_ids)
    generated = lm.model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False,
                                  pad_token_id=lm.tokenizer.pad_token_id)[0, len(ctx):].tolist()
    other = [(generated[0] + 1) % lm.model.config.vocab_size] + generated[1:]
    scores = score_units(lm.model, [ScoreUnit(ctx, (tuple(generated), tuple(other)))], 1)[0]
    assert scores[0].greedy and not scores[1].greedy and scores[0].loglik > scores[1].loglik


def test_encode_pair_follows_the_harness(models):
    lm, _ = models
    tok = lm.tokenizer
    ctx, cont = encode_pair(tok, "The capital of ", "France")
    whole = tok("The capital of France", add_special_tokens=False).input_ids
    assert ctx == tok("The capital of", add_special_tokens=False).input_ids and ctx + cont == whole
    ctx, cont = encode_pair(tok, "", " Paris")
    assert ctx == [tok.bos_token_id] and cont == tok(" Paris", add_special_tokens=False).input_ids

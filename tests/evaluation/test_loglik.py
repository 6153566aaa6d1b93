"""Shared-context scoring against plain per-choice scoring in float64, and lm-evaluation-harness's split."""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import log_softmax_error, logit_bound, logit_error

from rechannel.ops.core.models import load_model
from rechannel.ops.evaluation.loglik import ScoreUnit, encode_pair, score_units, share_prefix


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


EXAMPLES = [  # (contexts, continuations): shared contexts, then WinoGrande-like partial scoring
    (["Question: what is two plus two?\nAnswer:"] * 3, [" four", " five.", " the capital of France"]),
    (["The capital of"] * 2, [" France is Paris", " Italy"]),
    (["A quick brown fox jumps over the lazy dog; pack my box"] * 2, [" with", " with five dozen liquor jugs."]),
    (["Compression "] * 2, ["removes weights", "prompts"]),  # trailing space moves into the continuation
    (["The capital of France is Paris so Paris", "The capital of France is Paris so Rome"], [" is big."] * 2),
    (["Paris is", "Rome is"], [" a capital"] * 2),  # nothing shared: one unit per request
]


def _requests(lm, prompt=None):
    """Per example: the units, and each choice's (context ids, continuation ids, unit, row)."""
    out = []
    for contexts, conts in EXAMPLES:
        pairs = [encode_pair(lm.tokenizer, c, k) for c, k in zip(contexts, conts, strict=True)]
        units, where = share_prefix(pairs, prompt)
        out.append((units, [(c, k, u, r) for (c, k), (u, r) in zip(pairs, where, strict=True)]))
    return out


def _check(lm, model64, batch_size, bank=None, prompt=None):
    requests = _requests(lm, prompt)
    units = [u for us, _ in requests for u in us]
    got = score_units(lm.model, units, batch_size, prompts=bank, pad_id=lm.tokenizer.pad_token_id)
    offset = 0
    vocab, zmax = lm.model.config.vocab_size, logit_bound(lm.model)
    for us, choices in requests:
        for ctx, cont, u, r in choices:
            s = got[offset + u][r]
            want, greedy = _plain_score(model64, ctx, cont, None if bank is None else bank[prompt])
            # float32 forward against float64: each logit within logit_error of exact (tests/tolerances.py),
            # moving a log-prob by twice that, plus the float32 log-softmax's own error, per scored token
            keys = len(ctx) + len(cont) + (0 if bank is None else bank.shape[1])
            tol = len(cont) * (2 * logit_error(lm.model, keys) + log_softmax_error(vocab, zmax))
            assert s.loglik == pytest.approx(want, abs=tol) and s.tokens == len(cont)
            assert s.greedy == greedy
        offset += len(us)
    return requests


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_prefix_scores_equal_plain_per_choice_scoring(models, batch_size):
    lm, model64 = models
    requests = _check(lm, model64, batch_size)
    assert [len(us) for us, _ in requests] == [1, 1, 1, 1, 1, 2]  # shared where anything is shared
    wino = requests[4][0][0]
    assert len(wino.prefix) < len(requests[4][1][0][0]) and wino.scored == (len(requests[4][1][0][1]),) * 2


def test_soft_prompt_goes_in_front_of_every_context(models):
    lm, model64 = models
    bank = torch.randn(3, 4, lm.model.config.hidden_size) * 0.5  # (K, P, d)
    _check(lm, model64, 4, bank, prompt=2)


def test_a_greedy_continuation_is_recognised(models):
    lm, _ = models
    ctx = tuple(lm.tokenizer("The capital of France", add_special_tokens=False).input_ids)
    generated = lm.model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False,
                                  pad_token_id=lm.tokenizer.pad_token_id)[0, len(ctx):].tolist()
    other = [(generated[0] + 1) % lm.model.config.vocab_size] + generated[1:]
    scores = score_units(lm.model, [ScoreUnit(ctx, (tuple(generated), tuple(other)), (3, 3))], 1)[0]
    assert scores[0].greedy and not scores[1].greedy and scores[0].loglik > scores[1].loglik


def test_encode_pair_follows_the_harness(models):
    lm, _ = models
    tok = lm.tokenizer
    ctx, cont = encode_pair(tok, "The capital of ", "France")
    whole = tok("The capital of France", add_special_tokens=False).input_ids
    assert ctx == tok("The capital of", add_special_tokens=False).input_ids and ctx + cont == whole
    ctx, cont = encode_pair(tok, "", " Paris")
    assert ctx == [tok.bos_token_id] and cont == tok(" Paris", add_special_tokens=False).input_ids

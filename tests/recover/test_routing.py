"""Routing against a naive eager computation of the same definitions, on a tiny model."""

from __future__ import annotations

import pytest
import torch
from tolerances import U32, attention_mass_error, entropy_error, log_softmax_error, logit_bound, logit_error

from rechannel.ops.core.errors import UserError
from rechannel.ops.core.models import load_model
from rechannel.ops.recover.routing import (
    attention_scores,
    bank_kv,
    eager_attention,
    entropy_scores,
    parse_layers,
    prompted_logits,
    route,
    route_rows,
)

M, P = 3, 5


def _mass_tolerance(model, keys: int, tokens: int) -> float:
    """Two float32 computations of a routing score by different paths (shapes, masks, caches): each attention
    mass within attention_mass_error of exact (the last layer the worse), plus the float32 Σ over a prompt's
    P keys, the mean over heads, the Σ over ≤ `tokens` tokens, the divisions and the layers' sum."""
    heads = model.config.num_attention_heads
    return 2 * attention_mass_error(model, model.config.num_hidden_layers - 1, keys) \
        + (P + heads + tokens + 4) * U32


def _entropy_tolerance(model, logp: torch.Tensor, keys: int, tokens: int, sides: int) -> float:
    """Entropy scores from two forwards by different paths, whose logits are each within logit_error of
    exact, `sides` of them computed in float32 (the log-softmax's own error, the Σ over the vocabulary and
    the mean over ≤ `tokens` tokens: entropy_error); `logp`: float64 log-probs of those logits."""
    vocab = model.config.vocab_size
    e = log_softmax_error(vocab, logit_bound(model))
    return entropy_error(logp, 2 * logit_error(model, keys), sides * e, sides * (vocab + tokens + 3))


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def bank():
    torch.manual_seed(1)
    return torch.randn(M, P, 64)


def _batch():
    """Two inputs, the second right-padded: ids (2, 7), mask (2, 7)."""
    torch.manual_seed(2)
    ids = torch.randint(3, 300, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


def naive_scores(model, bank, ids, mask, layers):
    """The definition, spelled out: one sequence [prompt 1, ..., prompt M, input] as embeddings, a
    hand-built mask (each prompt causal within itself only; the input sees all prompts and its own
    past), positions 0..P-1 for every prompt and P.. for the input; attention weights read from eager
    attention; mass on each prompt's keys averaged over heads, real input tokens and layers."""
    b, t = ids.shape
    embeds = torch.cat([bank.reshape(1, M * P, -1).expand(b, -1, -1), model.get_input_embeddings()(ids)], 1)
    s = M * P + t
    allow = torch.zeros(b, s, s, dtype=torch.bool)
    for k in range(M):
        allow[:, k * P:(k + 1) * P, k * P:(k + 1) * P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
    allow[:, M * P:, :M * P] = True
    allow[:, M * P:, M * P:] = torch.tril(torch.ones(t, t, dtype=torch.bool)) & mask.bool()[:, None, :]
    allow |= torch.eye(s, dtype=torch.bool)  # padded rows see themselves (their scores are not used)
    additive = torch.zeros(b, 1, s, s).masked_fill(~allow[:, None], torch.finfo(torch.float32).min)
    positions = torch.cat([torch.arange(P).repeat(M), P + torch.arange(t)]).expand(b, -1)
    weights = []
    hooks = [blk.self_attn.register_forward_hook(lambda m, a, o: weights.append(o[1].double()))
             for blk in model.model.layers]
    with torch.no_grad(), eager_attention(model):
        model(inputs_embeds=embeds, attention_mask=additive, position_ids=positions)
    for h in hooks:
        h.remove()
    out = torch.zeros(b, M, dtype=torch.float64)
    for i in layers:
        mass = weights[i][:, :, M * P:, :M * P].reshape(b, -1, t, M, P).sum(-1).mean(1)  # (B, T, M)
        out += (mass * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return out / len(layers)


@pytest.mark.parametrize("layers", [[0, 1], [0], [1]])
def test_cached_one_pass_scores_equal_the_naive_computation(lm, bank, layers):
    ids, mask = _batch()
    got = attention_scores(lm.model, bank_kv(lm.model, bank), ids, mask, layers)
    tol = _mass_tolerance(lm.model, M * P + ids.shape[1], ids.shape[1])  # cached pass vs one long sequence
    want = naive_scores(lm.model, bank, ids, mask, layers)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    assert got.shape == (2, M) and (got > 0).all() and (got.sum(1) < 1).all()


def test_prompt_through_the_cache_equals_prompt_as_embeddings(lm, bank):
    ids, mask = _batch()
    rows = torch.tensor([2, 0])
    got = prompted_logits(lm.model, bank_kv(lm.model, bank), rows, ids, mask)
    embeds = torch.cat([bank[rows], lm.model.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1)
    with torch.no_grad():
        want = lm.model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, P:]
    real = mask.bool()  # two float32 forwards (cached prompt, prompt as embeddings): each within logit_error
    tol = 2 * logit_error(lm.model, P + ids.shape[1])
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=tol)


def test_entropy_route_picks_the_least_uncertain_prompt(lm, bank):
    ids, mask = _batch()
    kv = bank_kv(lm.model, bank)
    got = entropy_scores(lm.model, kv, ids, mask)
    for k in range(M):
        embeds = torch.cat([bank[k].expand(2, -1, -1), lm.model.get_input_embeddings()(ids)], 1)
        full_mask = torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1)
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, P:].double(), -1)
        entropy = -(logp.exp() * logp).sum(-1)
        want = (entropy * mask).sum(1) / mask.sum(1)
        tol = _entropy_tolerance(lm.model, logp[mask.bool()], P + ids.shape[1], ids.shape[1], sides=1)
        torch.testing.assert_close(got[:, k].double(), want, rtol=0, atol=tol)
    chosen, scores = route(lm.model, kv, ids, mask, "entropy", [0])
    assert torch.equal(chosen, got.argmin(1)) and torch.equal(scores, got)


def test_attention_route_is_the_argmax_and_attention_is_restored(lm, bank):
    ids, mask = _batch()
    before = lm.model.config._attn_implementation
    chosen, scores = route(lm.model, bank_kv(lm.model, bank), ids, mask, "attention", [0, 1])
    assert torch.equal(chosen, scores.argmax(1))
    assert lm.model.config._attn_implementation == before


def test_parse_layers():
    assert parse_layers("first", 30) == [0, 1, 2, 3]
    assert parse_layers("first", 2) == [0]
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("2:5", 30) == [2, 3, 4]
    assert parse_layers("7,3,3", 30) == [3, 7]
    for bad in ("30", "x", "5:2", "-1"):
        with pytest.raises(UserError, match="--layers"):
            parse_layers(bad, 30)


def test_prefix_attention_equals_transformers_attention_weights(lm, bank):
    from rechannel.ops.recover.routing import prefix_attention

    ids, mask = _batch()
    soft = bank[[0, 2]]  # (2, P, d)
    got = prefix_attention(lm.model, ids, mask, soft)
    # the same eager forward on the same inputs on both sides: identical weights, reduced in float32 there
    # (Σ over P keys, mean over heads, Σ over the B·T tokens, the division) and in float64 here
    heads, tokens = lm.model.config.num_attention_heads, ids.numel()
    embeds = torch.cat([soft, lm.model.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1)
    with torch.no_grad(), eager_attention(lm.model):
        out = lm.model(inputs_embeds=embeds, attention_mask=full_mask, output_attentions=True)
    for layer, w in enumerate(out.attentions):  # (B, H, P+T, P+T)
        mass = w[:, :, P:, :P].double().sum(-1).mean(1)  # (B, T)
        want = (mass * mask).sum() / mask.sum()
        assert got[layer].item() == pytest.approx(want.item(), abs=(P + heads + tokens + 2) * U32)
    plain = prefix_attention(lm.model, ids, mask)  # no prompt: the mass on the first token
    with torch.no_grad(), eager_attention(lm.model):
        out = lm.model(input_ids=ids, attention_mask=mask, output_attentions=True)
    want = [((w[:, :, :, 0].double().mean(1) * mask).sum() / mask.sum()).item() for w in out.attentions]
    assert plain.tolist() == pytest.approx(want, abs=(heads + tokens + 2) * U32)  # one key: no Σ over P


@pytest.mark.parametrize("by", ["attention", "entropy"])
def test_rows_routed_in_padded_batches_equal_rows_routed_alone(lm, bank, by):
    """route_rows sorts rows by length and pads each batch; every row's scores equal its scores alone and
    come back in input order."""
    torch.manual_seed(3)
    rows = [torch.randint(3, 300, (n,)).tolist() for n in (9, 2, 6, 1, 7, 4, 3)]
    kv = bank_kv(lm.model, bank)
    seen = []
    got = route_rows(lm.model, kv, rows, by, [0, 1], batch_size=3, advance=seen.append)
    assert seen == [3, 3, 1]
    for row, (k, scores) in zip(rows, got, strict=True):
        ids = torch.tensor([row])
        chosen, want = route(lm.model, kv, ids, torch.ones_like(ids), by, [0, 1])
        assert k == int(chosen[0])
        longest = max(map(len, rows))  # padded batches of 3 against one row alone
        if by == "attention":
            tol = _mass_tolerance(lm.model, M * P + longest, longest)
        else:
            logp = torch.cat([torch.log_softmax(prompted_logits(lm.model, kv, torch.tensor([j]), ids,
                                                                torch.ones_like(ids)).double(), -1)
                              for j in range(M)])
            tol = _entropy_tolerance(lm.model, logp, P + longest, longest, sides=2)
        torch.testing.assert_close(torch.tensor(scores), want[0], rtol=0, atol=tol)

"""Calibration windows and statistics against direct, independent computations."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import make_docs
from rechannel.ops.compress.calibration import calibrate
from rechannel.ops.core.blocks import decoder_blocks, linear_layers
from rechannel.ops.core.errors import UserError
from rechannel.ops.core.models import load_model
from rechannel.ops.core.windows import draw_windows


def reference_windows(texts, tokenizer, nsamples, seqlen, seed):
    """The reference loaders' loop, literally: tokenize on every draw, keep docs longer than seqlen."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            enc = tokenizer(texts[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(out)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(str(tiny_model), device="cpu")


def test_windows_are_drawn_exactly_as_the_reference(tiny):
    texts = make_docs()
    for seed in (0, 3):
        got = draw_windows(texts, tiny.tokenizer, 9, 48, seed)
        assert torch.equal(got, reference_windows(texts, tiny.tokenizer, 9, 48, seed))


def test_no_document_long_enough_is_a_user_error(tiny):
    with pytest.raises(UserError, match="longer than --seqlen 4096"):
        draw_windows(make_docs(), tiny.tokenizer, 4, 4096, 0)


def _layer_inputs(model, windows, batch=1):
    """Every Linear's inputs, window by window: {layer key: [(T, d_in) per window]}, from plain forwards of
    `batch` windows at a time."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(decoder_blocks(model)):
        for name, layer in linear_layers(block).items():
            key = f"layers.{i}.{name}"
            handles.append(layer.register_forward_pre_hook(
                lambda mod, args, key=key: seen.setdefault(key, []).extend(args[0].unbind(0))))
    with torch.no_grad():
        for w in windows.split(batch):
            model(w)
    for h in handles:
        h.remove()
    return seen


def test_statistics_equal_a_direct_float64_computation(tiny):
    windows = draw_windows(make_docs(), tiny.tokenizer, 6, 32, 0)
    result = calibrate(tiny.model, windows, r"(self_attn|mlp)\.", hessian=True, batch_size=4)
    seen = _layer_inputs(tiny.model, windows, batch=4)  # calibrate's batches: the very same float32 inputs
    assert set(result.stats) == set(seen) and result.tokens == windows.numel()
    # float32 running means: per window a Σ (or matmul) over T tokens, the scalings and the update, then n
    # rescalings by n/(n+1): ≤ (T + 3n + 4)·u relative to the Σ of |terms| (all terms positive for sqnorm)
    gamma = (windows.shape[1] + 3 * len(windows) + 4) * 2**-24
    for key, xs in seen.items():
        x = torch.cat(xs).double()  # (N*T, d_in)
        s = result.stats[key]
        n = len(windows)  # the reference divides by windows, not tokens
        torch.testing.assert_close(s.sqnorm.double(), (x * x).sum(0) / n, rtol=gamma, atol=0)
        bound = gamma * 2 * x.abs().t() @ x.abs() / n  # k·u·|x||x| for each entry of H, k = T + 3n + 4
        assert ((s.hessian.double() - 2 * x.t() @ x / n).abs() <= bound).all(), key
        assert s.tokens == x.shape[0] and s.windows == n


def test_statistics_are_the_reference_running_means_bit_for_bit(tiny):
    """The published update, one window at a time in float32: scale the old mean by n/(n+1), then add
    ||x_j||^2/(n+1) (Wanda) and (sqrt(2/(n+1)) x)^T (sqrt(2/(n+1)) x) (GPTQ / SparseGPT)."""
    windows = draw_windows(make_docs(), tiny.tokenizer, 5, 24, 2)
    result = calibrate(tiny.model, windows, r"(self_attn|mlp)\.", hessian=True, batch_size=1)
    for key, xs in _layer_inputs(tiny.model, windows).items():
        d = xs[0].shape[1]
        scaler, h = torch.zeros(d), torch.zeros(d, d)
        for n, x in enumerate(xs):
            inp = x.t().float()  # (d_in, T)
            scaler *= n / (n + 1)
            h *= n / (n + 1)
            scaler += torch.norm(inp, p=2, dim=1) ** 2 / (n + 1)
            inp = math.sqrt(2 / (n + 1)) * inp
            h += inp.matmul(inp.t())
        assert torch.equal(result.stats[key].sqnorm, scaler), key
        assert torch.equal(result.stats[key].hessian, h), key


def test_targets_choose_layers_and_a_bad_regex_is_refused(tiny):
    windows = draw_windows(make_docs(), tiny.tokenizer, 2, 16, 0)
    result = calibrate(tiny.model, windows, r"mlp\.down", hessian=False)
    assert sorted(result.stats) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(UserError, match="matches no Linear"):
        calibrate(tiny.model, windows, "nothing_here", hessian=False)
    with pytest.raises(UserError, match="not a valid regular expression"):
        calibrate(tiny.model, windows, "(", hessian=False)


def test_layers_fed_the_same_input_share_statistics_stored_once(tiny):
    from rechannel.ops.compress.calibration import stats_from_tensors, stats_to_tensors

    windows = draw_windows(make_docs(), tiny.tokenizer, 3, 32, 0)
    result = calibrate(tiny.model, windows, r"(self_attn|mlp)\.", hessian=True)
    st = result.stats
    for i in (0, 1):
        assert st[f"layers.{i}.self_attn.q_proj"] is st[f"layers.{i}.self_attn.k_proj"] is st[f"layers.{i}.self_attn.v_proj"]
        assert st[f"layers.{i}.mlp.gate_proj"] is st[f"layers.{i}.mlp.up_proj"]
        assert st[f"layers.{i}.self_attn.o_proj"] is not st[f"layers.{i}.self_attn.q_proj"]
        assert st[f"layers.{i}.mlp.down_proj"] is not st[f"layers.{i}.mlp.up_proj"]
        assert st[f"layers.{i}.self_attn.q_proj"].tokens == windows.numel()  # counted once, not three times
    tensors, aliases = stats_to_tensors(result, windows)
    assert aliases["layers.0.self_attn.v_proj"] == "layers.0.self_attn.q_proj"
    assert "layers.0.self_attn.k_proj.hessian" not in tensors and len(aliases) == 6
    back = stats_from_tensors(tensors, windows, aliases)
    assert set(back) == set(st)
    for key in st:
        assert torch.equal(back[key].hessian, st[key].hessian) and torch.equal(back[key].sqnorm, st[key].sqnorm)
        assert (back[key].windows, back[key].tokens) == (st[key].windows, st[key].tokens)

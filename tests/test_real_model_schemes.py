"""Every compressed-tensors scheme rechannel writes, on the real default model, through plain transformers.

Minutes per scheme on a CPU (one GPTQ pass per format, two 16x512 perplexities), so these are `heavy`:
`make test-heavy` runs them, `make test` does not. The fast suite covers the same schemes at g128 on a tiny
Llama and the default model with RTN 4-bit g64 (tests/test_real_model.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import max_logit_gap_with_transformers, run_cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIB = DATA / "calibration" / "c4_en_train00000_first1000.jsonl"

# SmolLM2's 576-wide layers hold groups of 64, not 128 (compressed-tensors needs groups that divide the width).
SCHEMES = {
    "gptq-asym-g64": dict(method="gptq", bits=4, group_size=64),
    "gptq-sym-g64": dict(method="gptq", bits=4, group_size=64, sym=True),
    "gptq-act-order-static-g64": dict(method="gptq", bits=4, group_size=64, act_order=True, static_groups=True),
    "rtn-8bit-per-channel": dict(method="rtn", bits=8, group_size=-1),
}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The default model prepared once and its Hessians from 8 C4 windows of 256 tokens (one-shot GPTQ)."""
    if not CALIB.is_file():
        pytest.skip(f"the shared data is not at {DATA}")
    from rechannel import CalibrateConfig, calibrate

    tmp = tmp_path_factory.mktemp("schemes")
    cache = tmp / "cache"
    r = run_cli("models", "prepare", "smollm2-135m", env={"RECHANNEL_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    stats = tmp / "stats.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECHANNEL_CACHE", str(cache))
        calibrate(CalibrateConfig(data=str(CALIB), output=str(stats), docs="0:500", samples=8, seqlen=256,
                                  hessian=True, device="cpu"))
    return tmp, cache, stats


def _ppl(model_dir: Path, loader: str) -> float:
    from rechannel import EvalConfig, evaluate

    doc = evaluate(EvalConfig(tasks="wikitext2", data_dir=str(DATA), seqlen=512, limit=16, model=str(model_dir),
                              device="cpu", dtype="float32", loader=loader))
    return doc["results"]["wikitext2"]["ppl,none"]


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_loads_in_transformers_with_the_packed_models_perplexity(calibrated, scheme, monkeypatch):
    """transformers' logits on a 64-token text equal rechannel's load of the same directory (<= 1e-3 in
    float32), and its WikiText-2 perplexity (16 windows of 512) equals rechannel's packed model's to 0.1%."""

    from rechannel import CompressConfig, compress

    tmp, cache, stats = calibrated
    monkeypatch.setenv("RECHANNEL_CACHE", str(cache))
    dirs = {fmt: tmp / f"{scheme}-{fmt}" for fmt in ("compressed-tensors", "packed")}
    for fmt, out in dirs.items():
        compress(CompressConfig(str(out), stats=str(stats), format=fmt, device="cpu", **SCHEMES[scheme]))
    ct = dirs["compressed-tensors"]
    assert '"quant_method": "compressed-tensors"' in (ct / "config.json").read_text()

    assert max_logit_gap_with_transformers(ct) <= 1e-3

    packed, transformers = _ppl(dirs["packed"], "rechannel"), _ppl(ct, "transformers")
    print(f"{scheme}: WikiText-2 16x512 ppl packed/rechannel {packed!r}, compressed-tensors/transformers "
          f"{transformers!r}")
    assert abs(transformers - packed) <= 1e-3 * packed, (packed, transformers)

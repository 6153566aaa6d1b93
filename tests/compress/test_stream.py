"""compress --stream and calibrate --stream against the in-memory path: byte-identical directories and files
(sharded sources and sharded outputs, tied and untied heads, every protocol), one block in memory at a time,
a run interrupted between blocks resumed where it stopped, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama, run_cli
from rechannel.ops.compress import streaming
from rechannel.ops.compress.api import CalibrateConfig, CompressConfig, calibrate, compress
from rechannel.ops.core import ctformat, models
from rechannel.ops.core.errors import UserError

CALIB = {"samples": 4, "seqlen": 32}


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory) -> Path:
    """A 3-block Llama in shards of at most 40 KB, its MLP 128 wide (groups of 32 divide every layer)."""
    return make_tiny_llama(tmp_path_factory.mktemp("sharded") / "model", layers=3, intermediate=128, shard="40KB")


@pytest.fixture()
def small_shards(monkeypatch):
    """Outputs split into several shards too (with their index), as a large model's are."""
    monkeypatch.setattr(models, "SHARD_SIZE", "60KB")
    monkeypatch.setattr(ctformat, "SHARD_BYTES", 40_000)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _timeless(doc: dict) -> dict:
    doc = {k: v for k, v in json.loads(json.dumps(doc)).items() if k not in ("seconds", "timing", "output")}
    doc["layers"] = [{k: v for k, v in r.items() if k != "seconds"} for r in doc["layers"]]
    return doc


def _both(tmp_path: Path, model: Path, **options) -> tuple[dict, dict]:
    """Compress in memory and streamed with the same options; (report, report)."""
    reports = []
    for stream in (False, True):
        out = tmp_path / ("stream" if stream else "memory")
        reports.append(compress(CompressConfig(str(out), model=str(model), device="cpu", stream=stream, **options)))
    return reports[0], reports[1]


CASES = {
    "wanda dense": {"method": "wanda", "sparsity": 0.5},
    "gptq 4-bit compressed-tensors": {"method": "gptq", "bits": 4, "group_size": 32},
    "gptq 4-bit sym true-sequential, dense": {"method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                              "true_sequential": True, "format": "dense"},
    "sparsegpt 2:4 + 8-bit": {"method": "sparsegpt", "pattern": "2:4", "bits": 8, "group_size": -1},
}


@pytest.mark.parametrize("case", list(CASES))
def test_stream_writes_the_same_bytes_as_in_memory(sharded_model, docs_file, tmp_path, small_shards, case):
    memory, streamed = _both(tmp_path, sharded_model, calib=str(docs_file), **CALIB, **CASES[case])
    a, b = _files(tmp_path / "memory"), _files(tmp_path / "stream")
    assert list(a) == list(b)
    assert len([n for n in a if n.endswith(".safetensors")]) > 1  # the output is sharded, with its index
    assert [n for n in a if a[n] != b[n]] == []
    assert _timeless(memory) == _timeless(streamed)
    assert not (tmp_path / "stream.partial").exists()  # the spool is gone once the output is in place


def test_stream_one_shot_and_tied_head(docs_file, tmp_path):
    """One-shot from a statistics file (SparseGPT with Hessians), magnitude without data, and sequential Wanda
    (which reads the embeddings for the first block's inputs), on a model whose lm_head is its embedding matrix
    (saved once, as save_pretrained saves it)."""
    model = make_tiny_llama(tmp_path / "tied", layers=2, tie=True, shard="30KB")
    (model / "generation_config.json").unlink()  # as the default model's converted directory: from config.json
    stats = tmp_path / "stats.safetensors"
    calibrate(CalibrateConfig(str(docs_file), str(stats), hessian=True, model=str(model), device="cpu", **CALIB))
    runs = {"sgpt": {"method": "sparsegpt", "stats": str(stats)}, "mag": {"method": "magnitude"},
            "wanda": {"method": "wanda", "calib": str(docs_file), **CALIB}}  # the embeddings read, then dropped
    for name, options in runs.items():
        _both(tmp_path / name, model, **options)
        a, b = _files(tmp_path / name / "memory"), _files(tmp_path / name / "stream")
        assert list(a) == list(b) and [n for n in a if a[n] != b[n]] == []
    from safetensors import safe_open
    with safe_open(str(tmp_path / "mag" / "stream" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


def test_calibrate_stream_writes_the_same_file(sharded_model, docs_file, tmp_path):
    out = {}
    for stream in (False, True):
        out[stream] = tmp_path / f"{stream}.safetensors"
        calibrate(CalibrateConfig(str(docs_file), str(out[stream]), hessian=True, model=str(sharded_model),
                                  device="cpu", stream=stream, **CALIB))
    assert out[True].read_bytes() == out[False].read_bytes()


def test_one_block_in_memory_at_a_time(sharded_model, docs_file, tmp_path, monkeypatch):
    """While a block is compressed every other block's weights are on the meta device (not allocated)."""
    seen = []
    real = streaming.sequential_block

    def spy(block, i, inputs, cfg, report, paths):
        model = block_owner[0]
        blocks = model.model.layers
        seen.append([not any(p.is_meta for p in b.parameters()) for b in blocks])
        assert model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta
        return real(block, i, inputs, cfg, report, paths)

    block_owner = []
    real_load = streaming.load_streamed

    def load(*args, **kwargs):
        sm = real_load(*args, **kwargs)
        block_owner.append(sm.model)
        return sm

    monkeypatch.setattr(streaming, "sequential_block", spy)
    monkeypatch.setattr(streaming, "load_streamed", load)
    compress(CompressConfig(str(tmp_path / "out"), method="wanda", calib=str(docs_file), model=str(sharded_model),
                            device="cpu", stream=True, **CALIB))
    assert seen == [[True, False, False], [False, True, False], [False, False, True]]


class _Killed(Exception):
    pass


def _kill_after(blocks: int):
    """A progress callback that stops the run once `blocks` blocks are done, as a kill between blocks."""
    done = []

    def progress(stage, advance=0, total=None, note=None):
        done.append(advance)
        if sum(done) >= blocks:
            raise _Killed

    return progress


def test_a_killed_run_resumes_at_its_first_unfinished_block(sharded_model, docs_file, tmp_path, monkeypatch):
    options = {"method": "gptq", "bits": 4, "group_size": 32, "calib": str(docs_file), "model": str(sharded_model),
               "device": "cpu", **CALIB}
    memory = compress(CompressConfig(str(tmp_path / "memory"), **options))
    config = CompressConfig(str(tmp_path / "stream"), stream=True, **options)
    with pytest.raises(_Killed):
        compress(config, progress=_kill_after(2))
    spool = tmp_path / "stream.partial"
    assert sorted(p.name for p in spool.glob("block-*")) == ["block-00000.safetensors", "block-00001.safetensors"]
    assert not (tmp_path / "stream").exists()  # no half-written output
    ran = []
    real = streaming.sequential_block
    monkeypatch.setattr(streaming, "sequential_block", lambda block, i, *a: ran.append(i) or real(block, i, *a))
    resumed = compress(config)
    assert ran == [2]  # only the unfinished block was compressed again
    assert _files(tmp_path / "memory") == _files(tmp_path / "stream")
    assert _timeless(memory) == _timeless(resumed)
    assert not spool.exists()


def test_a_spool_without_its_inputs_starts_over(sharded_model, docs_file, tmp_path):
    options = {"method": "wanda", "calib": str(docs_file), "model": str(sharded_model), "device": "cpu", **CALIB}
    compress(CompressConfig(str(tmp_path / "memory"), **options))
    config = CompressConfig(str(tmp_path / "stream"), stream=True, **options)
    with pytest.raises(_Killed):
        compress(config, progress=_kill_after(1))
    (tmp_path / "stream.partial" / "inputs.safetensors").unlink()
    compress(config)
    assert _files(tmp_path / "memory") == _files(tmp_path / "stream")


def test_a_spool_of_other_options_is_refused(sharded_model, docs_file, tmp_path):
    options = {"method": "wanda", "calib": str(docs_file), "model": str(sharded_model), "device": "cpu",
               "stream": True, **CALIB}
    with pytest.raises(_Killed):
        compress(CompressConfig(str(tmp_path / "out"), **options), progress=_kill_after(1))
    with pytest.raises(UserError, match=r"out.partial holds a killed run with other options \(sparsity: None, now 0.6\)"):
        compress(CompressConfig(str(tmp_path / "out"), sparsity=0.6, **{**options}))


@pytest.mark.parametrize("flags, message", [
    (["--method", "gptq", "--bits", "3"], "--stream writes compressed-tensors or dense directories"),
    (["--method", "gptq", "--bits", "4", "--group-size", "48"], r"has 64 inputs, --group-size 48\)$"),
])
def test_stream_refuses_what_it_cannot_write(sharded_model, docs_file, tmp_path, flags, message):
    r = run_cli("compress", "--model", str(sharded_model), "--device", "cpu", *flags, "--calib", str(docs_file),
                "--samples", "4", "--seqlen", "32", "--stream", "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stdout == b""
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    import re
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_stream_refuses_a_quantized_source(sharded_model, docs_file, tmp_path):
    packed = tmp_path / "ct"
    compress(CompressConfig(str(packed), method="rtn", bits=4, group_size=32, model=str(sharded_model), device="cpu"))
    with pytest.raises(UserError, match="--stream compresses float checkpoints; this one is already quantized"):
        compress(CompressConfig(str(tmp_path / "again"), method="magnitude", model=str(packed), device="cpu",
                                stream=True))


def test_streamed_output_loads_and_runs_as_the_in_memory_one(sharded_model, docs_file, tmp_path):
    """The streamed directory is a model: rechannel loads it, and it gives the in-memory output's logits."""
    _both(tmp_path, sharded_model, method="gptq", bits=4, group_size=32, calib=str(docs_file), **CALIB)
    ids = torch.arange(1, 20).view(1, -1)
    logits = [models.load_model(str(tmp_path / d), device="cpu", dtype="float32").model(ids).logits
              for d in ("memory", "stream")]
    assert torch.equal(logits[0], logits[1])

"""The calibrate and compress Python API: what it returns and writes is what the CLI prints and writes for the
same options; options are refused before the model loads; progress reaches the callback once per block."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from rechannel.ops.compress.api import CalibrateConfig, CompressConfig, calibrate, compress
from rechannel.ops.core.errors import UserError

CALIB = ("--samples", "4", "--seqlen", "32")


def _cli(*args: str) -> dict:
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _timeless(doc: dict) -> dict:
    """A report as JSON reads it back (tuples become lists), without its wall-clock times and output path:
    what two runs of the same options share."""
    doc = {k: v for k, v in json.loads(json.dumps(doc)).items() if k not in ("seconds", "timing", "output")}
    if "layers" in doc and isinstance(doc["layers"], list):
        doc["layers"] = [{k: v for k, v in r.items() if k != "seconds"} for r in doc["layers"]]
    return doc


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_calibrate_api_equals_the_cli(tiny_model, docs_file, tmp_path):
    cli = _cli("calibrate", "--model", str(tiny_model), "--device", "cpu", "--data", str(docs_file), *CALIB,
               "--hessian", "-o", str(tmp_path / "cli.safetensors"))
    seen: list[tuple] = []
    api = calibrate(CalibrateConfig(str(docs_file), str(tmp_path / "api.safetensors"), samples=4, seqlen=32,
                                    hessian=True, model=str(tiny_model), device="cpu"),
                    progress=lambda stage, advance=0, total=None, note=None: seen.append((stage, advance, total)))
    assert _timeless(api) == _timeless(cli)
    a, b = load_file(tmp_path / "api.safetensors"), load_file(tmp_path / "cli.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert seen == [("calibrating", 0, 2), ("calibrating", 1, None), ("calibrating", 1, None)]  # 2 blocks


@pytest.mark.parametrize("method, extra", [("wanda", {"pattern": "2:4"}), ("gptq", {"bits": 4, "group_size": 32})])
def test_compress_api_equals_the_cli(tiny_model, docs_file, tmp_path, method, extra):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    cli = _cli("compress", "--model", str(tiny_model), "--device", "cpu", "--method", method, *flags,
               "--calib", str(docs_file), *CALIB, "-o", str(tmp_path / "cli"))
    config = CompressConfig(str(tmp_path / "api"), method=method, calib=str(docs_file), samples=4, seqlen=32,
                            model=str(tiny_model), device="cpu", **extra)
    api = compress(config)
    assert _timeless(api) == _timeless(cli) and api["output"] == str(tmp_path / "api")
    a, b = _tensors(tmp_path / "api"), _tensors(tmp_path / "cli")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = [json.loads((tmp_path / d / "config.json").read_text())["rechannel"] for d in ("api", "cli")]
    assert _timeless(meta[0]) == _timeless(meta[1])


def _no_load(*args, **kwargs):
    raise AssertionError("the model loaded before the options were checked")


@pytest.mark.parametrize("options, message", [
    ({"method": "wandaa"}, "unknown method 'wandaa'"),
    ({"method": "gptq"}, "--method gptq quantizes: give --bits"),
    ({"method": "magnitude", "format": "packed"}, "--format packed needs --bits"),
    ({"method": "wanda"}, "needs calibration data"),
    ({"method": "wanda", "calib": "a.jsonl", "stats": "b.safetensors"}, "give --calib or --stats, not both"),
])
def test_bad_options_are_refused_before_the_model_loads(tiny_model, tmp_path, options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        compress(CompressConfig(str(tmp_path / "out"), model=str(tiny_model), **options), load=_no_load)
    assert not (tmp_path / "out").exists()


def test_an_output_onto_an_input_is_refused_first(tiny_model, docs_file):
    with pytest.raises(UserError, match="-o"):
        compress(CompressConfig(str(tiny_model), method="wandaa", model=str(tiny_model)), load=_no_load)
    with pytest.raises(UserError, match="-o"):
        calibrate(CalibrateConfig(str(docs_file), str(docs_file), docs="bad", model=str(tiny_model)), load=_no_load)

"""Atomic outputs: nothing half-written, nothing good clobbered, on error or Ctrl-C."""

from __future__ import annotations

import pytest

from rechannel.ops.atomic import atomic_open, atomic_path


def test_file_appears_only_on_success(tmp_path):
    target = tmp_path / "a.bin"
    with atomic_open(target) as f:
        f.write(b"partial")
        assert not target.exists()
    assert target.read_bytes() == b"partial"


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, exc):
    target = tmp_path / "a.bin"
    target.write_bytes(b"good")
    with pytest.raises(exc), atomic_open(target) as f:
        f.write(b"half")
        raise exc()
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_directory_output_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_directory_output_interrupted_leaves_the_old_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("new")
        raise KeyboardInterrupt
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    target = tmp_path / "a.bin"
    with atomic_path(target) as tmp:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors creates them
        os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask

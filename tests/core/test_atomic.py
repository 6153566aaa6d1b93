"""Atomic outputs: nothing half-written, nothing good clobbered, on error or Ctrl-C."""

from __future__ import annotations

import pytest

from rechannel.ops.core.atomic import atomic_open, atomic_path


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


def _mode(path) -> int:
    import os
    import stat

    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_directory_outputs_get_the_usual_permissions_inside(tmp_path):
    import os

    target = tmp_path / "model"
    with atomic_path(target) as tmp:
        os.mkdir(tmp, 0o700)
        fd = os.open(tmp / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    assert _mode(target) == 0o777 & ~_umask()
    assert _mode(target / "model.safetensors") == 0o666 & ~_umask()


def test_a_character_device_is_written_into_not_replaced(tmp_path):
    import os
    import stat

    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the same device as /dev/null
    except PermissionError:
        pytest.skip("making a device node needs root")
    before = os.stat(node)
    with atomic_open(node) as f:
        f.write(b"discarded")
    with atomic_path(node) as tmp:
        tmp.write_bytes(b"discarded too")  # a library writing to a path
    after = os.stat(node)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_a_fifo_receives_the_output(tmp_path):
    import os
    import stat
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    with atomic_open(fifo) as f:
        f.write(b"through the pipe")
    reader.join(timeout=30)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_symlink_is_followed_and_stays_a_link(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_bytes(b"old")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    with atomic_open(link) as f:
        f.write(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]


def test_a_descriptor_path_writes_through_the_open_descriptor(tmp_path):
    """`-o /dev/stdout >> log` appends: the output goes through the descriptor, never truncating or replacing."""
    import os

    log = tmp_path / "log"
    log.write_bytes(b"first\n")
    link = tmp_path / "out"
    with open(log, "ab") as f:
        fd = f.fileno()
        link.symlink_to(f"/proc/self/fd/{fd}")  # as `ln -s /proc/self/fd/1 out` for stdout
        with atomic_open(link) as out:
            out.write(b"second\n")
        with atomic_open(f"/dev/fd/{fd}") as out:
            out.write(b"third\n")
    assert log.read_bytes() == b"first\nsecond\nthird\n"
    assert link.is_symlink() and os.readlink(link) == f"/proc/self/fd/{fd}"


def test_a_killed_writers_leftovers_are_swept_by_the_next_write(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    target = tmp_path / "stats.safetensors"
    (tmp_path / f".stats.safetensors.tmp-{pid}-0123abcd").write_bytes(b"x" * 1000)
    (tmp_path / f".other.safetensors.tmp-{pid}-0123abcd").write_bytes(b"not ours")
    import os

    mine = tmp_path / f".stats.safetensors.tmp-{os.getpid()}-89abcdef"  # a live writer's: left alone
    mine.write_bytes(b"busy")
    with atomic_open(target) as f:
        f.write(b"done")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f".other.safetensors.tmp-{pid}-0123abcd", mine.name, "stats.safetensors"])


def test_a_directory_moved_aside_before_a_kill_is_put_back(tmp_path):
    import subprocess
    import sys

    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)
    old = tmp_path / f".model.old-{pid}-0123abcd"  # killed between moving the old copy aside and the new one in
    old.mkdir()
    (old / "config.json").write_text("old")
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        raise RuntimeError
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

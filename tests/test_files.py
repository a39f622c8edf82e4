"""`common.files`: atomic writes, stale temp files, file keys."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest

from common.files import atomic_write, file_key, remove_stale_temps, write_json


def test_atomic_write_takes_bytes_text_or_a_writer_and_the_umasks_mode(tmp_path):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "b.txt", "text")
    atomic_write(tmp_path / "c.bin", lambda f: f.write(b"written"))
    write_json(tmp_path / "sub" / "d.json", {"k": 1})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text() == "text"
    assert (tmp_path / "c.bin").read_bytes() == b"written"
    assert (tmp_path / "sub" / "d.json").read_text() == '{\n  "k": 1\n}'
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.bin", "sub"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    atomic_write(tmp_path / "f", "old")

    def fail(file):
        file.write(b"half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "f", fail)
    assert (tmp_path / "f").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".shard-00001.npz.{host}-{dead.pid}.abc.tmp"
    live = tmp_path / f".shard-00002.npz.{host}-{os.getpid()}.def.tmp"
    other = tmp_path / f".shard-00003.npz.elsewhere-{dead.pid}.ghi.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and live.exists() and other.exists()


def test_file_key_follows_path_size_and_mtime(tmp_path):
    path = tmp_path / "f"
    path.write_text("a")
    key = file_key(path)
    assert file_key(path) == key and len(key) == 16
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert file_key(path) != key
    assert file_key(tmp_path / "missing") != file_key(tmp_path / "other-missing")

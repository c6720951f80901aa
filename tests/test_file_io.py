"""Atomic writes: a reader sees the old file (or directory) or the new one, never half; failures leave
nothing behind; new files get ordinary modes, whatever the temp file had."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from lape_awq.quant.file_io import FILE_MODE, atomic_directory, atomic_file, sha256_file, write_atomic


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "whole.bin").write_bytes(b"x")
    assert (target / "whole.bin").exists() and list(target.parent.iterdir()) == [target]


def test_atomic_directory_replaces_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    with atomic_directory(target) as tmp:  # a concurrent writer's result is kept
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "1"
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "v").write_text("3")
    assert (target / "v").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_write_atomic_replaces_whole_files_with_ordinary_modes(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "report.json"
    assert write_atomic(target, "첫 번째\n") == target
    assert target.read_text(encoding="utf-8") == "첫 번째\n"
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == FILE_MODE
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = write_atomic(tmp_path / "a.md", "old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.md"]


def test_sha256_file_reads_past_one_block(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # 1.2 MiB: more than one 1 MiB block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()

"""Atomic writes (a file or a whole directory: readers see the old one or the new one, never half) and
file hashes. Every file lape-awq writes goes through here."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What a plain `open(..., "w")` would give under the usual umask; mkstemp's 0600 must not outlive a rename.
FILE_MODE = 0o644
DIR_MODE = 0o755


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target` to write; on success it replaces `target`, on error it goes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        tmp.chmod(FILE_MODE)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(target: Path, data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `target` atomically; returns `target`."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(target)


@contextmanager
def atomic_directory(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside `target`; on success rename it to `target`, on error remove it.

    If `target` exists (or appeared meanwhile: a concurrent writer won), ours is discarded and theirs
    kept, unless `replace`: then the old one is moved aside, ours renamed in, and the old one deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(DIR_MODE)
    try:
        yield tmp
        old = None
        if replace and target.exists():
            old = target.rename(target.parent / f"{tmp.name}.old")
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

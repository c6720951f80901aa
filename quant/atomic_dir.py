"""Build a directory under a temporary name and rename it into place, so readers never see half of it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside `target`; on success rename it to `target`, on error remove it.

    If `target` exists (or appeared meanwhile: a concurrent writer won), ours is discarded and theirs
    kept, unless `replace`: then the old one is moved aside, ours renamed in, and the old one deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
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

"""Where lape-awq keeps what it builds: `$LAPE_AWQ_HOME`, default `~/.cache/lape-awq`."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    """The cache root; created on demand by whoever writes into it."""
    env = os.environ.get("LAPE_AWQ_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lape-awq"

"""Where the admin API may load checkpoints from, and the name a checkpoint is shown by.

An admin load or swap names a filesystem path; it is accepted only when, with symlinks and `..` resolved,
it lies inside one of the roots (`--checkpoint-root`; default: the lape-awq home and the directories that
hold the checkpoints given on the command line). Public answers (the model list, response headers,
metrics) name a checkpoint by its path relative to its root, never by its absolute path, which would tell
any caller where the operator keeps files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class OutsideRoots(Exception):
    """A checkpoint path outside every root; the message says which roots are allowed."""


@dataclass(frozen=True)
class CheckpointRoots:
    """Resolved directories; empty means the admin API may load from nowhere."""

    roots: tuple[Path, ...]

    @classmethod
    def of(cls, directories: Iterable[Path]) -> CheckpointRoots:
        resolved: list[Path] = []
        for directory in directories:
            path = directory.expanduser().resolve()
            if path not in resolved:
                resolved.append(path)
        return cls(tuple(resolved))

    def root_of(self, path: Path) -> Path | None:
        """The innermost root holding `path` (already resolved), or None."""
        holding = [root for root in self.roots if path == root or root in path.parents]
        return max(holding, key=lambda root: len(root.parts), default=None)

    def allowed(self, path: Path) -> Path:
        """`path` resolved (symlinks, `..`, `~`) when it lies inside a root; OutsideRoots otherwise."""
        resolved = path.expanduser().resolve()
        if self.root_of(resolved) is None:
            listed = ", ".join(str(root) for root in self.roots) or "none"
            raise OutsideRoots(
                f"{path} resolves to {resolved}, outside the checkpoint roots this server loads from "
                f"({listed}); the operator adds roots with `lape-awq serve --checkpoint-root DIR`"
            )
        return resolved

    def label(self, path: Path) -> str:
        """The public name of a checkpoint: its path under its root (its directory name when in none)."""
        root = self.root_of(path)
        if root is None or root == path:
            return path.name
        return path.relative_to(root).as_posix()

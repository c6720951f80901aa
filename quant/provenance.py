"""The stamp every file lape-awq writes carries: which tool, which version."""

from __future__ import annotations

from importlib.metadata import version


def tool_stamp() -> dict[str, str]:
    """`{"tool": "lape-awq", "tool_version": ...}`, the first keys of every manifest and result file."""
    return {"tool": "lape-awq", "tool_version": version("lape-awq")}

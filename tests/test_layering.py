"""The folders are the architecture: every import between lape-awq's packages points down the layer list
below (lazy imports inside functions included), so, for example, validating a checkpoint inside vLLM
never imports the AWQ search and `kernels/` stays pure tensor math."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The folders pyproject.toml maps onto lape_awq.*.
FOLDERS = ("quant", "kernels", "vllm_method", "server", "bench")
# Lowest first; a layer may import itself and any layer before it. "quant" is quant/'s top-level modules.
LAYERS = [
    "kernels",
    "quant",
    "quant.lape",
    "quant.vocab",
    "quant.checkpoint",
    "quant.awq",
    "quant.evaluation",
    "quant.cli",
    "vllm_method",
    "server",
    "bench",
]
# Beside the order: these pairs of layers never meet, in either direction.
APART = {("quant.lape", "quant.checkpoint"), ("vllm_method", "server")}


def layer_of(module: str) -> str:
    """`lape_awq.quant.awq.search` -> `quant.awq`; `lape_awq.quant.errors` -> `quant`."""
    parts = module.removeprefix("lape_awq.").split(".")
    if parts[0] == "quant" and len(parts) > 2 and f"quant.{parts[1]}" in LAYERS:
        return f"quant.{parts[1]}"
    return parts[0]


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lape_awq."):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("lape_awq.")}
    return names


def test_every_import_points_down_the_layers() -> None:
    wrong = []
    checked = 0
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            module = "lape_awq." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
            here = layer_of(module)
            for name in imports_of(path):
                there = layer_of(name)
                checked += 1
                if LAYERS.index(there) > LAYERS.index(here) or {(here, there), (there, here)} & APART:
                    wrong.append(f"{path.relative_to(ROOT)} ({here}) imports {name} ({there})")
    assert checked > 100  # the walk really read the tree
    assert not wrong, "\n".join(wrong)

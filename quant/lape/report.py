"""Human-readable views of a neurons file: a text summary and a PNG (heat-map + entropy histogram)."""

from __future__ import annotations

from pathlib import Path

import torch

from lape_awq.quant.file_io import atomic_file
from lape_awq.quant.lape.neurons_file import NeuronsFile


def summary_lines(nf: NeuronsFile, target: str) -> list[str]:
    """Neurons per language, the target language's per-layer spread, and the tokens behind them."""
    layers, neurons = nf.entropy.shape
    total = layers * neurons
    selected = int(nf.language_mask.any(dim=0).sum())
    per_layer = nf.mask(target).sum(dim=1).tolist()
    count = sum(per_layer)
    lines = [
        f"{target} neurons: {count} of {total:,} FFN neurons ({100 * count / total:.2f}%) in {layers} layers",
        f"per layer ({target}): " + " ".join(f"L{i}:{c}" for i, c in enumerate(per_layer)),
        f"selected {selected} neurons; per language: "
        + ", ".join(f"{lang} {int(nf.mask(lang).sum())}" for lang in nf.languages),
        "tokens per language: "
        + ", ".join(f"{lang} {int(n):,}" for lang, n in zip(nf.languages, nf.tokens, strict=True)),
    ]
    return lines


def write_plot(nf: NeuronsFile, path: Path, target: str) -> None:
    """Heat-map of selected neurons per language x layer, and the histogram of LAPE scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = nf.language_mask.sum(dim=2).numpy()  # [G, L]
    finite = nf.entropy[torch.isfinite(nf.entropy)].flatten().numpy()
    target_scores = nf.entropy[nf.mask(target)].numpy()
    fig, (ax_map, ax_hist) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    im = ax_map.imshow(grid, aspect="auto", cmap="viridis")
    ax_map.set_yticks(range(len(nf.languages)), nf.languages)
    ax_map.set_xlabel("layer")
    ax_map.set_title("language-specific neurons per layer")
    fig.colorbar(im, ax=ax_map)
    ax_hist.hist(finite, bins=60, color="0.6", label="candidates")
    if target_scores.size:
        ax_hist.hist(target_scores, bins=20, color="tab:red", label=f"{target} neurons")
    ax_hist.set_xlabel("LAPE (entropy over languages)")
    ax_hist.set_ylabel("neurons (log scale)")
    ax_hist.set_yscale("log")
    ax_hist.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

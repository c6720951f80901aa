"""Plots of a serving-matrix record: throughput vs concurrency, latency CDF, memory bars (one PNG)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from lape_awq.bench.formatting import MiB
from lape_awq.quant.file_io import write_atomic


def plot_matrix(record: dict[str, Any], path: Path) -> None:
    """Three panels: output tok/s vs clients (mean, bars to min/max over rounds); the CDF of TTFT (dashed)
    and end-to-end latency (solid) at the highest concurrency; weights and process memory per config.
    Written to `path` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["name"] for e in record["configs"] if e["status"] == "ok"]
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, (ax_tp, ax_cdf, ax_mem) = plt.subplots(1, 3, figsize=(17, 4.8))

    top = max(run["concurrency"] for run in record["runs"])
    for name in names:
        runs = [r for r in record["runs"] if r["config"] == name]
        levels = sorted({r["concurrency"] for r in runs})
        rates = [[r["summary"]["output_throughput"] for r in runs if r["concurrency"] == c] for c in levels]
        mean = np.array([np.mean(v) for v in rates])
        low = mean - np.array([min(v) for v in rates])
        high = np.array([max(v) for v in rates]) - mean
        ax_tp.errorbar(levels, mean, yerr=[low, high], marker="o", capsize=3, color=colors[name], label=name)
        for key, style in (("latency", "-"), ("ttft", "--")):
            values = np.sort(
                [s[key] for r in runs if r["concurrency"] == top for s in r["samples"] if s["ok"]]
            )
            if len(values):
                label = f"{name} {'E2E' if key == 'latency' else 'TTFT'}"
                fraction = np.arange(1, len(values) + 1) / len(values)
                ax_cdf.step(values, fraction, style, color=colors[name], where="post", label=label)
    ax_tp.set(
        xscale="log",
        xlabel="concurrent clients",
        ylabel="output tokens/s",
        title="Throughput vs concurrency (bars: min-max over rounds)",
    )
    ax_tp.set_xticks(sorted({r["concurrency"] for r in record["runs"]}))
    ax_tp.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_tp.legend()
    ax_cdf.set(xlabel="seconds", ylabel="fraction of requests", title=f"Latency CDF at {top} clients")
    ax_cdf.legend(fontsize=8)

    entries = [e for e in record["configs"] if e["status"] == "ok"]
    bars = {
        "checkpoint": [e["weight_bytes"] / MiB for e in entries],
        "RSS when ready": [(e["memory"]["ready_rss"] or 0) / MiB for e in entries],
        "peak RSS": [e["memory"]["peak_rss"] / MiB for e in entries],
    }
    if any(e["memory"].get("peak_gpu") is not None for e in entries):
        bars["peak GPU"] = [(e["memory"]["peak_gpu"] or 0) / MiB for e in entries]
    width = 0.8 / len(bars)
    x = np.arange(len(entries))
    for i, (label, values) in enumerate(bars.items()):
        ax_mem.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=label)
    ax_mem.set_xticks(x, [e["name"] for e in entries])
    ax_mem.set(ylabel="MiB", title="Memory of each serving process tree")
    ax_mem.set_ylim(0, 1.25 * max(max(v) for v in bars.values()))  # room for the legend above the bars
    ax_mem.legend(ncol=len(bars), fontsize=8, loc="upper left")

    save_figure(fig, record, "lape-awq serving matrix", path)


def save_figure(fig: Any, record: dict[str, Any], title: str, path: Path) -> None:
    """`fig` titled `title` with the record's machine, date and commit, written as PNG to `path`
    atomically, then closed."""
    import matplotlib.pyplot as plt

    machine = record["machine"]
    fig.suptitle(
        f"{title}: {machine['gpu'] or machine['cpu']} ({machine['cores']} cores), "
        f"{record['date'][:10]}, commit {record['commit']}"
    )
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, png.getvalue())

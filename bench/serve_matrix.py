"""The serving matrix: our FP, AWQ and AWQ-opt servers and their peers x concurrency, in one run on one
machine.

Each configuration is one server process: `lape-awq serve` with one checkpoint, or a peer (bench/peers.py):
stock `vllm serve` on our AWQ-opt checkpoint, llama.cpp's `llama-server` on the GGUF the default model
comes from. They start one after another and all stay alive (so each peak memory is its own), but only
the one being measured runs: the others are paused (SIGSTOP), because an idle vLLM server can keep polling
on the CPU. The load (`lape-awq bench load`'s closed loop, streaming, fixed-seed Korean and English
prompts, the same for every server) runs in rounds: every concurrency on every configuration, the order
reversed every other round, so a slow phase of a noisy machine hits every configuration alike. Each
cell is the mean of its rounds; the spread is (max - min) / mean. Ratios are to the baseline (our AWQ);
the peer table sets our default (AWQ-opt) against each peer. A configuration whose server cannot start,
or a peer that is not installed, is reported as skipped with the reason.

    lape-awq bench serve                          # default model: fp, awq, awq-opt, vllm, llama.cpp
    lape-awq bench serve --config NAME[@QUANT]=DIR ... [--peer vllm[=DIR]] [--peer llama.cpp[=GGUF]]
                         [--concurrency 1,4,16,32] [--repeats 2]

Writes bench/results/serve_matrix_<date>[_<tag>].{json,md,png}: JSON with machine, versions, settings,
memory and every request; the markdown tables; plots of throughput vs concurrency, the latency CDF and
memory.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lape_awq.bench.formatting import MiB, number, percent, ratio
from lape_awq.bench.peers import PeerMissing, ServerOptions, start_server
from lape_awq.bench.process_memory import MemoryPeaks
from lape_awq.bench.run_info import result_header, write_json
from lape_awq.bench.serve_load import run_load, summarize
from lape_awq.quant.errors import UserError
from lape_awq.quant.file_io import write_atomic

DEFAULT_CONCURRENCY = (1, 4, 16, 32)
BASELINE = "awq"
OURS = "awq-opt"  # the configuration the peer table sets against each peer
PEERS = ("vllm", "llama.cpp")
# cell key -> (where in a run's summary, scale)
CELL_METRICS = {
    "output_throughput": (("output_throughput",), 1.0),
    "request_throughput": (("request_throughput",), 1.0),
    "ttft_median_ms": (("ttft", "median_ms"), 1.0),
    "ttft_p99_ms": (("ttft", "p99_ms"), 1.0),
    "tpot_median_ms": (("tpot", "median_ms"), 1.0),
    "itl_median_ms": (("itl", "median_ms"), 1.0),
    "e2el_median_s": (("e2el", "median_ms"), 1e-3),
}


@dataclass(frozen=True)
class ServeConfig:
    """One served configuration: a name, what it serves (a checkpoint; llama.cpp: a GGUF), the engine
    quantization and the server that runs it (bench/peers.py's SERVERS)."""

    name: str
    checkpoint: Path
    quantization: str = "auto"  # `lape-awq serve --quantization`: auto, awq (stock vLLM), lape_awq, ...
    server: str = "lape-awq"


def parse_config(text: str) -> ServeConfig:
    """`NAME=DIR` or `NAME@QUANTIZATION=DIR`."""
    label, sep, path = text.partition("=")
    name, _, quantization = label.partition("@")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME[@QUANTIZATION]=DIR, got {text!r}")
    return ServeConfig(name, Path(path).expanduser(), quantization or "auto")


def parse_peer(text: str) -> ServeConfig:
    """`vllm[=DIR]` (default: the default AWQ-opt checkpoint) or `llama.cpp[=GGUF]` (default: the default
    model's GGUF); the peer's name is its kind. Default targets are resolved when the run starts."""
    kind, _, path = text.partition("=")
    if kind not in PEERS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(PEERS)} [=PATH], got {text!r}")
    return ServeConfig(kind, Path(path).expanduser() if path else Path(), "auto", kind)


def _default_target(config: ServeConfig, progress: bool) -> ServeConfig:
    """`config` with a peer's default target filled in where none was given."""
    from lape_awq.quant.awq.default_checkpoints import ensure_default_checkpoint
    from lape_awq.quant.default_model import default_gguf

    if config.server == "lape-awq" or config.checkpoint != Path():
        return config
    if config.server == "llama.cpp":
        target = default_gguf()
    else:
        target = ensure_default_checkpoint(OURS, progress=progress)
    return ServeConfig(config.name, target, config.quantization, config.server)


def default_configs(progress: bool) -> list[ServeConfig]:
    """The default model in float, its AWQ and AWQ-opt checkpoints on our server, and both peers. (Stock
    vLLM AWQ cannot load these checkpoints: their vocabulary is quantized. `--config stock-awq@awq=DIR`
    runs it on a checkpoint written with `--vocab-bits 16`.)"""
    from lape_awq.quant.awq.default_checkpoints import ensure_default_checkpoints
    from lape_awq.quant.default_model import prepare_default_model

    paths = ensure_default_checkpoints(("awq", OURS), progress)
    return [
        ServeConfig("fp", prepare_default_model()),
        ServeConfig("awq", paths["awq"], "lape_awq"),
        ServeConfig(OURS, paths[OURS], "lape_awq"),
        *(parse_peer(peer) for peer in PEERS),
    ]


def weight_bytes(checkpoint: Path) -> int:
    """Bytes of the weights as stored: the checkpoint's safetensors files (sparse FP16 part included), or
    the GGUF file."""
    if checkpoint.is_file():
        return checkpoint.stat().st_size
    return sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))


def _rounded(sample: dict[str, Any]) -> dict[str, Any]:
    """A request sample with times in microseconds' precision (keeps the JSON small)."""
    out = dict(sample)
    for key in ("ttft", "latency"):
        if out[key] is not None:
            out[key] = round(out[key], 6)
    out["itl"] = [round(x, 6) for x in out["itl"]]
    return out


def run_matrix(
    configs: list[ServeConfig],
    concurrencies: list[int],
    repeats: int,
    load: dict[str, Any],
    options: ServerOptions,
    start_timeout: float,
    workdir: Path,
) -> dict[str, Any]:
    """Start every configuration's server, run the rounds, stop them; the result record (no file I/O).
    Only the server being measured runs; the others are paused."""
    from lape_awq.bench.server_process import MeasuredServer

    entries: list[dict[str, Any]] = []
    servers: dict[str, MeasuredServer] = {}
    runs: list[dict[str, Any]] = []
    try:
        for index, config in enumerate(configs, 1):
            print(
                f"[start {index}/{len(configs)}] {config.name} ({config.server}): {config.checkpoint}",
                flush=True,
            )
            entry = {**asdict(config), "checkpoint": str(config.checkpoint)}
            entry |= {"weight_bytes": weight_bytes(config.checkpoint), "status": "ok", "reason": None}
            entries.append(entry)
            log = workdir / f"{config.name}.log"
            try:
                child = start_server(
                    config.server, config.name, config.checkpoint, config.quantization, options, log
                )
            except PeerMissing as missing:
                entry |= {"status": "skipped", "reason": str(missing), "memory": asdict(MemoryPeaks())}
                print(f"  skipped: {missing}", flush=True)
                continue
            entry["command"] = [str(x) for x in child.process.args]
            server = MeasuredServer(config.name, child)
            servers[config.name] = server  # from here on `finally` stops it, whatever happens
            reason = server.wait_ready(start_timeout)
            if reason is not None:
                entry |= {
                    "status": "skipped",
                    "reason": reason,
                    "memory": asdict(servers.pop(config.name).stop()),
                }
                print(f"  skipped: {reason}", flush=True)
                continue
            server.pause()  # the next server starts, and the others are measured, without it polling
        if not servers:
            raise UserError("no configuration could be served: " + "; ".join(e["reason"] for e in entries))
        live = [c for c in configs if c.name in servers]
        total, done = repeats * len(concurrencies) * len(live), 0
        for round_ in range(repeats):
            order = live if round_ % 2 == 0 else live[::-1]
            for concurrency in concurrencies:
                for config in order:
                    server = servers[config.name]
                    server.resume()
                    try:
                        samples, seconds = asyncio.run(
                            run_load(server.url, config.name, None, concurrency, **load)
                        )
                    finally:
                        server.pause()
                    summary = summarize(samples, seconds)
                    runs.append(
                        {
                            "config": config.name,
                            "concurrency": concurrency,
                            "round": round_,
                            "summary": summary,
                            "errors": sorted({s.error for s in samples if s.error})[:10],
                            "samples": [_rounded(asdict(s)) for s in samples],
                        }
                    )
                    done += 1
                    print(
                        f"[{done}/{total}] round {round_ + 1} c={concurrency:<3} {config.name:<12} "
                        f"{summary['output_throughput']:8.1f} out tok/s  TTFT p50 "
                        f"{summary['ttft']['median_ms'] or float('nan'):8.1f} ms  TPOT p50 "
                        f"{summary['tpot']['median_ms'] or float('nan'):7.1f} ms  failed {summary['failed']}",
                        flush=True,
                    )
    finally:
        for name, server in servers.items():
            peaks = server.stop()
            next(e for e in entries if e["name"] == name)["memory"] = asdict(peaks)
    return {"configs": entries, "runs": runs}


def _metric(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        value = value[key]
    return value


def aggregate(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (configuration, concurrency): the mean of each metric over the rounds, the spread
    (max - min) / mean of the output throughput, failures summed, ratios to the baseline's same cell."""
    baseline = record["settings"]["baseline"]
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for run in record["runs"]:
        row = rows.setdefault((run["config"], run["concurrency"]), {"values": {}, "failed": 0, "rounds": 0})
        row["failed"] += run["summary"]["failed"]
        row["rounds"] += 1
        for key, (path, scale) in CELL_METRICS.items():
            value = _metric(run["summary"], path)
            row["values"].setdefault(key, []).append(None if value is None else value * scale)
    out = []
    for (config, concurrency), row in rows.items():
        cell = {
            "config": config,
            "concurrency": concurrency,
            "rounds": row["rounds"],
            "failed": row["failed"],
        }
        for key, values in row["values"].items():
            known = [v for v in values if v is not None]
            cell[key] = float(np.mean(known)) if known else None
        throughputs = row["values"]["output_throughput"]
        mean = float(np.mean(throughputs))
        cell["output_throughput_spread"] = (max(throughputs) - min(throughputs)) / mean if mean else None
        out.append(cell)
    base = {c["concurrency"]: c for c in out if c["config"] == baseline}
    for cell in out:
        ref = base.get(cell["concurrency"])
        for key in ("output_throughput", "tpot_median_ms", "ttft_median_ms"):
            ok = ref is not None and cell[key] is not None and ref[key]
            cell[f"{key}_vs_baseline"] = cell[key] / ref[key] if ok else None
    return out


def markdown_tables(record: dict[str, Any]) -> str:
    """The throughput/latency table per cell, then the memory table, then skipped configurations."""
    baseline = record["settings"]["baseline"]
    lines = [
        f"| config | clients | out tok/s | spread | vs {baseline} | req/s | TTFT p50 ms | TTFT p99 ms "
        f"| TPOT p50 ms | TPOT vs {baseline} | ITL p50 ms | E2E p50 s | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cells = aggregate(record)
    order = [c["name"] for c in record["configs"]]
    for c in sorted(cells, key=lambda c: (c["concurrency"], order.index(c["config"]))):
        lines.append(
            f"| {c['config']} | {c['concurrency']} | {number(c['output_throughput'])} | "
            f"{percent(c['output_throughput_spread'])} | {number(c['output_throughput_vs_baseline'], 3)} | "
            f"{number(c['request_throughput'], 2)} | {number(c['ttft_median_ms'])} | "
            f"{number(c['ttft_p99_ms'])} | {number(c['tpot_median_ms'])} | "
            f"{number(c['tpot_median_ms_vs_baseline'], 3)} | {number(c['itl_median_ms'])} | "
            f"{number(c['e2el_median_s'], 2)} | {c['failed']} |"
        )
    lines += ["", memory_table(record)]
    peers = peer_table(record)
    lines += ["", peers] if peers else []
    lines += ["", *(f"- {line}" for line in how_run(record))]
    skipped = [e for e in record["configs"] if e["status"] != "ok"]
    if skipped:
        lines += [""] + [
            f"- {e['name']} (`--quantization {e['quantization']}`) skipped: {_short(e['reason'])}"
            for e in skipped
        ]
    return "\n".join(lines) + "\n"


def peer_table(record: dict[str, Any]) -> str:
    """Our default configuration (awq-opt; the baseline where it is absent) against each configuration a
    peer server ran, per concurrency: ours / peer for output throughput (> 1: ours serves more), TTFT p50,
    TTFT p99 and TPOT p50 (< 1: ours answers sooner), and both spreads. Empty without a peer."""
    served = {e["name"]: e for e in record["configs"] if e["status"] == "ok"}
    ours = OURS if OURS in served else record["settings"]["baseline"]
    peers = [name for name, e in served.items() if e.get("server", "lape-awq") != "lape-awq"]
    if not peers or ours not in served:
        return ""
    cells = {(c["config"], c["concurrency"]): c for c in aggregate(record)}
    lines = [
        f"| {ours} / peer | clients | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | spread (ours, peer) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for peer in peers:
        for concurrency in record["settings"]["concurrency"]:
            a, b = cells.get((ours, concurrency)), cells.get((peer, concurrency))
            if a is None or b is None:
                continue
            ratios = [
                ratio(a[key] / b[key]) if a[key] is not None and b[key] else "-"
                for key in ("output_throughput", "ttft_median_ms", "ttft_p99_ms", "tpot_median_ms")
            ]
            spread = f"{percent(a['output_throughput_spread'])}, {percent(b['output_throughput_spread'])}"
            lines.append(f"| {peer} | {concurrency} | " + " | ".join(ratios) + f" | {spread} |")
    return "\n".join(lines)


def how_run(record: dict[str, Any]) -> list[str]:
    """One line per served configuration: its server and command line (paths shortened to file names)."""
    out = []
    for entry in record["configs"]:
        if entry["status"] != "ok" or "command" not in entry:
            continue
        words = [Path(w).name if w.startswith("/") else w for w in entry["command"]]
        out.append(f"{entry['name']} ({entry.get('server', 'lape-awq')}): `{' '.join(words)}`")
    engine_env = record["settings"].get("engine_env")
    if out and engine_env:
        settings = " ".join(f"{k}={v}" for k, v in engine_env.items())
        out.append(f"vLLM engines (ours and stock vLLM): `{settings}` (`lape-awq serve` on small CPUs)")
    return out


def _short(reason: str) -> str:
    """A server's failure reason without what pydantic appends (the rejected input, a help link)."""
    return re.sub(r"\s*\[type=.*", "", reason)


def memory_table(record: dict[str, Any]) -> str:
    """Weights on disk and the serving process tree's memory, with ratios to the baseline."""
    baseline = record["settings"]["baseline"]
    entries = [e for e in record["configs"] if e["status"] == "ok"]
    gpu = any(e["memory"].get("peak_gpu") is not None for e in entries)
    base = next((e for e in entries if e["name"] == baseline), None)

    def mib(entry: dict[str, Any], get) -> str:
        """`get(entry)` in MiB, with its ratio to the baseline's."""
        vs_base = base and entry is not base and get(base)
        return number(get(entry) / MiB) + (f" ({ratio(get(entry) / get(base))})" if vs_base else "")

    header = "| config | engine quantization | checkpoint MiB | ready RSS MiB | peak RSS MiB |"
    lines = [
        header + (" peak GPU MiB |" if gpu else ""),
        "|---|---|---:|---:|---:|" + ("---:|" if gpu else ""),
    ]
    for e in entries:
        mem = e["memory"]
        row = (
            f"| {e['name']} | {'gguf' if e.get('server') == 'llama.cpp' else e['quantization']} | "
            f"{mib(e, lambda x: x['weight_bytes'])} | "
            f"{number((mem['ready_rss'] or 0) / MiB)} | {mib(e, lambda x: x['memory']['peak_rss'])} |"
        )
        if gpu:
            row += f" {mib(e, lambda x: x['memory']['peak_gpu'] or 0)} |"
        lines.append(row)
    return "\n".join(lines)


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrencies must be positive integers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        dest="configs",
        action="append",
        type=parse_config,
        metavar="NAME[@QUANT]=DIR",
        help="a configuration to serve (repeatable); QUANT is `lape-awq serve --quantization` (default auto: "
        "AWQ on lape_awq, awq: stock vLLM AWQ). Default: the default model's fp, awq, awq-opt",
    )
    parser.add_argument(
        "--peer",
        dest="peers",
        action="append",
        type=parse_peer,
        metavar="vllm[=DIR]|llama.cpp[=GGUF]",
        help="a peer server to measure beside ours (repeatable): stock `vllm serve` on a checkpoint "
        "(default: the default AWQ-opt) or llama.cpp's llama-server on a GGUF (default: the default "
        "model's). "
        "Default with no --config: both",
    )
    parser.add_argument(
        "--llama-server", type=Path, help="llama-server binary (default: make install-peers')"
    )
    parser.add_argument("--baseline", default=BASELINE, help="the configuration ratios are taken to")
    parser.add_argument(
        "--concurrency", type=_concurrencies, default=list(DEFAULT_CONCURRENCY), help="e.g. 1,4,16,32"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the whole matrix")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of measured load per cell")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent (not counted) before each cell")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (ignore_eos)")
    parser.add_argument("--seed", type=int, default=0, help="prompt order")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to start")
    serve = parser.add_argument_group("server options (passed to every `lape-awq serve`)")
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--max-model-len", type=int, default=2048)
    serve.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV cache per server")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.2, help="CUDA: fraction per server")
    serve.add_argument("--max-num-seqs", type=int, help="default: the largest concurrency")
    serve.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start)")
    serve.add_argument("--threads", type=int, help="llama.cpp threads (default: every core, as vLLM)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--quiet", action="store_true", help="no progress bars while building checkpoints")


def run(args: argparse.Namespace) -> int:
    """Run the matrix; write JSON, markdown and PNG under --out; exit 1 if any request failed."""
    from lape_awq.bench.serve_plots import plot_matrix

    if args.repeats < 1 or args.duration <= 0 or args.max_tokens < 1 or args.warmup < 0:
        raise UserError("--repeats, --duration and --max-tokens must be positive, --warmup >= 0")
    progress = not args.quiet
    if args.configs:
        configs = list(args.configs)
    else:  # the defaults: ours and both peers, or ours and the peers named
        configs = [c for c in default_configs(progress) if not args.peers or c.server == "lape-awq"]
    peers = {p.name: p for p in args.peers or []}
    configs = [c for c in configs if c.name not in peers] + list(peers.values())
    configs = [_default_target(c, progress) for c in configs]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise UserError(f"configuration names must be distinct: {names}")
    for config in configs:
        if config.server == "llama.cpp":
            if config.checkpoint.suffix != ".gguf" or not config.checkpoint.is_file():
                raise UserError(f"--peer llama.cpp={config.checkpoint}: not a .gguf file")
        elif not (config.checkpoint / "config.json").is_file():
            raise UserError(f"{config.name}: {config.checkpoint} is not a model directory")
    baseline = args.baseline if args.baseline in names else names[0]
    options = ServerOptions(
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs or max(args.concurrency),
        max_in_flight=4 * max(args.concurrency) + 16,
        enforce_eager=args.enforce_eager,
        **({"threads": args.threads} if args.threads else {}),
        llama_server=args.llama_server,
    )
    load = {
        "duration": args.duration,
        "warmup": args.warmup,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
    }
    from lape_awq.server.engines import cpu_engine_env

    header = result_header("serve_matrix")  # when the run started
    with tempfile.TemporaryDirectory(prefix="lape-awq-bench-serve-") as tmp:
        result = run_matrix(
            configs, args.concurrency, args.repeats, load, options, args.start_timeout, Path(tmp)
        )
    record = {
        **header,
        "settings": {
            "baseline": baseline,
            "concurrency": args.concurrency,
            "repeats": args.repeats,
            **load,
            "server_options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
            "isolation": "only the measured server runs; the others are paused (SIGSTOP)",
            "engine_env": cpu_engine_env(1),  # ours sets it for itself, the stock vLLM peer is given it
            "prompts": "packaged Korean judge questions + English prompts, seeded",
        },
        **result,
    }
    stem = f"serve_matrix_{record['date'][:10]}{('_' + args.tag) if args.tag else ''}"
    table = markdown_tables(record)
    write_json(args.out / f"{stem}.json", record, indent=1)
    write_atomic(args.out / f"{stem}.md", table)
    plot_matrix(record, args.out / f"{stem}.png")
    print(table)
    print(f"wrote {args.out / stem}.json, .md and .png")
    return 0 if all(run["summary"]["failed"] == 0 for run in record["runs"]) else 1

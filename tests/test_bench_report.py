"""The serving matrix's aggregation, the report builder on fixed result files, the README's generated
Results section, and the process-tree memory sampler."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lape_awq.bench.commands import BENCHMARKS
from lape_awq.bench.process_memory import PeakMemorySampler
from lape_awq.bench.report import (
    BEGIN,
    DEFAULT_AWQ,
    DEFAULT_AWQ_OPT,
    END,
    RESULTS,
    eval_groups,
    find_sources,
    judge_win_rate,
    quality_table,
    replace_results,
    results_section,
    seed_table,
)
from lape_awq.bench.serve_matrix import aggregate, markdown_tables, parse_config
from lape_awq.quant.cli.main import main
from lape_awq.quant.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _summary(out_tps: float, tpot_ms: float, ttft_ms: float, failed: int = 0) -> dict:
    def pct(median: float) -> dict:
        return {"mean_ms": median, "median_ms": median, "p90_ms": median * 1.5, "p99_ms": median * 2}

    return {
        "duration_s": 10.0,
        "completed": 5,
        "failed": failed,
        "request_throughput": out_tps / 64,
        "output_throughput": out_tps,
        "total_token_throughput": out_tps * 2,
        "ttft": pct(ttft_ms),
        "tpot": pct(tpot_ms),
        "itl": pct(tpot_ms),
        "e2el": pct(ttft_ms + 63 * tpot_ms),
    }


def _sample(ttft: float, latency: float) -> dict:
    return {
        "ok": True,
        "ttft": ttft,
        "latency": latency,
        "output_tokens": 64,
        "prompt_tokens": 20,
        "itl": [0.01],
        "error": None,
    }


def serve_record() -> dict:
    """Two configurations x two concurrencies x two rounds, with known numbers; one skipped config."""
    runs = []
    table = {  # (config, clients) -> [(out tok/s, TPOT ms, TTFT ms) for each round]
        ("awq", 1): [(20.0, 50.0, 100.0), (22.0, 46.0, 110.0)],
        ("awq-opt", 1): [(19.0, 52.0, 105.0), (20.0, 50.0, 115.0)],
        ("awq", 4): [(60.0, 60.0, 200.0), (60.0, 62.0, 220.0)],
        ("awq-opt", 4): [(54.0, 66.0, 230.0), (58.0, 64.0, 250.0)],
        ("fp", 1): [(30.0, 30.0, 80.0), (30.0, 30.0, 80.0)],
        ("fp", 4): [(90.0, 40.0, 150.0), (90.0, 40.0, 150.0)],
    }
    for (config, clients), rounds in table.items():
        for round_, (tps, tpot, ttft) in enumerate(rounds):
            runs.append(
                {
                    "config": config,
                    "concurrency": clients,
                    "round": round_,
                    "summary": _summary(tps, tpot, ttft, failed=int(config == "fp" and round_ == 1)),
                    "errors": [],
                    "samples": [_sample(ttft / 1000, 3.0), _sample(ttft / 500, 4.0)],
                }
            )

    def memory(ready: int, peak: int) -> dict:
        return {"peak_rss": peak * MiB, "ready_rss": ready * MiB, "peak_gpu": None, "ready_gpu": None}

    return {
        "benchmark": "serve_matrix",
        "date": "2026-11-20T10:00:00+00:00",
        "commit": "abc1234",
        "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0+cpu", "vllm": "0.32.0", "gpu": None},
        "settings": {
            "baseline": "awq",
            "concurrency": [1, 4],
            "repeats": 2,
            "duration": 10.0,
            "warmup": 1,
            "max_tokens": 64,
            "seed": 0,
        },
        "configs": [
            {
                "name": "fp",
                "checkpoint": "/m/fp",
                "quantization": "auto",
                "weight_bytes": 1000 * MiB,
                "status": "ok",
                "reason": None,
                "memory": memory(2000, 2500),
            },
            {
                "name": "stock-awq",
                "checkpoint": "/m/awq",
                "quantization": "awq",
                "weight_bytes": 400 * MiB,
                "status": "skipped",
                "reason": "ValueError: torch.float32 is not supported",
                "memory": memory(0, 0),
            },
            {
                "name": "awq",
                "checkpoint": "/m/awq",
                "quantization": "lape_awq",
                "weight_bytes": 400 * MiB,
                "status": "ok",
                "reason": None,
                "memory": memory(1000, 1600),
            },
            {
                "name": "awq-opt",
                "checkpoint": "/m/opt",
                "quantization": "lape_awq",
                "weight_bytes": 404 * MiB,
                "status": "ok",
                "reason": None,
                "memory": memory(1010, 1648),
            },
        ],
        "runs": runs,
    }


def test_aggregate_means_spread_and_ratios_to_the_baseline() -> None:
    cells = {(c["config"], c["concurrency"]): c for c in aggregate(serve_record())}
    opt1, awq1, opt4 = cells["awq-opt", 1], cells["awq", 1], cells["awq-opt", 4]
    assert opt1["output_throughput"] == pytest.approx(19.5)
    assert opt1["output_throughput_spread"] == pytest.approx(1.0 / 19.5)
    assert opt1["output_throughput_vs_baseline"] == pytest.approx(19.5 / 21.0)
    assert opt1["tpot_median_ms_vs_baseline"] == pytest.approx(51.0 / 48.0)
    assert opt1["ttft_median_ms_vs_baseline"] == pytest.approx(110.0 / 105.0)
    assert opt4["output_throughput_vs_baseline"] == pytest.approx(56.0 / 60.0)
    assert opt4["e2el_median_s"] == pytest.approx((240.0 + 63 * 65.0) / 1000)
    assert awq1["output_throughput_vs_baseline"] == pytest.approx(1.0)
    assert cells["fp", 4]["failed"] == 1 and cells["fp", 4]["rounds"] == 2 and opt1["failed"] == 0


def test_serving_tables_show_cells_memory_and_the_skipped_reason() -> None:
    text = markdown_tables(serve_record())
    lines = text.splitlines()
    assert lines[2] == (
        "| fp | 1 | 30.0 | 0.0% | 1.429 | 0.47 | 80.0 | 160.0 | 30.0 | 0.625 | 30.0 | 1.97 | 1 |"
    )
    assert (
        "| awq-opt | 4 | 56.0 | 7.1% | 0.933 | 0.88 | 240.0 | 480.0 | 65.0 | 1.066 | 65.0 | 4.33 | 0 |"
        in lines
    )
    assert "| awq-opt | lape_awq | 404.0 (1.010x) | 1,010.0 | 1,648.0 (1.030x) |" in lines
    assert "| awq | lape_awq | 400.0 | 1,000.0 | 1,600.0 |" in lines
    assert "- stock-awq (`--quantization awq`) skipped: ValueError: torch.float32 is not supported" in lines
    assert "stock-awq |" not in text  # no cells for a configuration that never served


def test_config_syntax() -> None:
    assert parse_config("stock@awq=/x/y").quantization == "awq"
    assert parse_config("opt=/x").quantization == "auto" and parse_config("opt=/x").name == "opt"
    with pytest.raises(Exception, match="NAME"):
        parse_config("no-path")


def _eval(models: dict[str, tuple[float, float, float, float]], langs=("ko", "en"), max_tokens=2048) -> dict:
    """An eval.json; models: name -> (ko ppl, en ppl, ko KL, ko top-1); FP is `fp` with KL 0."""
    fp = models["fp"]
    out = []
    for name, (ko, en, kl, top1) in models.items():
        ppl = {"ko": ko, "en": en}
        out.append(
            {
                "name": name,
                "path": f"/c/{name}",
                "langs": {
                    lang: {
                        "ppl": ppl[lang],
                        "kl": kl if lang == "ko" else kl / 2,
                        "top1": top1,
                        "tokens": 2040,
                        "ppl_change_pct": 100 * (ppl[lang] / (fp[0] if lang == "ko" else fp[1]) - 1),
                    }
                    for lang in langs
                },
            }
        )
    texts = {lang: {"source": "s", "split": "heldout", "sha256": lang * 3, "chars": "1"} for lang in langs}
    return {
        "tool": "lape-awq",
        "max_tokens": max_tokens,
        "seq_len": 256,
        "reference": "fp",
        "texts": texts,
        "models": out,
    }


def write_results(root: Path) -> Path:
    """A results folder: two eval files of the same texts, an older quality folder, a judge file, engine
    speed, a serving matrix and the pipeline timings."""
    quality = root / "quality_2026-11-20"
    quality.mkdir(parents=True)
    (quality / "koen_eval.json").write_text(
        json.dumps(
            _eval(
                {
                    "fp": (20.0, 16.0, 0.0, 1.0),
                    "awq-mix8": (30.0, 20.0, 0.4, 0.6),
                    "awq-opt-mix8": (27.5, 19.0, 0.3, 0.7),
                }
            )
        )
    )
    (quality / "koen_random_eval.json").write_text(
        json.dumps(_eval({"fp": (20.0, 16.0, 0.0, 1.0), "awq-opt-random-mix8": (29.5, 20.0, 0.39, 0.61)}))
    )
    # An older run on the same texts: its `fp` is scored again above (the newer one is shown), its
    # `awq-fp16-vocab` only here.
    old = root / "quality_2026-01-01"
    old.mkdir()
    (old / "eval.json").write_text(
        json.dumps(_eval({"fp": (20.0, 16.0, 0.0, 1.0), "awq-fp16-vocab": (29.0, 19.0, 0.35, 0.65)}))
    )
    quantized_alike = {"bits": 4, "group_size": 128, "clip": True}
    vocab_variants = [
        {"name": "4-bit", "kept_rows": 0, "vocab_bytes": 80 * MiB, "rule": None, **quantized_alike},
        {
            "name": "4-bit + 2,048 ko rows",
            "kept_rows": 2048,
            "vocab_bytes": 83 * MiB,
            "rule": "text+script",
            **quantized_alike,
        },
    ]
    vocab = {
        "benchmark": "vocab_quality",
        "date": "2026-11-21T00:00:00+00:00",
        "commit": "0a1b2c3",
        "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0+cpu"},
        "float_bytes": 320 * MiB,
        "variants": vocab_variants,
        "main": _eval(
            {
                "fp": (20.0, 16.0, 0.0, 1.0),
                "4-bit": (30.0, 18.0, 0.4, 0.6),
                "4-bit + 2,048 ko rows": (21.0, 17.0, 0.05, 0.9),
            }
        ),
        "other": _eval({"fp": (10.0, 10.0, 0.0, 1.0), "4-bit": (12.0, 11.0, 0.2, 0.8)}, max_tokens=512),
    }
    (root / "vocab_quality_2026-11-21.json").write_text(json.dumps(vocab))
    (quality / "judge.json").write_text(
        json.dumps(
            {
                "pairs": [
                    {"first": "awq-mix8", "second": "fp", "win_rate": 0.30},
                    {"first": "awq-opt-mix8", "second": "awq-mix8", "win_rate": 0.625},
                ]
            }
        )
    )
    speed_rows = [
        {
            "model": "gemma3-270m",
            "method": m,
            "dtype": "float32",
            "decode_tok_s_b1": b1,
            "decode_tok_s_b16": 10 * b1,
            "prefill_tok_s": 40 * b1,
            "weight_bytes": w * MiB,
        }
        for m, b1, w in (("fp", 20.0, 1000), ("our awq", 24.0, 690), ("our awq-opt", 23.5, 690.5))
    ]
    speed = {
        "benchmark": "vllm_speed",
        "date": "2026-11-20T09:00:00+00:00",
        "commit": "def5678",
        "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0+cpu", "gpu": None},
        "rows": speed_rows,
    }
    (root / "vllm_speed_2026-11-20.json").write_text(json.dumps(speed))
    (root / "vllm_speed_2026-01-01.json").write_text(json.dumps({**speed, "rows": []}))
    (root / "vllm_speed_2026-12-31_experiment.json").write_text(json.dumps({**speed, "rows": []}))  # tagged
    record = serve_record()
    (root / "serve_matrix_2026-11-20.json").write_text(json.dumps(record))
    pipeline = {
        "benchmark": "pipeline_speed",
        "date": "2026-11-19T00:00:00+00:00",
        "commit": "0123abc",
        "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0+cpu"},
        "calibration": {"langs": ["ko", "en"], "samples": 16, "seqlen": 512},
        "lape_tokens": 1000,
        "lape_seconds": 10.0,
        "lape_tokens_per_second": 100.0,
        "korean_neurons": 79,
        "quantize_seconds": 20.0,
        "total_seconds": 31.0,
        "target_seconds": 600.0,
        "sizes": {"sparse_fraction": 0.00078},
    }
    (root / "pipeline_speed_2026-11-19.json").write_text(json.dumps(pipeline))
    # another recipe, as `bench pipeline --tag` writes it: only its newest run is shown
    gptq = {**pipeline, "method": "gptq-opt", "quantize_options": "--method gptq-opt --act-order"}
    (root / "pipeline_speed_2026-11-21_gptq.json").write_text(json.dumps({**gptq, "quantize_seconds": 40.0}))
    (root / "pipeline_speed_2026-11-20_gptq.json").write_text(json.dumps({**gptq, "quantize_seconds": 99.0}))
    return root


SEED_TABLE = """\
| method | ko ppl (vs FP) | en ppl (vs FP) | KL ko | top-1 ko | judge win rate vs AWQ | engine decode tok/s (b1) | served out tok/s (1 client) | served out tok/s (4 clients) | checkpoint MiB | peak RSS MiB |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| FP | 20.00 | 16.00 |  |  | 70.0% | 20.0 | 30.0 | 90.0 | 1,000.0 | 2,500.0 |
| AWQ | 30.00 (+50.0%) | 20.00 (+25.0%) | 0.400 | 60.0% |  | 24.0 | 21.0 | 60.0 | 400.0 | 1,600.0 |
| AWQ-opt | 27.50 (+37.5%) | 19.00 (+18.8%) | 0.300 | 70.0% | 62.5% | 23.5 | 19.5 | 56.0 | 404.0 | 1,648.0 |"""  # noqa: E501


def test_seed_table_from_fixed_result_files(tmp_path: Path) -> None:
    sources = find_sources(write_results(tmp_path))
    # Every quality folder, newest first: the older run's `fp` does not replace the newer one's.
    assert [p.name for p in sources.evals] == ["koen_eval.json", "koen_random_eval.json", "eval.json"]
    assert sources.speed.name == "vllm_speed_2026-11-20.json" and sources.kernels is None
    assert seed_table(sources, "awq-mix8", "awq-opt-mix8") == SEED_TABLE


def test_seed_table_adds_the_mean_change_of_other_eval_groups(tmp_path: Path) -> None:
    """A second eval of other texts (here: a 512-token budget) becomes one column: its mean change vs FP."""
    results = write_results(tmp_path)
    other = _eval(
        {
            "fp": (10.0, 10.0, 0.0, 1.0),
            "awq-mix8": (13.0, 12.0, 0.4, 0.6),
            "awq-opt-mix8": (12.0, 11.0, 0.3, 0.7),
        },
        max_tokens=512,
    )
    (results / "quality_2026-11-20" / "other_eval.json").write_text(json.dumps(other))
    lines = seed_table(find_sources(results), "awq-mix8", "awq-opt-mix8").splitlines()
    assert "| ko, en: mean ppl vs FP |" in lines[0]
    assert lines[3].startswith(
        "| AWQ | 30.00 (+50.0%) | 20.00 (+25.0%) | 0.400 | 60.0% | +25.0% |"
    )  # (30 + 20) / 2
    assert lines[4].startswith("| AWQ-opt | 27.50 (+37.5%) | 19.00 (+18.8%) | 0.300 | 70.0% | +15.0% |")


def test_judge_win_rate_reads_either_order() -> None:
    judge = {"pairs": [{"first": "b", "second": "a", "win_rate": 0.75}]}
    assert judge_win_rate(judge, "b", "a") == 0.75
    assert judge_win_rate(judge, "a", "b") == 0.25
    assert judge_win_rate(judge, "a", "c") is None


def test_report_command_writes_the_table_and_fills_the_readme(tmp_path: Path, capsys) -> None:
    results = write_results(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{BEGIN}\nold, hand-typed\n{END}\n\nafter\n")
    names = ["--awq", "awq-mix8", "--awq-opt", "awq-opt-mix8"]
    assert main(["bench", "report", "--results", str(results), "--readme", str(readme), *names]) == 0
    report = next(results.glob("report_*.md")).read_text()
    assert SEED_TABLE in report
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith(f"{END}\n\nafter\n")
    assert "old, hand-typed" not in text
    assert SEED_TABLE in text
    # the quality table merges both eval files and closes the gap share: (30 - 27.5) / (30 - 20)
    assert (
        "| awq-opt-mix8 | 27.50 (+37.5%) | 19.00 (+18.8%) | 0.300 | 0.150 | 70.0% | 70.0% "
        "| 25.0% (vs awq-mix8) |" in text
    )
    assert "| awq-opt-random-mix8 | 29.50 (+47.5%) |" in text and "5.0% (vs awq-mix8)" in text
    assert "| awq-fp16-vocab | 29.00 (+45.0%) | 19.00 (+18.8%) |" in text  # from the older folder
    # The vocabulary alone: bytes, change vs float, and the kept rows' share of the 4-bit Korean loss.
    assert "| 4-bit + 2,048 ko rows | 2,048 | 83.0 | +5.0% | +6.2% | 90.0% |" in text
    assert "| float |  | 320.0 | 20.00 | 16.00 |" in text
    assert "Test CPU, 2 cores, torch 2.13.0+cpu, vllm 0.32.0; 2026-11-20, commit abc1234" in text
    assert "[`results/serve_matrix_2026-11-20.json`](results/serve_matrix_2026-11-20.json)" in text
    assert "![serving matrix](results/serve_matrix_2026-11-20.png)" in text
    assert "| LAPE over 2 languages | 10.0 s | 1,000 tokens at 100 tokens/s; 79 Korean neurons |" in text
    assert "| awq-opt quantization | 20.0 s |" in text  # the untagged run is the reference
    assert "Another recipe, `lape-awq quantize --method gptq-opt --act-order`" in text
    assert "| gptq-opt quantization | 40.0 s |" in text and "99.0 s" not in text
    assert "Not yet measured" in text
    # no markers: one clear error line, the file untouched
    readme.write_text("no markers\n")
    capsys.readouterr()
    assert main(["bench", "report", "--results", str(results), "--readme", str(readme), *names]) == 2
    assert "results:begin" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"
    with pytest.raises(UserError):
        replace_results("x", "y")


def test_readme_results_are_the_committed_results() -> None:
    """The README's Results section is what `lape-awq bench report --readme` makes of bench/results."""
    readme = (REPO / "README.md").read_text()
    start, end = readme.index(BEGIN) + len(BEGIN) + 1, readme.index(END)
    generated = results_section(find_sources(RESULTS), REPO, DEFAULT_AWQ, DEFAULT_AWQ_OPT)
    assert readme[start:end] == generated, (
        "README Results are stale: run `lape-awq bench report --readme README.md`"
    )


def test_peak_memory_of_a_process_tree_sees_a_child_allocation() -> None:
    """A parent that starts a child which fills 300 MiB: the sampler's peak includes the child's pages."""
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(300 << 20); "
        'b[::4096] = b"x" * len(b[::4096]); time.sleep(3)\'])\n'
        "child.wait()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    sampler = PeakMemorySampler(process.pid, interval=0.05)
    time.sleep(0.02)
    sampler.mark_ready()
    process.wait(30)
    peaks = sampler.stop()
    assert peaks.ready_rss is not None and peaks.ready_rss < 200 * MiB
    assert peaks.peak_rss > peaks.ready_rss + 280 * MiB
    assert not peaks.peak_gpu  # None without NVML; 0 on a GPU machine: these processes never touch the card


def test_benchmark_commands_refuse_bad_input_with_one_line(tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["bench", "serve", "--config", f"x={tmp_path / 'missing'}"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    assert main(["bench", "serve", "--config", f"x={tmp_path / 'a'}", "--config", f"x={tmp_path / 'a'}"]) == 2
    assert "distinct" in capsys.readouterr().err
    assert main(["bench", "serve", "--config", f"x={tmp_path / 'a'}", "--repeats", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "serve", "--concurrency", "1,0"])
    assert main(["bench", "load", "--model", "m", "--random-range-ratio", "1.5"]) == 2
    assert main(["bench", "load", "--model", "m", "--request-rate", "0"]) == 2
    assert main(["bench", "load", "--model", "m", "--duration", "0"]) == 2
    assert main(["bench", "report", "--results", str(tmp_path)]) == 2
    assert "no quality_<date>/ folder" in capsys.readouterr().err
    for flag in ("--act-order", "--grid-search"):
        assert main(["bench", "pipeline", flag, "--model", str(tmp_path / "missing")]) == 2
        assert f"{flag[2:]} is an option of GPTQ" in capsys.readouterr().err
    assert main(["bench", "pipeline", "--calib-weights", "xx=2", "--model", str(tmp_path / "missing")]) == 2
    assert "not in the calibration languages" in capsys.readouterr().err


def test_every_benchmark_is_a_bench_subcommand_and_runs_as_a_module(capsys) -> None:
    """Each module of bench/ with a `run` is in the registry (so `lape-awq bench --help` lists it), and
    `python -m lape_awq.bench.MODULE` is that subcommand, exit statuses included."""
    runnable = {p.stem for p in (REPO / "bench").glob("*.py") if "\ndef run(" in p.read_text()}
    assert {module.__name__.rsplit(".", 1)[-1] for module, _ in BENCHMARKS.values()} == runnable
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    listing = capsys.readouterr().out
    assert all(f"    {name} " in listing for name in BENCHMARKS)

    def module(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)

    done = module("lape_awq.bench.lape_speed", "--help")
    assert done.returncode == 0 and "lape-awq bench lape" in done.stdout and "--seq-len" in done.stdout
    done = module("lape_awq.bench.kernels", "--models", "gpt-5")
    assert done.returncode == 2 and "lape-awq: error: unknown model(s)" in done.stderr


def test_quality_table_closes_gaps_against_awq_and_against_the_same_method(tmp_path: Path) -> None:
    """Another method is scored against the same-calibration AWQ, and its kept neurons against the same
    method without them; an AWQ-opt row only against AWQ (the two baselines are one)."""
    data = _eval(
        {
            "fp": (20.0, 16.0, 0.0, 1.0),
            "awq-mix8": (30.0, 20.0, 0.4, 0.6),
            "awq-opt-mix8": (28.0, 20.0, 0.3, 0.7),
            "gptq-mix8": (26.0, 19.0, 0.3, 0.7),
            "gptq-opt-sens-mix8": (24.0, 19.0, 0.2, 0.8),
            "gptq-c64-mix8": (25.0, 19.0, 0.2, 0.8),  # more calibration: no AWQ of its calibration here
            "gptq-ko2-mix8": (25.0, 19.0, 0.2, 0.8),
            "gptq-c128-mix8": (25.0, 19.0, 0.2, 0.8),
            "awq-c128-mix8": (27.0, 19.0, 0.2, 0.8),
        }
    )
    (tmp_path / "eval.json").write_text(json.dumps(data))
    [group] = eval_groups([tmp_path / "eval.json"])
    lines = quality_table(group).splitlines()
    assert lines[0].endswith(
        "| ko gap closed vs same-calibration AWQ "
        "| ko gap closed by the kept neurons (vs the same method without) |"
    )
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert rows["awq-opt-mix8"].endswith("| 20.0% (vs awq-mix8) |  |")
    assert rows["gptq-mix8"].endswith("| 40.0% (vs awq-mix8) |  |")
    # (30 - 24) / (30 - 20) against AWQ; (26 - 24) / (26 - 20) against GPTQ
    assert rows["gptq-opt-sens-mix8"].endswith("| 60.0% (vs awq-mix8) | 33.3% (vs gptq-mix8) |")
    assert rows["awq-mix8"].endswith("|  |  |")
    assert rows["gptq-c64-mix8"].endswith("|  |  |")
    assert rows["gptq-ko2-mix8"].endswith("|  |  |")
    assert rows["gptq-c128-mix8"].endswith("| 28.6% (vs awq-c128-mix8) |  |")  # (27 - 25) / (27 - 20)

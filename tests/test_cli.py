"""The `lape-awq` command: a real run on a tiny model, and one clear line for every user mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lape_awq.quant.cli.main import main
from lape_awq.quant.lape.neurons_file import NeuronsFile

FAST = ["--tokens", "300", "--seq-len", "64", "--quiet"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_neurons_end_to_end_on_tiny_llama(tiny_model_dir, tmp_path: Path, capsys) -> None:
    model = tiny_model_dir("llama")
    out, plot = tmp_path / "n.safetensors", tmp_path / "n.png"
    code, stdout, _ = run_cli(
        capsys,
        "neurons",
        "--model",
        str(model),
        "--out",
        str(out),
        "--plot",
        str(plot),
        *FAST,
        "--langs",
        "ko,en,ja",
        "--dtype",
        "float32",
        "--top-rate",
        "0.05",
    )
    assert code == 0
    nf = NeuronsFile.load(out)
    assert nf.languages == ["ko", "en", "ja"]
    assert nf.tokens.tolist() == [300, 300, 300]
    assert nf.metadata["model"]["architecture"] == "LlamaForCausalLM"
    assert nf.metadata["options"]["top_rate"] == 0.05
    assert nf.metadata["texts"]["ko"]["source"] == "dataset-build:kor"
    ko_count = int(nf.mask("ko").sum())
    assert f"ko neurons: {ko_count} of 256" in stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_text_files_are_used(tiny_model_dir, tmp_path: Path, capsys) -> None:
    model = tiny_model_dir("qwen2")
    ko = tmp_path / "ko.txt"
    ko.write_text("안녕하세요. 오늘은 날씨가 좋습니다.\n\n한국어 문장을 더 씁니다. " * 40, encoding="utf-8")
    out = tmp_path / "n.safetensors"
    code, _, _ = run_cli(
        capsys,
        "neurons",
        "--model",
        str(model),
        "--out",
        str(out),
        *FAST,
        "--langs",
        "ko,en",
        "--text",
        f"ko={ko}",
    )
    assert code == 0
    meta = NeuronsFile.load(out).metadata
    assert meta["texts"]["ko"]["source"] == str(ko.resolve())
    assert meta["texts"]["en"]["split"] == "fit"


def _gpt2_dir(tmp_path: Path, tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=32, n_layer=1, n_head=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def mistake_args(case: str, tmp_path: Path, tokenizer) -> list[str]:
    """Arguments for one user mistake; text and option mistakes must be caught before the model is."""
    absent = ["--model", str(tmp_path / "nothing-here")]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    (tmp_path / "not-a-model").mkdir()
    return {
        "missing_model": absent,
        "not_a_model": ["--model", str(tmp_path / "not-a-model")],
        "unsupported_arch": ["--model", str(_gpt2_dir(tmp_path, tokenizer))]
        if case == "unsupported_arch"
        else [],
        "empty_text": [*absent, "--text", f"ko={empty}"],
        "missing_text": [*absent, "--text", f"ko={tmp_path / 'absent.txt'}"],
        "unknown_lang": [*absent, "--langs", "ko,xx"],
        "bad_text_arg": [*absent, "--text", "ko"],
        "text_not_in_langs": [*absent, "--langs", "en,ja", "--target", "en", "--text", f"ko={empty}"],
        "target_not_in_langs": [*absent, "--langs", "en,ja"],
        "one_language": [*absent, "--langs", "ko"],
        "bad_option": [*absent, "--top-rate", "0"],
        "bad_budget": [*absent, "--tokens", "0"],
        "bad_dtype": [*absent, "--dtype", "int8"],
    }[case]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_model", "model directory not found"),
        ("not_a_model", "no config.json"),
        ("unsupported_arch", "unsupported architecture GPT2LMHeadModel"),
        ("empty_text", "is empty"),
        ("missing_text", "text file for 'ko' not found"),
        ("unknown_lang", "unknown language code 'xx'"),
        ("bad_text_arg", "--text expects LANG=FILE"),
        ("text_not_in_langs", "not in --langs"),
        ("target_not_in_langs", "--target 'ko' is not among"),
        ("one_language", "at least two"),
        ("bad_option", "top_rate must be in (0, 1]"),
        ("bad_budget", "tokens-per-language must be at least 1"),
        ("bad_dtype", "unknown dtype 'int8'"),
    ],
)
def test_user_mistakes_give_one_clear_line(
    case: str, expected: str, tmp_path: Path, tokenizer, capsys
) -> None:
    out = tmp_path / "o.safetensors"
    code, _, stderr = run_cli(
        capsys, "neurons", "--out", str(out), *FAST, *mistake_args(case, tmp_path, tokenizer)
    )
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lape-awq: error: ") and expected in lines[0], stderr
    assert not out.exists()


def test_installed_command_reports_errors_without_traceback(tmp_path: Path) -> None:
    """The console script itself, in a fresh process: --help works, a mistake exits 2 in one line."""
    helped = subprocess.run(["lape-awq", "neurons", "--help"], capture_output=True, text=True, check=True)
    assert "--tokens" in helped.stdout and "--plot" in helped.stdout
    failed = subprocess.run(
        ["lape-awq", "neurons", "--model", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert failed.returncode == 2
    assert failed.stderr.strip() == f"lape-awq: error: model directory not found: {tmp_path / 'nope'}"


def test_model_path_prints_the_cache_location(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LAPE_AWQ_HOME", str(tmp_path))
    code, stdout, stderr = run_cli(capsys, "model", "path")
    assert code == 0 and stdout.strip() == str(tmp_path / "models" / "gemma3-270m-v1")
    assert "not prepared yet" in stderr


def test_module_entry_point_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lape_awq.quant.cli.main", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("lape-awq ")


def test_quantize_refuses_to_overwrite_unless_asked(tiny_model_dir, tmp_path: Path, capsys) -> None:
    model = tiny_model_dir("llama")
    out = tmp_path / "rtn"
    args = [
        "quantize",
        "--model",
        str(model),
        "--method",
        "rtn",
        "--group-size",
        "32",
        "--vocab-group-size",
        "32",
        "--out",
        str(out),
        "--quiet",
    ]
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and f"checkpoint: {out}" in stdout and "method rtn" in stdout
    assert "vocabulary: 4-bit, group 32; 0 FP16 rows for no language" in stdout  # the default: 4 bits
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    code, _, stderr = run_cli(capsys, *args)
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    code, _, _ = run_cli(capsys, *args, "--overwrite")
    assert code == 0 and (out / "model.safetensors").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_quantize_vocabulary_options(tiny_model_dir, tmp_path: Path, capsys) -> None:
    import json

    from safetensors.torch import load_file

    model = tiny_model_dir("llama")
    out = tmp_path / "v8"
    code, stdout, _ = run_cli(
        capsys,
        *("quantize", "--model", str(model), "--method", "rtn", "--group-size", "32", "--out", str(out)),
        *(
            "--vocab-bits",
            "8",
            "--vocab-group-size",
            "64",
            "--keep-vocab-lang",
            "ko,en",
            "--max-vocab-rows",
            "100",
        ),
        "--quiet",
    )
    assert code == 0, stdout
    assert "vocabulary: 8-bit, group 64; 100 FP16 rows for ko,en" in stdout
    vocab = json.loads((out / "config.json").read_text())["quantization_config"]["vocab"]
    assert vocab["bits"] == 8 and vocab["group_size"] == 64 and vocab["kept_rows"] == 100
    assert vocab["languages"] == ["ko", "en"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.qweight"].shape[1] == 64 and "model.embed_tokens.weight" not in tensors
    # --vocab-bits 16 is the FP16 vocabulary of plain AWQ checkpoints (stock loaders read them).
    code, stdout, _ = run_cli(
        capsys,
        "quantize",
        "--model",
        str(model),
        "--method",
        "rtn",
        "--group-size",
        "32",
        "--vocab-bits",
        "16",
        "--out",
        str(tmp_path / "v16"),
        "--quiet",
    )
    config = json.loads((tmp_path / "v16" / "config.json").read_text())
    assert code == 0 and config["quantization_config"]["quant_method"] == "awq"
    assert "vocab" not in config["quantization_config"] and "vocabulary:" not in stdout


def test_quantize_mistakes(tiny_model_dir, tmp_path: Path, capsys) -> None:
    model = tiny_model_dir("llama")
    code, _, stderr = run_cli(capsys, "quantize", "--model", str(model), "--method", "awq", "--neurons", "x")
    assert code == 2 and "for --method awq-opt" in stderr
    code, _, stderr = run_cli(
        capsys, "quantize", "--model", str(model), "--method", "awq-opt", "--neurons", str(tmp_path / "none")
    )
    assert code == 2 and "neurons file not found" in stderr
    base = ["quantize", "--model", str(model), "--method", "rtn", "--out", str(tmp_path / "x")]
    code, _, stderr = run_cli(capsys, *base, "--vocab-bits", "16", "--keep-vocab-lang", "ko")
    assert code == 2 and "needs --vocab-bits 8 or 4" in stderr
    code, _, stderr = run_cli(capsys, *base, "--group-size", "32")  # vocabulary groups of 128 in 64 channels
    assert code == 2 and "not a multiple of --vocab-group-size 128" in stderr
    code, _, stderr = run_cli(
        capsys, *base, "--vocab-group-size", "32", "--max-vocab-rows", "-1", "--keep-vocab-lang", "ko"
    )
    assert code == 2 and "--max-vocab-rows must be >= 0" in stderr
    assert not (tmp_path / "x").exists()

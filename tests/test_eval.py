"""`lape-awq eval`: the metrics against slow independent references, the reports, and the command."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import build_tiny_model
from lape_awq.quant.awq.pipeline import quantize_checkpoint
from lape_awq.quant.awq.quantizer import QuantSpec
from lape_awq.quant.calibration import CalibrationSpec
from lape_awq.quant.checkpoint.layout import MANIFEST
from lape_awq.quant.checkpoint.torch_reference import load_quantized_model
from lape_awq.quant.cli.main import main
from lape_awq.quant.errors import UserError
from lape_awq.quant.evaluation.checkpoints import load_checkpoints
from lape_awq.quant.evaluation.report import load_json, markdown, write_reports
from lape_awq.quant.evaluation.scoring import FP_NAME, evaluate
from lape_awq.quant.text_sources import LanguageText, builtin_text
from lape_awq.quant.vocab.quantizer import VocabSpec

CALIB = CalibrationSpec(("en",), 4, 64)


def sharpen(model: nn.Module) -> None:
    """Random init gives near-uniform next-token distributions; larger weights give peaked ones, so KL
    and top-1 disagreement of the quantized model are far from zero and from rounding noise."""
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(5)


@dataclass
class Tiny:
    model_dir: Path
    rtn_dir: Path
    awq_dir: Path
    fp: nn.Module
    rtn: nn.Module
    awq: nn.Module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Tiny:
    """A sharpened tiny Llama and its RTN and AWQ checkpoints (group size 32), made once per module; the RTN
    one with a 4-bit vocabulary and 100 kept Korean rows, so eval runs a quantized vocabulary too."""
    root = tmp_path_factory.mktemp("eval")
    fp = build_tiny_model("llama", len(tokenizer))
    sharpen(fp)
    model_dir = root / "tiny-llama"
    fp.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    dirs = {}
    for method in ("rtn", "awq"):
        dirs[method] = root / method
        vocab = VocabSpec(4, 32, ("ko",), 100) if method == "rtn" else None
        spec = QuantSpec(method=method, group_size=32)
        quantize_checkpoint(model_dir, dirs[method], spec, CALIB, None, False, vocab=vocab)
    return Tiny(
        model_dir,
        dirs["rtn"],
        dirs["awq"],
        fp,
        load_quantized_model(dirs["rtn"], torch.float32),
        load_quantized_model(dirs["awq"], torch.float32),
    )


def reference_windows(tokenizer, text: LanguageText, max_tokens: int, seq_len: int) -> list[list[int]]:
    """Written out independently: the whole text tokenized, cut, each window led by <bos>."""
    ids = tokenizer(text.text, add_special_tokens=False)["input_ids"][:max_tokens]
    return [[tokenizer.bos_token_id, *ids[i : i + seq_len]] for i in range(0, len(ids), seq_len)]


def logits64(model: nn.Module, window: list[int]) -> torch.Tensor:
    """float64 logits of the predictions scored: after the <bos> position, before the last token."""
    with torch.no_grad():
        return model(torch.tensor([window])).logits[0, 1:-1].double()


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_fp_perplexity_matches_cross_entropy_reference(tiny: Tiny, tokenizer) -> None:
    texts = [builtin_text("ko", "heldout"), builtin_text("en", "heldout")]
    result = evaluate(tiny.fp, tokenizer, {}, texts, max_tokens=100, seq_len=32, progress=False)
    assert result.models == [FP_NAME] and result.langs == ["ko", "en"]
    for text in texts:
        nll, count = 0.0, 0
        for w in reference_windows(tokenizer, text, 100, 32):  # 32, 32, 32 and 4 text tokens
            target = torch.tensor(w[2:])
            nll += float(F.cross_entropy(logits64(tiny.fp, w), target, reduction="sum"))
            count += len(target)
        score = result.score(FP_NAME, text.lang)
        assert count == score.tokens == 3 * 31 + 3
        assert rel(score.ppl, math.exp(nll / count)) < 1e-6
        assert score.kl == 0.0 and score.top1 == 1.0


def test_the_float_model_against_itself_has_zero_kl_and_full_agreement(tiny: Tiny, tokenizer) -> None:
    texts = [builtin_text("ja", "heldout")]
    result = evaluate(
        tiny.fp,
        tokenizer,
        {"same": tiny.fp, "rtn": tiny.rtn},
        texts,
        max_tokens=64,
        seq_len=32,
        progress=False,
    )
    fp, same, rtn = (result.score(m, "ja") for m in (FP_NAME, "same", "rtn"))
    assert abs(same.kl) < 1e-12 and same.top1 == 1.0 and rel(same.ppl, fp.ppl) < 1e-12
    assert result.ppl_change("same", "ja") == pytest.approx(0.0, abs=1e-9)
    # The check has teeth: a quantized model differs measurably.
    assert rtn.kl > 1e-3 and rtn.top1 < 1.0 and rtn.ppl != fp.ppl


def test_quantized_kl_and_top1_match_a_float64_reference(tiny: Tiny, tokenizer) -> None:
    text = builtin_text("ko", "heldout")
    quantized = {"rtn": tiny.rtn, "awq": tiny.awq}
    result = evaluate(tiny.fp, tokenizer, quantized, [text], max_tokens=32, seq_len=32, progress=False)
    (window,) = reference_windows(tokenizer, text, 32, 32)
    target = torch.tensor(window[2:])
    p_logits = logits64(tiny.fp, window)
    for name, model in quantized.items():
        q_logits = logits64(model, window)
        kl, agree, nll = 0.0, 0, 0.0
        for t in range(len(target)):  # slowly, position by position
            p, q = torch.softmax(p_logits[t], -1), torch.softmax(q_logits[t], -1)
            kl += float((p * (p.log() - q.log())).sum())
            agree += int(p.argmax() == q.argmax())
            nll -= float(q[target[t]].log())
        score = result.score(name, "ko")
        assert score.tokens == len(target) == 31
        assert rel(score.kl, kl / 31) < 1e-6
        assert score.top1 == agree / 31
        assert rel(score.ppl, math.exp(nll / 31)) < 1e-6


def test_reports_are_written_and_json_round_trips(tiny: Tiny, tokenizer, tmp_path: Path) -> None:
    texts = [builtin_text("ko", "heldout"), builtin_text("en", "heldout")]
    paths = {FP_NAME: str(tiny.model_dir), "rtn": str(tiny.rtn_dir)}
    result = evaluate(
        tiny.fp,
        tokenizer,
        {"rtn": tiny.rtn},
        texts,
        max_tokens=40,
        seq_len=20,
        progress=False,
        model_paths=paths,
    )
    written = write_reports(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "eval.md", "eval.png"]
    assert load_json(written["json"]) == result
    data = json.loads(written["json"].read_text())
    assert [(m["name"], m["path"]) for m in data["models"]] == list(paths.items())
    assert data["texts"]["ko"]["split"] == "heldout" and data["texts"]["ko"]["sha256"] == texts[0].sha256
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = written["markdown"].read_text()
    assert md == markdown(result)
    rtn_ko = result.score("rtn", "ko")
    assert f"| rtn | {rtn_ko.kl:.4f} |" in md and f"{result.ppl_change('rtn', 'ko'):+.2f}%" in md


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--max-tokens", "128", "--seq-len", "32", "--quiet"]


def test_eval_command_end_to_end(tiny: Tiny, tmp_path: Path, capsys) -> None:
    ko = tmp_path / "ko.txt"
    ko.write_text(
        "안녕하세요. 오늘은 날씨가 좋습니다.\n\n한국어 평가 문장을 더 씁니다. " * 30, encoding="utf-8"
    )
    out = tmp_path / "results"
    code, stdout, _ = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny.model_dir),
        "--checkpoint",
        str(tiny.rtn_dir),
        "--checkpoint",
        f"opt={tiny.awq_dir}",
        "--langs",
        "ko,en",
        "--text",
        f"ko={ko}",
        "--out",
        str(out),
        *FAST,
    )
    assert code == 0
    result = load_json(out / "eval.json")
    assert result.models == [FP_NAME, "rtn", "opt"] and result.langs == ["ko", "en"]
    dirs = {FP_NAME: tiny.model_dir, "rtn": tiny.rtn_dir, "opt": tiny.awq_dir}
    assert result.model_paths == {name: str(d.resolve()) for name, d in dirs.items()}
    assert result.texts["ko"]["source"] == str(ko.resolve()) and result.texts["en"]["split"] == "heldout"
    assert all(result.score(m, lang).tokens == 4 * 31 for m in result.models for lang in result.langs)
    assert stdout.startswith(markdown(result))
    assert f"results: {out / 'eval.md'}, {out / 'eval.json'}, {out / 'eval.png'}" in stdout


def mistake_args(case: str, tmp_path: Path, tiny: Tiny, tiny_model_dir) -> list[str]:
    """Arguments for one user mistake; all but `other_model` are caught before any model is loaded."""
    absent = ["--model", str(tmp_path / "no-model")]
    rtn = ["--checkpoint", str(tiny.rtn_dir)]
    cases = {
        "missing_checkpoint": lambda: [*absent, "--checkpoint", str(tmp_path / "absent")],
        "no_checkpoint": lambda: absent,
        "same_name": lambda: [*absent, *rtn, *rtn],
        "fp_name": lambda: [*absent, "--checkpoint", f"fp={tiny.rtn_dir}"],
        "bad_text_arg": lambda: [*absent, *rtn, "--text", "ko"],
        "missing_text": lambda: [*absent, *rtn, "--langs", "ko,en", "--text", f"ko={tmp_path / 'none.txt'}"],
        "unknown_lang": lambda: [*absent, *rtn, "--langs", "ko,xx"],
        "bad_seq_len": lambda: [*absent, *rtn, "--seq-len", "1"],
        "out_is_a_file": lambda: [*absent, *rtn, "--out", str(tiny.rtn_dir / "config.json")],
        "missing_model": lambda: [*absent, *rtn],
        "other_model": lambda: ["--model", str(tiny_model_dir("qwen2")), *rtn],
    }
    return cases[case]()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_checkpoint", "checkpoint directory not found"),
        ("no_checkpoint", "give at least one --checkpoint"),
        ("same_name", "two checkpoints are named 'rtn'"),
        ("fp_name", "'fp' names the float model"),
        ("bad_text_arg", "--text expects LANG=FILE"),
        ("missing_text", "text file for 'ko' not found"),
        ("unknown_lang", "unknown language code 'xx'"),
        ("bad_seq_len", "--seq-len must be at least 2"),
        ("out_is_a_file", "--out must be a folder"),
        ("missing_model", "model directory not found"),
        ("other_model", "was quantized from another model"),
    ],
)
def test_user_mistakes_give_one_clear_line(
    case: str, expected: str, tiny: Tiny, tiny_model_dir, tmp_path: Path, capsys
) -> None:
    args = mistake_args(case, tmp_path, tiny, tiny_model_dir)
    code, _, stderr = run_cli(capsys, "eval", "--out", str(tmp_path / "out"), *FAST, *args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lape-awq: error: ") and expected in lines[0], stderr
    assert not (tmp_path / "out").exists()


def test_checkpoints_of_another_model_are_refused(tiny: Tiny, tokenizer, tmp_path: Path) -> None:
    qwen2 = build_tiny_model("qwen2", len(tokenizer))
    with pytest.raises(UserError, match="was quantized from another model"):
        load_checkpoints({"rtn": tiny.rtn_dir}, qwen2)
    # Without a manifest the architecture and the vocabulary still give it away.
    bare = tmp_path / "bare"
    shutil.copytree(tiny.rtn_dir, bare)
    (bare / MANIFEST).unlink()
    with pytest.raises(UserError, match="is a LlamaForCausalLM, the model is a Qwen2ForCausalLM"):
        load_checkpoints({"bare": bare}, qwen2)
    with pytest.raises(UserError, match="has vocab_size 262144, the model has 1000"):
        load_checkpoints({"bare": bare}, build_tiny_model("llama", 1000))
    assert list(load_checkpoints({"rtn": tiny.rtn_dir, "bare": bare}, tiny.fp)) == ["rtn", "bare"]

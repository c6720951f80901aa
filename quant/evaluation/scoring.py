"""Per-language quality of quantized checkpoints against their float model: perplexity on held-out
text, KL(P_FP || P_Q) of the next-token distributions, and top-1 agreement with the float model.

Windows: the first `max_tokens` tokens of each language's held-out text, cut into `seq_len` text
tokens, each led by <bos> where the tokenizer has one. The prediction at position t scores token t+1;
the prediction made at the <bos> position is never scored, so a window of n text tokens scores n - 1
predictions with or without <bos>. Models run in float32; log-softmax, KL and sums are float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lape_awq.quant.errors import UserError
from lape_awq.quant.text_sources import LanguageText
from lape_awq.quant.token_streams import chunk_sequences

FP_NAME = "fp"
DEFAULT_MAX_TOKENS = 2048
DEFAULT_SEQ_LEN = 256
# Tokens past the budget before a cut at a paragraph break: the cut cannot change tokens that far back.
_CUT_MARGIN = 64
# Rows of float64 [rows, vocab] temporaries at a time: 32 x 262,144 x 8 B = 64 MiB each. Measured on the
# 2-core CPU: smaller chunks pay a thread sync per op (8 rows: 1.7x slower), larger ones miss in cache.
_ROW_CHUNK = 32


@dataclass(frozen=True)
class Score:
    """One model on one language: perplexity, mean KL from the float model, top-1 agreement, tokens."""

    ppl: float
    kl: float
    top1: float
    tokens: int


@dataclass
class EvalResult:
    """Scores per model (the float model first, named FP_NAME) and language, with what produced them."""

    models: list[str]
    langs: list[str]
    scores: dict[str, dict[str, Score]]
    max_tokens: int
    seq_len: int
    texts: dict[str, dict[str, str]]  # lang -> LanguageText.describe()
    model_paths: dict[str, str] = field(default_factory=dict)

    def score(self, model: str, lang: str) -> Score:
        return self.scores[model][lang]

    def ppl_change(self, model: str, lang: str) -> float:
        """Perplexity change against the float model, in percent."""
        return 100.0 * (self.score(model, lang).ppl / self.score(FP_NAME, lang).ppl - 1.0)

    def to_json(self) -> dict[str, Any]:
        """Each model (with its path) and its per-language scores; `ppl_change_pct` is derived."""
        return {
            "max_tokens": self.max_tokens,
            "seq_len": self.seq_len,
            "reference": FP_NAME,
            "texts": self.texts,
            "models": [
                {
                    "name": m,
                    "path": self.model_paths.get(m),
                    "langs": {
                        lang: {**vars(self.score(m, lang)), "ppl_change_pct": self.ppl_change(m, lang)}
                        for lang in self.langs
                    },
                }
                for m in self.models
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResult:
        fields = ("ppl", "kl", "top1", "tokens")
        models = data["models"]
        return cls(
            models=[m["name"] for m in models],
            langs=list(models[0]["langs"]),
            scores={
                m["name"]: {lang: Score(**{k: s[k] for k in fields}) for lang, s in m["langs"].items()}
                for m in models
            },
            max_tokens=data["max_tokens"],
            seq_len=data["seq_len"],
            texts=data["texts"],
            model_paths={m["name"]: m["path"] for m in models if m.get("path") is not None},
        )


def check_settings(max_tokens: int, seq_len: int) -> None:
    if max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {max_tokens}")
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (a window scores seq-len - 1 tokens), got {seq_len}")


def heldout_ids(tokenizer: Any, text: LanguageText, max_tokens: int) -> list[int]:
    """The first `max_tokens` tokens of the text, as if it were tokenized whole.

    Long texts are tokenized by growing prefixes cut at a paragraph break, so a big user file costs
    about what the budget needs.
    """
    body = text.text
    chars = 4 * (max_tokens + _CUT_MARGIN)
    while True:
        cut = body.find("\n\n", chars)
        ids = tokenizer(body if cut < 0 else body[:cut], add_special_tokens=False)["input_ids"]
        if cut < 0 or len(ids) >= max_tokens + _CUT_MARGIN:
            break
        chars = max(2 * chars, cut + 2)
    if len(ids) < 2:
        raise UserError(f"the {text.lang!r} text ({text.source}) has fewer than 2 tokens to evaluate")
    return ids[:max_tokens]


def eval_windows(tokenizer: Any, text: LanguageText, max_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """The language's windows (1-D token ids, <bos> first where the tokenizer has one); none is empty."""
    bos = getattr(tokenizer, "bos_token_id", None)
    windows = chunk_sequences(heldout_ids(tokenizer, text, max_tokens), seq_len, bos)
    return [w for w in windows if len(w) - (bos is not None) >= 2]


@torch.inference_mode()
def window_logits(model: nn.Module, window: torch.Tensor, start: int) -> torch.Tensor:
    """Float32 logits [n, vocab] of the scored predictions: positions start .. len-2 of the window."""
    device = next(model.parameters()).device
    logits = model(window[None].to(device), use_cache=False).logits[0, start:-1]
    return logits.float().cpu()


@dataclass
class _Sums:
    """Float64 running sums of one model on one language."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0

    def add(self, other: _Sums) -> None:
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree
        self.tokens += other.tokens

    def score(self) -> Score:
        n = self.tokens
        return Score(math.exp(self.nll / n), self.kl / n, self.agree / n, n)


def _row_chunks(n: int) -> list[slice]:
    return [slice(i, min(i + _ROW_CHUNK, n)) for i in range(0, n, _ROW_CHUNK)]


@dataclass
class ReferenceWindow:
    """The float model's logits on one window, with what every comparison reuses."""

    logits: torch.Tensor  # [n, V] float32
    lse: torch.Tensor  # [n] float64 log-sum-exp of each row
    targets: torch.Tensor  # [n] int64

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> ReferenceWindow:
        lse = torch.cat([torch.logsumexp(logits[s].double(), dim=-1) for s in _row_chunks(len(logits))])
        return cls(logits, lse, targets.long())

    def self_sums(self) -> _Sums:
        """The float model against itself: KL 0 and full agreement by definition; only NLL is computed."""
        target_logit = self.logits.gather(1, self.targets[:, None])[:, 0].double()
        n = len(self.targets)
        return _Sums(float((self.lse - target_logit).sum()), 0.0, n, n)

    def compare(self, q_logits: torch.Tensor) -> _Sums:
        """NLL of the quantized model, KL(P_FP || P_Q) and argmax agreement, summed over the window."""
        if q_logits.shape != self.logits.shape:
            raise UserError(
                f"logits of shape {tuple(q_logits.shape)} differ from the float model's "
                f"{tuple(self.logits.shape)}: not the same vocabulary"
            )
        sums = _Sums(tokens=len(self.targets))
        for s in _row_chunks(len(self.targets)):
            a, b = self.logits[s].double(), q_logits[s].double()
            lse_q = torch.logsumexp(b, dim=-1)
            p = torch.exp(a - self.lse[s, None])
            # KL = E_p[a - b] - lse_p + lse_q: one fused pass, no log-softmax tensors.
            sums.kl += float((torch.einsum("rv,rv->r", p, a - b) - self.lse[s] + lse_q).sum())
            sums.nll += float((lse_q - b.gather(1, self.targets[s, None])[:, 0]).sum())
        sums.agree = int((self.logits.argmax(-1) == q_logits.argmax(-1)).sum())
        return sums


def evaluate(
    fp_model: nn.Module,
    tokenizer: Any,
    quantized: Mapping[str, nn.Module],
    texts: list[LanguageText],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
    model_paths: Mapping[str, str] | None = None,
) -> EvalResult:
    """Score the float model and each quantized model on every language's held-out windows.

    One window at a time: the float model's logits are kept while each quantized model runs on the
    same window, so at most two windows of logits are alive at once.
    """
    check_settings(max_tokens, seq_len)
    if FP_NAME in quantized:
        raise UserError(f"the name {FP_NAME!r} is the float model's; name the checkpoint differently")
    langs = [t.lang for t in texts]
    if len(set(langs)) != len(langs):
        raise UserError(f"a language is listed twice: {','.join(langs)}")
    start = int(getattr(tokenizer, "bos_token_id", None) is not None)
    models = [FP_NAME, *quantized]
    scores: dict[str, dict[str, Score]] = {m: {} for m in models}
    for text in texts:
        windows = eval_windows(tokenizer, text, max_tokens, seq_len)
        sums = {m: _Sums() for m in models}
        bar = tqdm(windows, desc=f"eval {text.lang}", unit="window", disable=not progress)
        for window in bar:
            ref = ReferenceWindow.from_logits(window_logits(fp_model, window, start), window[start + 1 :])
            sums[FP_NAME].add(ref.self_sums())
            for name, model in quantized.items():
                sums[name].add(ref.compare(window_logits(model, window, start)))
        for m in models:
            scores[m][text.lang] = sums[m].score()
    return EvalResult(
        models=models,
        langs=langs,
        scores=scores,
        max_tokens=max_tokens,
        seq_len=seq_len,
        texts={t.lang: t.describe() for t in texts},
        model_paths=dict(model_paths or {}),
    )

"""Greedy answers of a contender (the float model or a checkpoint) to the Korean questions: its chat
template where it has one, else a plain `질문: ... 답변:` prompt cut at the next marker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lape_awq.quant.errors import UserError
from lape_awq.quant.evaluation.judge.questions import Question

DEFAULT_MAX_NEW_TOKENS = 512
# For tokenizers without a chat template (base models such as the default Gemma 3 270M).
PLAIN_PROMPT = "질문: {question}\n답변:"
# A base model on the plain prompt tends to go on in its format, with a new question or another answer:
# the answer ends where either starts.
_PLAIN_MARKERS = ("\n질문:", "\n답변:")


def prompt_ids(tokenizer: Any, question: str) -> tuple[list[int], bool]:
    """Token ids of the prompt, and whether it is the plain one (the tokenizer has no chat template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        # The template writes <bos> itself where the model wants one.
        return tokenizer(text, add_special_tokens=False)["input_ids"], False
    return tokenizer(PLAIN_PROMPT.format(question=question))["input_ids"], True


def stop_at_plain_marker(tokenizer: Any, prompt_len: int) -> Any:
    """A StoppingCriteria ending generation once the new text holds a plain-prompt marker."""
    from transformers import StoppingCriteria

    class StopAtPlainMarker(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            # A marker is a few tokens long: decoding the tail is enough, and O(1) per step.
            new = input_ids[0, max(prompt_len, input_ids.shape[1] - 16) :]
            tail = tokenizer.decode(new, skip_special_tokens=True)
            done = any(m in tail for m in _PLAIN_MARKERS)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StopAtPlainMarker()


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the generation config (chat models list their end-of-turn there) and
    the tokenizer."""
    ids: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@torch.inference_mode()
def generate_answer(model: nn.Module, tokenizer: Any, question: str, max_new_tokens: int) -> str:
    """The model's greedy answer to one question, special tokens removed."""
    from transformers import GenerationConfig, StoppingCriteriaList

    ids, plain = prompt_ids(tokenizer, question)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    # A fresh config: the model's own may ask for sampling; the answers must be greedy and reproducible.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None, pad_token_id=pad
    )
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    stop = StoppingCriteriaList([stop_at_plain_marker(tokenizer, len(ids))] if plain else [])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        stopping_criteria=stop,
    )
    answer = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    if plain:
        for marker in _PLAIN_MARKERS:
            answer = answer.split(marker, 1)[0]
    return answer.strip()


def generate_answers(
    models: Mapping[str, nn.Module],
    tokenizer: Any,
    questions: list[Question],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
) -> dict[str, dict[str, str]]:
    """model name -> question id -> answer."""
    if max_new_tokens < 1:
        raise UserError(f"--judge-max-tokens must be at least 1, got {max_new_tokens}")
    answers: dict[str, dict[str, str]] = {}
    for name, model in models.items():
        bar = tqdm(questions, desc=f"answers {name}", unit="question", disable=not progress)
        answers[name] = {q.id: generate_answer(model, tokenizer, q.question, max_new_tokens) for q in bar}
    return answers

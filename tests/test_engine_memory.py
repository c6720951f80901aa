"""An engine stopped in this process leaves nothing of itself behind (issue 19: the API server grew by
300-600 MiB per hot swap, its tokenizers pinned by vLLM's module-level caches).

A real vLLM engine starts in-process (its engine core in a child process, as in `serve`) on a tiny Gemma 3
with the real 262k-token tokenizer, answers one chat request (which fills the chat-template caches), and
stops; after `release_engine_memory` no tokenizer, renderer or engine object it made may be reachable.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

from server_models import write_byte_cycle_model

from lape_awq.server.engines import EngineOptions, release_engine_memory, start_engine


def _vllm_objects() -> list[object]:
    """Every live object of the kinds one engine start makes in this process."""
    from transformers import PreTrainedTokenizerBase
    from vllm.renderers.hf import HfRenderer
    from vllm.v1.engine.async_llm import AsyncLLM

    return [o for o in gc.get_objects() if isinstance(o, PreTrainedTokenizerBase | HfRenderer | AsyncLLM)]


async def _start_chat_stop(checkpoint: Path) -> list[weakref.ref]:
    """Start an engine, chat once, stop it; weak references to what it made (alive until now)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    before = {id(o) for o in _vllm_objects()}
    engine = await start_engine(
        "memory",
        checkpoint,
        EngineOptions(kv_cache_gib=0.05, max_model_len=256, max_num_seqs=2, enforce_eager=True),
    )
    try:
        request = ChatCompletionRequest(
            model="memory", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=2
        )
        response = await engine.state.openai_serving_chat.create_chat_completion(request)
        assert response.choices, response
        made = [weakref.ref(o) for o in _vllm_objects() if id(o) not in before]
    finally:
        await engine.shutdown()
    assert made, "the engine made no tokenizer in this process: the test checks nothing"
    return made


async def _check(checkpoint: Path) -> None:
    made = await _start_chat_stop(checkpoint)
    # Checked while the event loop still runs, as in the server: its tasks would hold what they reference.
    await asyncio.to_thread(release_engine_memory)
    alive = [type(o).__name__ for o in (ref() for ref in made) if o is not None]
    assert not alive, f"still reachable after the engine stopped: {alive}"
    from vllm.tokenizers import registry
    from vllm.utils import func_utils

    assert registry.cached_get_tokenizer.cache_info().currsize == 0
    assert func_utils._supports_kw.cache_info().currsize == 0


def test_a_stopped_engine_leaves_no_tokenizer_behind(tmp_path: Path, tokenizer) -> None:
    asyncio.run(_check(write_byte_cycle_model(tmp_path / "bytes", tokenizer)))

"""One vLLM async engine per served checkpoint, with vLLM's own OpenAI serving objects in front of it.

The chat/completion handlers, sampling-parameter validation, chat templates, streaming detokenization and
usage accounting are vLLM's (`init_app_state` on a per-engine `State`); this module only starts and stops
engines, off the event loop so that a hot swap never stalls the requests being served.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.datastructures import State

from lape_awq.server.engine_observer import ObservedEngine

# Used when a checkpoint's tokenizer has no chat template (the embedded default is a base model).
FALLBACK_CHAT_TEMPLATE = Path(__file__).parent / "templates" / "gemma_turns.jinja"
GiB = 1 << 30
# vLLM's CPU engine reserves one core per rank for its scheduler process unless told otherwise. Up to this
# many cores that reservation costs more than it saves: on 2 cores (AMD EPYC, AVX2) serving the default
# AWQ-opt checkpoint with none reserved gave 13.0 / 42.1 / 66.7 output tok/s at 1 / 4 / 16 clients against
# 11.0 / 35.2 / 41.9 with one (bench/results/serve_matrix_2026-12-07_threads-*).
SMALL_CPU_CORES = 4


class LoadError(Exception):
    """A checkpoint could not be served; the message says why (shown to the admin who asked)."""


class OptionsRefused(LoadError):
    """Engine options this machine or this model cannot honour, refused before an engine starts."""


@dataclass(frozen=True)
class EngineOptions:
    """Per-checkpoint engine settings (the `serve` flags and the admin load body)."""

    dtype: str = "auto"
    max_model_len: int | None = None
    kv_cache_gib: float = 1.0  # CPU: KV-cache size in GiB
    gpu_memory_utilization: float = 0.4  # CUDA: fraction of the card, leaves room for a second engine
    tensor_parallel_size: int = 1
    max_num_seqs: int = 64
    enforce_eager: bool = False
    chat_template: str | None = None
    # auto: plain AWQ checkpoints run on the lape_awq method (zero kept neurons): the same kernels as
    # AWQ-opt, so an A/B compares like with like, and fp32 works (Gemma 3 on CPU; stock AWQ refuses it).
    # None: whatever vLLM picks from the checkpoint; any other value is passed to vLLM as --quantization.
    quantization: str | None = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_gib <= 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("kv_cache_gib must be > 0 and gpu_memory_utilization in (0, 1]")
        if self.tensor_parallel_size < 1 or self.max_num_seqs < 1 or (self.max_model_len or 1) < 1:
            raise ValueError("tensor_parallel_size, max_num_seqs and max_model_len must be >= 1")

    def with_updates(self, updates: dict[str, Any]) -> EngineOptions:
        """These options with `updates` applied, type-checked (the admin API passes user JSON here)."""
        from pydantic import TypeAdapter, ValidationError

        unknown = set(updates) - set(self.__dataclass_fields__)
        if unknown:
            raise LoadError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        try:
            return TypeAdapter(EngineOptions).validate_python({**self.__dict__, **updates})
        except ValidationError as error:
            problems = "; ".join(
                ": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in error.errors()
            )
            raise LoadError(f"bad engine options: {problems}") from error


@dataclass
class LoadedEngine:
    """A started engine and the vLLM serving state bound to it. `label` is the checkpoint's public name
    (server/checkpoint_roots.py), set by the registry."""

    name: str
    checkpoint: Path
    quant_method: str
    engine_quantization: str | None
    client: ObservedEngine
    state: State
    max_model_len: int
    options: EngineOptions = field(default_factory=EngineOptions)
    label: str = ""
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    retired: bool = False
    death_seen: bool = False  # the registry's watchdog has reported this engine dead
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def healthy(self) -> bool:
        return not self.client.errored

    @property
    def pids(self) -> list[int]:
        """The engine-core processes vLLM started for this engine (their workers are their children);
        empty when the engine runs in this process."""
        resources = getattr(getattr(self.client.engine, "engine_core", None), "resources", None)
        processes = getattr(getattr(resources, "engine_manager", None), "processes", None) or []
        return [process.pid for process in processes if process.pid is not None]

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.client.engine.shutdown)


def release_engine_memory() -> None:
    """Free what vLLM keeps in this process of engines that are gone; call it once a stopped engine is no
    longer referenced. Safe while other engines serve: the caches cleared here only memoize, and every live
    engine holds its own tokenizer (a later start loads its tokenizer again, a later call re-inspects a
    signature). Touches only vLLM modules already imported.

    Without it each engine start left its tokenizers (Gemma 3: 262k-token vocabulary) behind for good, and
    the server grew by 300-600 MiB per swap:
    - vllm/utils/func_utils.py `_supports_kw` (an lru_cache of 128) is keyed by the engine's
      `TokenizerPool.apply_chat_template` (vllm/tokenizers/hf.py `maybe_make_thread_pool`, one class per
      renderer), whose closure holds the pool of `renderer_num_workers + 1` deep copies of the tokenizer.
    - vllm/tokenizers/registry.py `cached_get_tokenizer` (an lru_cache keyed by tokenizer path) holds the
      tokenizer every engine of that checkpoint starts from, `cached_resolve_tokenizer_args` its arguments
      and HF config.
    - vllm/multimodal/media/audio.py keeps the ImportError of its optional torchcodec import in a module
      global (`_torchcodec_import_exc`); its traceback's frames, and their callers', are those of the code
      that first imported vLLM: when that was `start_engine` (in-process use), the first engine. Only the
      traceback goes; the error stays for vLLM's message.
    The tokenizer classes vLLM builds per engine are reference cycles: a collection frees them, then glibc's
    malloc_trim hands the freed heap back to the system (another ~500 MiB of a Gemma 3 engine's).
    """
    registry = sys.modules.get("vllm.tokenizers.registry")
    if registry is not None:
        registry.cached_get_tokenizer.cache_clear()
        registry.cached_resolve_tokenizer_args.cache_clear()
    func_utils = sys.modules.get("vllm.utils.func_utils")
    if func_utils is not None:
        func_utils._supports_kw.cache_clear()
    audio = sys.modules.get("vllm.multimodal.media.audio")
    import_error = getattr(audio, "_torchcodec_import_exc", None)
    if import_error is not None:
        import_error.__traceback__ = None
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def cpu_engine_env(tensor_parallel_size: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment settings vLLM's CPU engine gets from us: on a small CPU with one rank, no core
    reserved for the scheduler (every core computes). Empty on CUDA, with tensor parallelism (the user binds
    ranks to cores, VLLM_CPU_OMP_THREADS_BIND) or when the user already chose a binding or reservation."""
    import torch

    environ = os.environ if environ is None else environ
    chosen = {"VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND"} & set(environ)
    if torch.cuda.is_available() or tensor_parallel_size != 1 or chosen:
        return {}
    if len(os.sched_getaffinity(0)) > SMALL_CPU_CORES:
        return {}
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def read_model_config(checkpoint: Path) -> dict[str, Any]:
    config_file = checkpoint / "config.json"
    if not config_file.is_file():
        raise LoadError(f"{checkpoint} is not a model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LoadError(f"{config_file} is unreadable: {error}") from error
    if not isinstance(config, dict):
        raise LoadError(f"{config_file} is not a JSON object")
    return config


def context_limit(config: dict[str, Any]) -> int | None:
    """The longest context the model's config allows (positions x rope scaling factor), or None when the
    config does not say. Generous on purpose: vLLM checks the exact limit when the engine starts."""
    text = config.get("text_config") or config
    positions = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    factor = (text.get("rope_scaling") or {}).get("factor", 1)
    return int(positions * max(float(factor), 1.0)) if isinstance(factor, int | float) else positions


def check_options_fit(options: EngineOptions, config: dict[str, Any]) -> None:
    """Refuse (OptionsRefused, saying why) options this machine or this model cannot honour: a context
    beyond the model's, more tensor-parallel ranks than devices or cores, a CPU KV cache larger than the
    memory available now."""
    import psutil
    import torch

    problems = []
    limit = context_limit(config)
    if options.max_model_len and limit and options.max_model_len > limit:
        problems.append(
            f"max_model_len={options.max_model_len} is beyond the model's context of {limit} tokens"
        )
    if torch.cuda.is_available():
        devices, what = torch.cuda.device_count(), "CUDA devices"
    else:
        devices, what = len(os.sched_getaffinity(0)), "CPU cores available to this server"
        available = psutil.virtual_memory().available
        if options.kv_cache_gib * GiB > available:
            problems.append(
                f"kv_cache_gib={options.kv_cache_gib:g} is more than the {available / GiB:.1f} GiB of memory "
                "this machine has available now"
            )
    if options.tensor_parallel_size > devices:
        problems.append(
            f"tensor_parallel_size={options.tensor_parallel_size} needs more than the {devices} {what}"
        )
    if problems:
        raise OptionsRefused("; ".join(problems))


def quant_method_of(config: dict[str, Any]) -> str:
    return str((config.get("quantization_config") or {}).get("quant_method", "none"))


def _default_dtype(config: dict[str, Any]) -> str:
    """On CPU float32 for Gemma 3 (fp16 is refused, bf16 crashes this CPU), float16 for others; CUDA: auto."""
    import torch

    if torch.cuda.is_available():
        return "auto"
    model_type = str(config.get("model_type", "")) + str(config.get("text_config", {}).get("model_type", ""))
    return "float32" if "gemma3" in model_type else "float16"


def _has_chat_template(checkpoint: Path) -> bool:
    if (checkpoint / "chat_template.jinja").is_file() or (checkpoint / "chat_template.json").is_file():
        return True
    tokenizer_config = checkpoint / "tokenizer_config.json"
    return tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text())


def vllm_serve_argv(name: str, checkpoint: Path, options: EngineOptions, config: dict[str, Any]) -> list[str]:
    """The `vllm serve` options that give this checkpoint the engine we start for it (the serving benchmark
    runs stock `vllm serve` with exactly these)."""
    import torch

    dtype = _default_dtype(config) if options.dtype == "auto" else options.dtype
    argv = [
        "--model",
        str(checkpoint),
        "--served-model-name",
        name,
        "--dtype",
        dtype,
        "--tensor-parallel-size",
        str(options.tensor_parallel_size),
        "--max-num-seqs",
        str(options.max_num_seqs),
        # Several engines live in one process; their stats loggers would collide in one Prometheus
        # registry, and the server keeps its own per-model metrics.
        "--disable-log-stats",
    ]
    if torch.cuda.is_available():
        argv += ["--gpu-memory-utilization", str(options.gpu_memory_utilization)]
    else:
        argv += ["--kv-cache-memory-bytes", str(int(options.kv_cache_gib * GiB))]
    if options.max_model_len:
        argv += ["--max-model-len", str(options.max_model_len)]
    if options.enforce_eager:
        argv += ["--enforce-eager"]
    quantization = options.quantization
    if quantization == "auto":
        quantization = "lape_awq" if quant_method_of(config) == "awq" else None
    if quantization:
        argv += ["--quantization", quantization]
    template = options.chat_template
    if template is None and not _has_chat_template(checkpoint):
        template = str(FALLBACK_CHAT_TEMPLATE)
    if template is not None:
        argv += ["--chat-template", template]
    return argv


def vllm_server_args(name: str, checkpoint: Path, options: EngineOptions, config: dict[str, Any]):
    """The Namespace `vllm serve` would build for this checkpoint (vLLM's own parser and defaults)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = vllm_serve_argv(name, checkpoint, options, config)
    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)


async def start_engine(name: str, checkpoint: Path, options: EngineOptions) -> LoadedEngine:
    """Start an engine for `checkpoint` served as `name`; raises LoadError with the reason on failure."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    checkpoint = checkpoint.expanduser().resolve()
    config = read_model_config(checkpoint)
    check_options_fit(options, config)
    try:
        args = vllm_server_args(name, checkpoint, options, config)
    except (SystemExit, ValueError, OSError) as error:  # argparse exits on a value vLLM does not accept
        raise LoadError(f"vLLM refused the engine options {options} (details in the server log)") from error
    engine_args = AsyncEngineArgs.from_cli_args(args)
    try:
        # Config creation runs the quantization plugin's checkpoint validation; both steps block for
        # seconds (engine start: tens of seconds), so they run in a thread.
        vllm_config = await asyncio.to_thread(
            engine_args.create_engine_config, usage_context=UsageContext.OPENAI_API_SERVER
        )
        engine = await asyncio.to_thread(
            AsyncLLM.from_vllm_config,
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            enable_log_requests=False,
            disable_log_stats=True,
        )
    except Exception as error:  # any failure to start is reported to the admin, never raised further
        raise LoadError(f"{type(error).__name__}: {error}") from error
    client = ObservedEngine(engine)
    try:
        state = State()
        await init_app_state(client, state, args, await engine.get_supported_tasks())
    except Exception as error:
        engine.shutdown()
        raise LoadError(f"{type(error).__name__}: {error}") from error
    return LoadedEngine(
        name=name,
        checkpoint=checkpoint,
        quant_method=quant_method_of(config),
        engine_quantization=vllm_config.model_config.quantization,
        client=client,
        state=state,
        max_model_len=vllm_config.model_config.max_model_len,
        options=options,
    )

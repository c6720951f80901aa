"""`lape-awq serve`: the OpenAI-compatible server over one vLLM engine per checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from lape_awq.quant.errors import UserError

DEFAULT_PORT = 8000


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path).expanduser()


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="OpenAI-compatible chat server; hot-swaps AWQ / AWQ-opt checkpoints",
        description="Serve checkpoints through the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models), with /health, /metrics and admin routes to load, swap and unload checkpoints. "
        "Without --model it serves the default model's AWQ and AWQ-opt checkpoints, building them first.",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=_named_path,
        metavar="NAME=PATH",
        help="serve the checkpoint at PATH as NAME (repeatable)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LAPE_AWQ_API_KEY"),
        help="required bearer key (env LAPE_AWQ_API_KEY)",
    )
    parser.add_argument(
        "--admin-key",
        default=os.environ.get("LAPE_AWQ_ADMIN_KEY"),
        help="bearer key of the /admin routes (env LAPE_AWQ_ADMIN_KEY); without it they are open only "
        "when no --api-key is set either",
    )
    parser.add_argument("--dtype", default="auto", help="auto: float32 for Gemma 3 on CPU, float16 otherwise")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="CPU KV-cache size per model")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.4, help="CUDA: fraction of the card per model"
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences an engine batches at once")
    parser.add_argument(
        "--max-in-flight", type=int, default=256, help="requests per model before 429 Too Many Requests"
    )
    parser.add_argument("--max-body-mb", type=float, default=4.0, help="request body limit (413 beyond)")
    parser.add_argument(
        "--quantization",
        default="auto",
        help="auto (default): plain AWQ checkpoints run on lape_awq, others as vLLM picks; awq: stock vLLM "
        "AWQ; any other vLLM quantization method name",
    )
    parser.add_argument("--chat-template", help="Jinja chat template file for models without one")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start)")
    parser.add_argument(
        "--checkpoint-root",
        dest="checkpoint_roots",
        action="append",
        type=lambda text: Path(text).expanduser(),
        metavar="DIR",
        help="directory the admin API may load and swap checkpoints from (repeatable; default: the lape-awq "
        "home and the directories holding the --model checkpoints); paths outside are refused with 403",
    )
    parser.add_argument(
        "--send-timeout",
        type=float,
        default=60.0,
        help="seconds a response may wait on a client that stopped reading before its request is "
        "cancelled and its engine slot freed",
    )
    parser.add_argument(
        "--open-ops",
        action="store_true",
        help="serve /metrics and /openapi.json without a key even when --api-key is set (as stock vLLM does)",
    )
    parser.add_argument(
        "--restart-dead",
        action="store_true",
        help="restart an engine whose processes died (5 tries, 2 to 32 s apart); off: it stays dead (503) "
        "until an admin reloads it",
    )
    parser.add_argument("--log-prompts", action="store_true", help="log prompt text (off: metadata only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars while building checkpoints")
    parser.set_defaults(run=_run_serve)


def _initial_models(args: argparse.Namespace) -> list[tuple[str, Path]]:
    if args.models:
        names = [name for name, _ in args.models]
        if len(set(names)) != len(names):
            raise UserError(f"--model names must be distinct: {names}")
        for name, path in args.models:
            if not (path / "config.json").is_file():
                raise UserError(f"--model {name}={path}: not a model directory (no config.json)")
        return list(args.models)
    from lape_awq.quant.awq.default_checkpoints import ensure_default_checkpoints
    from lape_awq.quant.default_model import DEFAULT_MODEL_NAME

    paths = ensure_default_checkpoints(progress=not args.quiet)
    return [(f"{DEFAULT_MODEL_NAME}-{method}", path) for method, path in paths.items()]


def _run_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from lape_awq.quant.paths import home_dir
    from lape_awq.server.app import ServerSettings, create_app
    from lape_awq.server.checkpoint_roots import CheckpointRoots
    from lape_awq.server.engines import (
        EngineOptions,
        LoadError,
        check_options_fit,
        cpu_engine_env,
        read_model_config,
    )

    try:
        options = EngineOptions(
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            kv_cache_gib=args.kv_cache_gib,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            max_num_seqs=args.max_num_seqs,
            enforce_eager=args.enforce_eager,
            chat_template=args.chat_template,
            quantization=args.quantization,
        )
    except ValueError as error:
        raise UserError(str(error)) from error
    if args.send_timeout <= 0:
        raise UserError(f"--send-timeout must be > 0, got {args.send_timeout:g}")
    models = _initial_models(args)
    for name, path in models:
        try:
            check_options_fit(options, read_model_config(path))
        except LoadError as error:
            raise UserError(f"--model {name}={path}: {error}") from error
    roots = args.checkpoint_roots or [home_dir(), *(path.parent for _, path in models)]
    settings = ServerSettings(
        models=models,
        engine_options=options,
        api_key=args.api_key,
        admin_key=args.admin_key,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_in_flight=args.max_in_flight,
        log_prompts=args.log_prompts,
        checkpoint_roots=CheckpointRoots.of(roots),
        send_timeout=args.send_timeout,
        open_ops=args.open_ops,
        restart_dead=args.restart_dead,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_env = cpu_engine_env(args.tensor_parallel_size)
    if engine_env:  # inherited by every engine process this server starts
        logging.getLogger(__name__).info("small CPU: engines run with %s", engine_env)
        os.environ.update(engine_env)
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)

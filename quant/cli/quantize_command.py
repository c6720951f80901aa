"""The `quantize` subcommand: an RTN, AWQ, GPTQ or AWQ + GPTQ checkpoint from a float model, the last three
optionally with kept FP16 neurons (awq-opt, gptq-opt, awq-gptq-opt)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lape_awq.quant.architectures import MLP_PROJECTIONS
from lape_awq.quant.awq.quantizer import QuantSpec
from lape_awq.quant.calibration import CalibrationSpec
from lape_awq.quant.cli.arguments import add_model_argument, csv_list, language_weights
from lape_awq.quant.errors import UserError
from lape_awq.quant.lape.kept_neurons import RULES
from lape_awq.quant.vocab.quantizer import DEFAULT_BITS, DEFAULT_GROUP_SIZE, DEFAULT_KEPT_ROWS, VocabSpec

# Every QuantSpec method, and the three with AWQ's or GPTQ's calibration with kept FP16 neurons.
CLI_METHODS = ("rtn", "awq", "awq-opt", "gptq", "gptq-opt", "awq-gptq", "awq-gptq-opt")


def add_quantize_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quantize",
        help="write a 4-bit checkpoint: rtn, awq, gptq, awq-gptq, or awq-opt / gptq-opt / awq-gptq-opt "
        "(the same + the target language's neurons in FP16)",
        description="Quantize a float model to W4 (group-wise, asymmetric, AutoAWQ gemm layout). "
        "awq: AWQ's scales and clipping, then round to nearest; gptq: GPTQ's Hessian-compensated rounding; "
        "awq-gptq: AWQ's scales, then GPTQ's rounding. The -opt methods keep the LAPE neurons of "
        "--keep-lang in FP16 as a sparse part; "
        "their neurons file is made first if missing. The vocabulary (embedding / LM head) is quantized to "
        "--vocab-bits, with the rows of --keep-vocab-lang kept in FP16 (-opt methods: --keep-lang's).",
    )
    add_model_argument(parser)
    defaults, calib = QuantSpec(), CalibrationSpec()
    parser.add_argument("--method", choices=CLI_METHODS, default="awq-opt")
    parser.add_argument(
        "--out", type=Path, help="checkpoint directory (default: $LAPE_AWQ_HOME/checkpoints/...)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out once the new checkpoint is done"
    )
    parser.add_argument("--neurons", type=Path, help="neurons file (default: the model's, made if missing)")
    parser.add_argument(
        "--keep-lang", type=csv_list, default=("ko",), help="languages whose neurons stay FP16"
    )
    parser.add_argument(
        "--max-neurons", type=int, help="keep at most this many neurons (default: as many as LAPE finds)"
    )
    parser.add_argument(
        "--neuron-rule",
        choices=RULES,
        default="lape",
        help="how the kept neurons are chosen within that budget: LAPE's, lowest entropy first (lape); "
        "LAPE's of the deeper half of the layers (lape-deep); LAPE's ranked by their 4-bit error on the "
        "language's text (lape-sensitive); any neuron by that error alone (sensitive)",
    )
    parser.add_argument("--random-neurons", action="store_true", help="control: same counts, random neurons")
    parser.add_argument(
        "--sparse-projections",
        type=csv_list,
        default=MLP_PROJECTIONS,
        help="which MLP projections keep FP16 rows/columns",
    )
    parser.add_argument(
        "--naive-sparse",
        action="store_true",
        help="searches ignore the kept neurons (quantize, then add residual)",
    )
    parser.add_argument("--calib-langs", type=csv_list, default=calib.langs, help="calibration language mix")
    parser.add_argument("--calib-samples", type=int, default=calib.samples)
    parser.add_argument("--calib-seqlen", type=int, default=calib.seqlen)
    parser.add_argument("--calib-text", type=Path, help="calibrate on this UTF-8 file instead")
    parser.add_argument(
        "--calib-weights",
        type=language_weights,
        default=(),
        metavar="LANG=W,...",
        help="weigh each calibration language's tokens in the objectives (GPTQ's Hessian, AWQ's searches), "
        "e.g. ko=2,en=1; unlisted languages weigh 1, weight 0 leaves a language's sequences out "
        "(--calib-samples counts them)",
    )
    parser.add_argument("--group-size", type=int, default=defaults.group_size, choices=(32, 64, 128))
    parser.add_argument(
        "--vocab-bits",
        type=int,
        default=DEFAULT_BITS,
        choices=(16, 8, 4),
        help="bits of the embedding / LM head (16: FP16, as AutoAWQ leaves them, which stock vLLM AWQ needs)",
    )
    parser.add_argument("--vocab-group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=(32, 64, 128))
    parser.add_argument(
        "--keep-vocab-lang",
        type=csv_list,
        help="languages whose vocabulary rows stay FP16 (default: --keep-lang for awq-opt, none otherwise)",
    )
    parser.add_argument(
        "--max-vocab-rows",
        type=int,
        default=DEFAULT_KEPT_ROWS,
        help="budget of FP16 vocabulary rows, split between --keep-vocab-lang (0: none)",
    )
    parser.add_argument("--no-duo-scaling", action="store_true", help="scales from activations only")
    parser.add_argument(
        "--scale-identity",
        action="store_true",
        help="AWQ's scale search also scores 'no scaling' (s = 1), which its grid lacks",
    )
    parser.add_argument(
        "--skip-scaling",
        type=csv_list,
        default=(),
        metavar="GROUP,...",
        help="AWQ scaling groups left unscaled (qkv: input norm -> q/k/v, vo, gate_up, down)",
    )
    parser.add_argument(
        "--quantized-inputs",
        action="store_true",
        help="each layer calibrates on the outputs of the quantized layers before it (reference GPTQ's "
        "order) instead of the float model's (AutoAWQ's)",
    )
    parser.add_argument(
        "--act-order",
        action="store_true",
        help="GPTQ rounds each linear's input columns by decreasing activation energy, on grids fixed "
        "up front (static groups: the checkpoint format is unchanged)",
    )
    parser.add_argument(
        "--grid-search",
        action="store_true",
        help="GPTQ shrinks each group's range where that lowers the expected output error, instead of "
        "taking the group's min/max (same format)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> None:
    from lape_awq.quant.awq.default_checkpoints import checkpoint_path, ensure_neurons_file
    from lape_awq.quant.awq.pipeline import KeepSpec, quantize_checkpoint
    from lape_awq.quant.model_loading import resolve_model_dir

    opt = args.method.endswith("-opt")
    if not opt and (
        args.neurons or args.max_neurons is not None or args.random_neurons or args.neuron_rule != "lape"
    ):
        raise UserError(
            "--neurons, --max-neurons, --neuron-rule and --random-neurons are for --method awq-opt, gptq-opt "
            "or awq-gptq-opt"
        )
    spec = QuantSpec(
        args.method.removesuffix("-opt"),
        args.group_size,
        duo_scaling=not args.no_duo_scaling,
        search_aware=not args.naive_sparse,
        scale_identity=args.scale_identity,
        skip_scaling=tuple(args.skip_scaling),
        quantized_inputs=args.quantized_inputs,
        act_order=args.act_order,
        grid_search=args.grid_search,
        sparse_projections=tuple(args.sparse_projections),
    )
    calib = CalibrationSpec(
        tuple(args.calib_langs),
        args.calib_samples,
        args.calib_seqlen,
        args.seed,
        str(args.calib_text) if args.calib_text else None,
        tuple(args.calib_weights),
    )
    model_dir = resolve_model_dir(args.model)
    keep = None
    if opt:
        neurons = args.neurons or ensure_neurons_file(model_dir, progress=not args.quiet)
        keep = KeepSpec(
            neurons, tuple(args.keep_lang), args.max_neurons, args.random_neurons, args.seed, args.neuron_rule
        )
    keep_vocab = args.keep_vocab_lang
    if keep_vocab is None:  # an -opt method keeps its languages' rows of a quantized vocabulary
        keep_vocab = args.keep_lang if opt and args.vocab_bits != 16 else ()
    vocab = VocabSpec(
        args.vocab_bits, args.vocab_group_size, tuple(keep_vocab), args.max_vocab_rows if keep_vocab else 0
    )
    out = args.out or checkpoint_path(model_dir, args.method)
    manifest = quantize_checkpoint(model_dir, out, spec, calib, keep, not args.quiet, args.overwrite, vocab)
    sizes = manifest["sizes"]
    print(f"checkpoint: {out}")
    print(
        f"method {manifest['method']}: {sizes['total_bytes'] / 2**20:.1f} MiB, sparse FP16 part "
        f"{sizes['sparse_bytes'] / 2**10:.1f} KiB (+{100 * sizes['sparse_fraction']:.3f}% of the rest), "
        f"quantized in {manifest['quantize_seconds']} s"
    )
    if vocab.quantized:
        kept = json.loads((out / "config.json").read_text())["quantization_config"]["vocab"]["kept_rows"]
        print(
            f"vocabulary: {vocab.bits}-bit, group {vocab.group_size}; {kept} FP16 rows for "
            f"{','.join(vocab.keep_langs) or 'no language'} ({sizes['kept_rows_bytes'] / 2**10:.1f} KiB, "
            f"+{100 * sizes['kept_rows_fraction']:.2f}%)"
        )
    if opt:
        print("kept neurons per layer: " + json.dumps(_kept_counts(out)))


def _kept_counts(out: Path) -> list[int]:
    config = json.loads((out / "config.json").read_text())
    return config["quantization_config"]["sparse"]["neurons_per_layer"]

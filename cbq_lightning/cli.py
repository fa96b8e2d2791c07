"""``cbq`` command line, built on Lightning's CLI parser (jsonargparse).

``cbq quantize --config configs/<recipe>.yaml [--quant.scheme W3A16] [--method rtn] [--output_dir DIR]``
``cbq evaluate --model PATH_OR_NAME [--data wikitext2] [--max_windows 40] [--tasks arc_easy,piqa]``,
``cbq export --run DIR --format {compressed-tensors,gptq,gguf} [--output OUT] [--dtype float16]``.
Every field of :class:`~cbq_lightning.config.QuantizeConfig` is a YAML key and a dotted flag;
``--print_config`` prints the resolved configuration. Errors in user input are printed without a
traceback and exit with status 2.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentError, Namespace
from lightning.pytorch.cli import LightningArgumentParser

from cbq_lightning import __version__
from cbq_lightning.config import QuantizeConfig
from cbq_lightning.errors import CBQError, ConfigError, RunStopped
from cbq_lightning.evaluation.command import EvaluateConfig
from cbq_lightning.export.packed import ExportConfig
from cbq_lightning.parse_errors import parse_error_line
from cbq_lightning.recipe_file import RecipeFile


def quantize_parser() -> LightningArgumentParser:
    """Parser of ``cbq quantize``: the fields of :class:`QuantizeConfig` at the top level."""
    parser = LightningArgumentParser(
        description="Quantize a causal LM with CBQ (or the RTN baseline) and save it.",
        default_env=False,
    )
    parser.add_argument("--config", action=RecipeFile,
                        help="YAML recipe (see configs/); a recipe may name the recipe it builds on with 'base:'.")
    parser.add_class_arguments(QuantizeConfig, nested_key=None, fail_untyped=True, sub_configs=True)
    return parser


def _fields(namespace: Namespace) -> dict:
    """A subcommand's parsed options without the ``--config`` file entry: the dataclass's fields."""
    return {key: value for key, value in vars(namespace).items() if key != "config"}


def quantize_config(instantiated: Namespace) -> QuantizeConfig:
    """The :class:`QuantizeConfig` of an instantiated ``cbq quantize`` namespace (its dataclasses built)."""
    return QuantizeConfig(**_fields(instantiated))


def instantiate(parser: LightningArgumentParser, namespace: Namespace) -> Namespace:
    """``parser.instantiate(namespace)``, with a section's own :class:`CBQError` raised as itself.

    The sections check their values when they are built (``__post_init__``). For an optional section
    (``extensions.gptq: GPTQInit | None`` ...) jsonargparse tries each member of the union and reports a
    multi-line "does not validate against any of the Union subtypes"; the section's one-line error is in
    that exception's chain, and is what the user should read.
    """
    try:
        return parser.instantiate(namespace)
    except CBQError:
        raise
    except (TypeError, ValueError) as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, CBQError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def evaluate_parser() -> LightningArgumentParser:
    """Parser of ``cbq evaluate``: the fields of :class:`EvaluateConfig`."""
    parser = LightningArgumentParser(
        description="Perplexity (GPTQ/OmniQuant protocol) and lm-evaluation-harness task accuracy (--tasks) "
        "of a full-precision model or a cbq-lightning output.",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with the options below.")
    parser.add_class_arguments(EvaluateConfig, nested_key=None, fail_untyped=True)
    return parser


def _run_evaluate(namespace: Namespace) -> None:
    from cbq_lightning.evaluation.command import run_evaluate
    from cbq_lightning.evaluation.zero_shot import format_entry

    config = EvaluateConfig(**_fields(namespace))
    summary = run_evaluate(config)
    for entry in summary["zero_shot"]:
        print(format_entry(entry))
    for result in summary["results"]:
        print(
            f"{result['dataset']} {result['split']}: ppl {result['ppl']:.4f} "
            f"({result['windows']} windows x {result['seqlen']} tokens, {result['eval_s']:.0f}s)"
        )
    if config.output:
        print(f"results written to {config.output}")


def export_parser() -> LightningArgumentParser:
    """Parser of ``cbq export``: the run directory plus the fields of :class:`ExportConfig`."""
    parser = LightningArgumentParser(
        description="Write a finished cbq quantize run as a packed checkpoint that transformers and vLLM load "
        "(compressed-tensors pack-quantized, or GPTQ v1 for symmetric weight-only runs), or as one GGUF file for "
        "llama.cpp (runs of a GGML type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with the options below.")
    parser.add_argument("--run", type=str, required=True, help="output directory of cbq quantize (holds quant_state.safetensors and model/).")
    parser.add_class_arguments(ExportConfig, nested_key=None, fail_untyped=True)
    return parser


def _run_export(namespace: Namespace) -> None:
    from cbq_lightning.export.packed import export_run

    fields = _fields(namespace)
    run = fields.pop("run")
    _print_export(export_run(run, ExportConfig(**fields)))


def _print_export(summary: dict) -> None:
    print(
        f"{summary['format']} export in {summary['output']}: {summary['weights_bytes'] / 2**20:.2f} MiB of weights, "
        f"{summary['ratio_to_fp16']:.3f} x the fp16 size (quantized linears "
        f"{summary['quantized_linears']['ratio_to_fp16']:.3f} x)"
    )
    for warning in summary["warnings"]:
        print(f"warning: {warning}")


def build_parser() -> LightningArgumentParser:
    # exit_on_error=False (the subcommands inherit it): a parse error raises ArgumentError, which main() prints
    # as one line (cbq_lightning.parse_errors) instead of jsonargparse's usage dump
    parser = LightningArgumentParser(prog="cbq", description="CBQ cross-block quantization for LLMs.",
                                     exit_on_error=False)
    parser.add_argument("--version", action="version", version=f"cbq-lightning {__version__}")
    subcommands = parser.add_subcommands(dest="command", required=True)
    subcommands.add_subcommand("quantize", quantize_parser(), help="quantize a model (CBQ or RTN)")
    subcommands.add_subcommand("evaluate", evaluate_parser(), help="perplexity and lm-eval tasks of a model or a quantized output")
    subcommands.add_subcommand("export", export_parser(), help="packed checkpoint (compressed-tensors, GPTQ) or GGUF file of a run")
    return parser


def parse_quantize_config(arguments: Sequence[str]) -> QuantizeConfig:
    """The configuration ``cbq quantize ARGUMENTS`` would run, for the Python API: the same parser, recipe
    composition (``base:``) and checks, with a parse error raised as the command line's one-line message."""
    parser = build_parser()
    words = ["quantize", *arguments]
    try:
        args = parser.parse_args(words)
    except ArgumentError as error:
        raise ConfigError(parse_error_line(str(error), words, parser)) from None
    return quantize_config(instantiate(parser, args).quantize)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cbq`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(words)
    except ArgumentError as error:  # --help and --print_config still print and exit as jsonargparse does
        print(f"cbq: error: {parse_error_line(str(error), words, parser)}", file=sys.stderr)
        return 2
    try:
        if args.command == "quantize":
            from cbq_lightning.runner import run_quantize

            config = quantize_config(instantiate(parser, args).quantize)
            result = run_quantize(config)
            if not result.main:  # another DDP rank: rank 0 reports and writes the outputs
                return 0
            report = result.report
            errors = report["final_error"]
            print(
                f"done: {report['scheme']['name']} {report['method']} in {report['wall_time_s']:.1f}s; "
                f"final relative error {', '.join(f'{k} {v:.4g}' for k, v in errors.items())}; "
                f"outputs in {config.output_dir}"
            )
            for entry in report["eval"]:
                fp = f" (fp {entry['ppl_fp']:.4f})" if entry["ppl_fp"] is not None else ""
                print(f"{entry['dataset']} {entry['split']}: ppl {entry['ppl']:.4f}{fp}, {entry['windows']} windows")
            if "export" in report:
                _print_export(report["export"])
        elif args.command == "evaluate":
            _run_evaluate(instantiate(parser, args).evaluate)  # its sections (rotation) built, as quantize's
        elif args.command == "export":
            _run_export(args.export)
    except RunStopped as error:  # SIGTERM: stopped at a safe point, resumable
        print(f"cbq: stopped: {error}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except CBQError as error:
        print(f"cbq: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

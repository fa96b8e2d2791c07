"""``cbq`` command line, built on Lightning's CLI parser (jsonargparse).

``cbq quantize --config configs/<recipe>.yaml [--quant.w_bits 3] [--method rtn] [--output_dir DIR]``.
Every field of :class:`~cbq_lightning.config.QuantizeConfig` is a YAML key and a dotted flag;
``--print_config`` prints the resolved configuration. Errors in user input are printed without a
traceback and exit with status 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, Namespace
from lightning.pytorch.cli import LightningArgumentParser

from cbq_lightning import __version__
from cbq_lightning.config import QuantizeConfig
from cbq_lightning.errors import CBQError


def quantize_parser() -> LightningArgumentParser:
    """Parser of ``cbq quantize``: the fields of :class:`QuantizeConfig` at the top level."""
    parser = LightningArgumentParser(
        description="Quantize a causal LM with CBQ (or the RTN baseline) and save it.",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML recipe (see configs/).")
    parser.add_class_arguments(QuantizeConfig, nested_key=None, fail_untyped=True, sub_configs=True)
    return parser


def quantize_config(instantiated: Namespace) -> QuantizeConfig:
    """The :class:`QuantizeConfig` of an instantiated ``cbq quantize`` namespace (its dataclasses built)."""
    return QuantizeConfig(**{key: value for key, value in vars(instantiated).items() if key != "config"})


def build_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(prog="cbq", description="CBQ cross-block quantization for LLMs.")
    parser.add_argument("--version", action="version", version=f"cbq-lightning {__version__}")
    subcommands = parser.add_subcommands(dest="command", required=True)
    subcommands.add_subcommand("quantize", quantize_parser(), help="quantize a model (CBQ or RTN)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cbq`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "quantize":
            from cbq_lightning.runner import run_quantize

            config = quantize_config(parser.instantiate_classes(args).quantize)
            result = run_quantize(config)
            report = result.report
            errors = report["final_error"]
            print(
                f"done: {report['scheme']['name']} {report['method']} in {report['wall_time_s']:.1f}s; "
                f"final relative error {', '.join(f'{k} {v:.4g}' for k, v in errors.items())}; "
                f"outputs in {config.output_dir}"
            )
    except CBQError as error:
        print(f"cbq: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

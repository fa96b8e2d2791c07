"""Lever study on the first N blocks: quantize only them and print the relative output error per block.

Why: a whole-model CPU run with its perplexity evaluation takes 20-30 minutes; the relative error of the
hidden state after block N (on the calibration rows, against the full-precision model) ranks recipe
settings in 1-5 minutes. It is a screen, not the verdict: the figures in the README's recipe table were
confirmed on the whole model with ``benchmarks/quality.py`` or ``cbq quantize``.

The relative error is dominated by the few positions that carry "massive activations", and it is measured
on the calibration rows themselves, so it can rank settings differently from perplexity. ``--ppl-windows K``
adds a held-out screen closer to the verdict: the N quantized blocks put back in front of the remaining
full-precision blocks, and the perplexity of that model on the first K windows of the recipe's evaluation
set (K=10: about one minute on two cores).

    python benchmarks/block_probe.py 8 [--ppl-windows 10] --config configs/smollm2_w4a16.yaml \
        --output_dir /tmp/probe/A [any cbq quantize override, e.g. --quant.gptq.true_sequential true]

Everything else after N goes to ``cbq quantize`` unchanged; its own evaluation is switched off and the run
starts over.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cbq_lightning.runner as runner  # noqa: E402
from cbq_lightning import cli  # noqa: E402
from cbq_lightning.distributed import Placement, compute_device  # noqa: E402
from cbq_lightning.evaluation.perplexity import prepare_eval_set  # noqa: E402
from cbq_lightning.models.loading import load_tokenizer  # noqa: E402


def _held_out_perplexity(model: nn.Module, rest: list[nn.Module], overrides: list[str], windows: int) -> float:
    """Perplexity of the quantized first blocks followed by the full-precision ``rest``, on the first
    ``windows`` windows of the recipe's first evaluation set."""
    parser = cli.quantize_parser()
    config = cli.quantize_config(cli.instantiate(parser, parser.parse_args(overrides)))
    if not config.eval.datasets:
        raise SystemExit("--ppl-windows needs an evaluation set in the recipe (eval.datasets)")
    model.model.layers = nn.ModuleList([*model.model.layers, *rest])
    model.config.num_hidden_layers = len(model.model.layers)
    tokenizer = load_tokenizer(config.model)
    evaluation = config.eval
    eval_set = prepare_eval_set(
        evaluation.datasets[0], tokenizer, evaluation.seqlen, evaluation.split, windows, config.data_dir
    )
    # the run's own evaluation path: the recipe's device and batch size
    return float(runner._evaluate(config, model, [eval_set], compute_device(config.trainer.accelerator, Placement()), "probe")[0]["ppl"])


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or "--output_dir" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    blocks = int(argv[0])
    overrides = argv[1:]
    windows = 0
    if "--ppl-windows" in overrides:
        at = overrides.index("--ppl-windows")
        windows = int(overrides[at + 1])
        del overrides[at : at + 2]
    load_full_model = runner.load_model
    loaded: dict[str, object] = {}

    def first_blocks(*args, **kwargs):
        """The recipe's model cut to its first ``blocks`` transformer blocks (the rest kept aside)."""
        model = load_full_model(*args, **kwargs)
        loaded["model"], loaded["rest"] = model, list(model.model.layers[blocks:])
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
        return model

    # The cut lives only for this call: the patch is undone even when quantize raises, so a caller in the same
    # process (the test session, a notebook) gets the whole model from the next run.
    runner.load_model = first_blocks
    try:
        code = cli.main(["quantize", *overrides, "--eval.datasets", "[]", "--resume", "false"])
    finally:
        runner.load_model = load_full_model
    if code != 0:
        return code
    output = Path(overrides[overrides.index("--output_dir") + 1])
    report = json.loads((output / "report.json").read_text())
    per_block = [round(entry["quantized"], 4) for entry in report["block_errors"]]
    print(f"final relative error after block {blocks}: {json.dumps(report['final_error'])}; per block {per_block}")
    if windows:
        ppl = _held_out_perplexity(loaded["model"], loaded["rest"], overrides, windows)
        print(f"held-out perplexity, blocks 0-{blocks - 1} quantized, the rest full precision, {windows} windows: {ppl:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

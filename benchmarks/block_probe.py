"""Lever study on the first N blocks: quantize only them and print the relative output error per block.

Why: a whole-model CPU run with its perplexity evaluation takes 20-30 minutes; the relative error of the
hidden state after block N (on the calibration rows, against the full-precision model) ranks recipe
settings in 1-5 minutes. It is a screen, not the verdict: the figures in the README's recipe table were
confirmed on the whole model with ``benchmarks/quality.py`` or ``cbq quantize``.

    python benchmarks/block_probe.py 8 --config configs/smollm2_w4a16.yaml --output_dir /tmp/probe/A \\
        [any cbq quantize override, e.g. --quant.gptq_init true --train.lr_clip 0.001]

Everything after N goes to ``cbq quantize`` unchanged; evaluation is switched off and the run starts over.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cbq_lightning.runner as runner  # noqa: E402
from cbq_lightning import cli  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or "--output_dir" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    blocks = int(argv[0])
    overrides = argv[1:]
    load_full_model = runner.load_model

    def first_blocks(*args, **kwargs):
        """The recipe's model cut to its first ``blocks`` transformer blocks."""
        model = load_full_model(*args, **kwargs)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Lever study on N blocks: quantize only them and print the relative output error per block.

Why: a whole-model CPU run with its perplexity evaluation takes 20-30 minutes; the relative error of the
hidden state after block N (on the calibration rows, against the full-precision model) ranks recipe
settings in 1-5 minutes. It is a screen, not the verdict: the figures in the README's recipe table were
confirmed on the whole model with ``benchmarks/quality.py`` or ``cbq quantize``.

The relative error is dominated by the few positions that carry "massive activations", and it is measured
on the calibration rows themselves, so it can rank settings differently from perplexity. ``--ppl-windows K``
adds a held-out screen closer to the verdict: the N quantized blocks put back in front of the remaining
full-precision blocks, and the perplexity of that model on the first K windows of the recipe's evaluation
set (K=10: about one minute on two cores).

    python benchmarks/block_probe.py 8 [--ppl-windows 10] [--from-block 0] --config configs/smollm2_w4a16.yaml \
        --output_dir /tmp/probe/A [any cbq quantize override, e.g. --extensions.gptq.true_sequential true]

``--from-block S`` probes blocks S .. S+N-1 instead of the first N: the blocks before S stay in full
precision and run in front of the probed ones (in every whole-model forward: calibration and the held-out
perplexity), so the probed blocks calibrate on full-precision inputs. Why: the tail of a model can behave
unlike its head (SmolLM2's windows 27-28 fit worse at LoRA rank 64, docs/recipe-history.md), and a whole-model run
to see it takes an hour on 2 cores; ``--from-block 24 6`` reaches it in minutes.

Everything else after N goes to ``cbq quantize`` unchanged; its own evaluation is switched off and the run
starts over.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
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
    config = cli.parse_quantize_config(overrides)
    if not config.eval.datasets:
        raise SystemExit("--ppl-windows needs an evaluation set in the recipe (eval.datasets)")
    model.model.layers = nn.ModuleList([*model.model.layers, *rest])
    model.config.num_hidden_layers = len(model.model.layers)
    tokenizer = load_tokenizer(config.model, hub=config.advanced.model)
    evaluation = config.eval
    eval_set = prepare_eval_set(
        evaluation.datasets[0], tokenizer, evaluation.seqlen, config.advanced.eval.split, windows, config.data_dir
    )
    # the run's own evaluation path: the recipe's device and batch size
    return float(runner._evaluate(config, model, [eval_set], compute_device(config.trainer.accelerator, Placement()), "probe")[0]["ppl"])


def _run_full_precision_prefix(model: nn.Module, prefix: list[nn.Module]) -> None:
    """Make every whole-model forward run the full-precision ``prefix`` blocks on the embeddings, before the
    blocks left in ``model.model.layers``.

    A hook on the embedding rather than extra layers, because the runner quantizes every entry of
    ``model.model.layers`` and runs single blocks standalone during training; the embedding runs only in
    whole-model forwards, which is where the prefix belongs. The prefix gets the causal mask and rotary
    positions the model would give it (positions from 0, no padding: the probe's calibration rows and
    evaluation windows have none).
    """
    rotary = model.model.rotary_emb

    @torch.no_grad()
    def run_prefix(_module: nn.Module, _args: tuple, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device).unsqueeze(0)
        future = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
        mask = torch.zeros(length, length, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(future, torch.finfo(hidden.dtype).min)[None, None]
        position_embeddings = rotary(hidden, positions)
        for block in prefix:
            block.to(hidden.device)
            hidden = block(hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings)
        return hidden

    model.model.embed_tokens.register_forward_hook(run_prefix)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or "--output_dir" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    blocks = int(argv[0])
    overrides = argv[1:]
    windows, start = _pop_int(overrides, "--ppl-windows"), _pop_int(overrides, "--from-block")
    load_full_model = runner.load_model
    loaded: dict[str, object] = {}

    def probed_blocks(*args, **kwargs):
        """The recipe's model cut to blocks ``start .. start + blocks - 1`` (the blocks before them run in full
        precision from the embedding's hook, the blocks after them are kept aside)."""
        model = load_full_model(*args, **kwargs)
        layers = list(model.model.layers)
        if start + blocks > len(layers):
            raise SystemExit(f"--from-block {start} with {blocks} blocks runs past the model's {len(layers)} blocks")
        if start:
            _run_full_precision_prefix(model, layers[:start])
        loaded["model"], loaded["rest"] = model, layers[start + blocks :]
        model.model.layers = nn.ModuleList(layers[start : start + blocks])
        model.config.num_hidden_layers = blocks
        return model

    # The cut lives only for this call: the patch is undone even when quantize raises, so a caller in the same
    # process (the test session, a notebook) gets the whole model from the next run.
    runner.load_model = probed_blocks
    try:
        code = cli.main(["quantize", *overrides, "--eval.datasets", "[]", "--resume", "false"])
    finally:
        runner.load_model = load_full_model
    if code != 0:
        return code
    output = Path(overrides[overrides.index("--output_dir") + 1])
    report = json.loads((output / "report.json").read_text())
    per_block = [round(entry["quantized"], 4) for entry in report["block_errors"]]
    last = start + blocks - 1
    print(f"final relative error after block {last + 1}: {json.dumps(report['final_error'])}; "
          f"per block from block {start}: {per_block}")
    if windows:
        ppl = _held_out_perplexity(loaded["model"], loaded["rest"], overrides, windows)
        print(f"held-out perplexity, blocks {start}-{last} quantized, the rest full precision, {windows} windows: {ppl:.4f}")
    return 0


def _pop_int(overrides: list[str], flag: str) -> int:
    """Remove ``flag VALUE`` from ``overrides`` (the probe's own options; the rest goes to ``cbq quantize``) and
    return VALUE, 0 when the flag is absent."""
    if flag not in overrides:
        return 0
    at = overrides.index(flag)
    value = int(overrides[at + 1])
    del overrides[at : at + 2]
    return value


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

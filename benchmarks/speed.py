"""Speed benchmark (BENCHMARK.md): time and memory of one CBQ window at real model shapes.

Builds a randomly initialised LLaMA with the chosen shapes and as many blocks as one window (K), and runs
one window exactly as ``cbq quantize`` does - CrossBlockState (teacher targets), CrossBlockCallback and a
WindowModule fitted by a Lightning Trainer - for a few optimisation steps on a few calibration samples.
From the measured step time and per-sample forward time it projects the paper protocol (128 x 2048
tokens, 20 epochs per window, batch 4, K=2/O=1): time per window and for the whole model. It also
reports the peak accelerator memory, the peak RSS, and the Trainer's own overhead (construction, setup,
teardown: everything of a window's fit that is neither a training step nor the teacher caching) as a
share of the projected window time.

    python benchmarks/speed.py --shape llama2-7b --scheme W4A16            # on a GPU
    python benchmarks/speed.py --shape small --device cpu --steps 4        # quick CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from callbacks.cross_block import CrossBlockCallback, WindowTargets
from cbq_lightning.crossblock import CrossBlockState
from cbq_lightning.loss import LossConfig
from cbq_lightning.models.adapter import DecoderAdapter
from cbq_lightning.quant.config import QuantConfig
from cbq_lightning.quant.convert import quantize_block
from cbq_lightning.quant.qlinear import LayerQuantConfig
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.runner import versions
from cbq_lightning.train_config import OptimConfig
from cbq_lightning.window import WindowModule
from cbq_lightning.windows import Window

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "blocks": 32},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "blocks": 32},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "blocks": 4},
    "small": {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8,
              "num_key_value_heads": 8, "blocks": 8},
}


class StepTimer(L.Callback):
    """Wall time of every training step (synchronised on CUDA), and of the whole fit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._sync()
        self.steps.append(time.perf_counter() - self._start)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--scheme", default="W4A16", help="e.g. W4A16, W4A4")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (paper protocol: 1-4)")
    parser.add_argument("--steps", type=int, default=12, help="optimisation steps measured (first 2 are warm-up)")
    parser.add_argument("--window", type=int, default=2, help="blocks per window (K)")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples projected")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per window projected")
    parser.add_argument("--target-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    precision = "bf16-mixed" if cuda else "32-true"
    target_dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
                    "bfloat16": torch.bfloat16}[args.target_dtype]
    shape = SHAPES[args.shape]
    quant = QuantConfig(scheme=args.scheme)
    scheme = quant.resolve()
    act = quant.act_settings(trained=True)
    measured_samples = args.batch * args.steps

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_hidden_layers=args.window, num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=max(args.seqlen, 4096))
    model = LlamaForCausalLM(config).eval()
    adapter = DecoderAdapter(model)
    ids = torch.randint(0, config.vocab_size, (measured_samples, args.seqlen))
    inputs, kwargs = adapter.capture_block_inputs(ids)
    generator = torch.Generator().manual_seed(0)
    rounding = RoundingConfig()

    def quantize(index: int, block: torch.nn.Module) -> None:
        quantize_block(block, LayerQuantConfig(scheme, rounding, learnable_clip=True, clip_init=0.99, act=act), generator)

    state = CrossBlockState(adapter.blocks, inputs, kwargs, quantize, batch_size=args.batch, target_dtype=target_dtype)
    window = Window(index=0, blocks=tuple(range(args.window)), finalized=(0,))
    timer = StepTimer(device)
    callback = CrossBlockCallback(state, device)
    module = WindowModule(list(adapter.blocks), window, kwargs.for_blocks(range(len(adapter.blocks))), LossConfig(), rounding, OptimConfig(batch_size=args.batch))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # the window's entry as the callback does it - quantize the blocks, cache Y_fp and Y_h (two teacher
    # forwards per sample) - timed on its own; the fit's own setup then finds it done
    started = time.perf_counter()
    state.enter(window, device)
    if cuda:
        torch.cuda.synchronize(device)
    caching_s = time.perf_counter() - started
    per_sample_caching = caching_s / measured_samples
    leave_s = [0.0]
    leave = state.leave

    def timed_leave(*leave_args, **leave_kwargs):  # finalising + advancing the caches: work, not overhead
        begun = time.perf_counter()
        errors = leave(*leave_args, **leave_kwargs)
        leave_s[0] += time.perf_counter() - begun
        return errors

    state.leave = timed_leave
    fit_started = time.perf_counter()
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[callback, timer], enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        accelerator="gpu" if cuda else "cpu", devices=1, precision=precision)
    trainer.fit(module, train_dataloaders=DataLoader(WindowTargets(state), batch_size=args.batch, shuffle=False))
    fit_s = time.perf_counter() - fit_started
    peak_gpu = torch.cuda.max_memory_allocated(device) / 1024**3 if cuda else None

    steady = timer.steps[2:] or timer.steps
    step_s = sum(steady) / len(steady)
    # the Trainer's own cost per window: construction, setup and teardown (what is neither a step nor work)
    overhead_s = max(fit_s - sum(timer.steps) - leave_s[0], 0.0)
    steps_per_window = args.epochs * args.samples // args.batch
    # training + per-sample work (teacher targets, finalising and advancing the caches) + the Trainer's overhead
    per_sample_work = (caching_s + leave_s[0]) / measured_samples
    window_s = steps_per_window * step_s + per_sample_work * args.samples + overhead_s
    windows = shape["blocks"] - 1  # K=2, O=1
    result = {
        "benchmark": "speed",
        "shape": args.shape,
        "scheme": scheme.name,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": precision,
        "seqlen": args.seqlen,
        "batch": args.batch,
        "measured_steps": len(timer.steps),
        "step_s": step_s,
        "teacher_caching_s_per_sample": per_sample_caching,
        "advance_s_per_sample": leave_s[0] / measured_samples,
        "trainer_overhead_s": overhead_s,
        "trainer_overhead_share": overhead_s / window_s,
        "projected": {"samples": args.samples, "epochs": args.epochs, "steps_per_window": steps_per_window,
                      "window_s": window_s, "windows": windows, "total_min": windows * window_s / 60},
        "peak_gpu_gib": peak_gpu,
        "peak_rss_gib": _peak_rss_gib(),
        "versions": versions(),
        "command": " ".join(["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    name = f"speed_{args.shape}_{scheme.name.lower()}_{'gpu' if cuda else 'cpu'}.json"
    (args.output / name).write_text(json.dumps(result, indent=2) + "\n")
    gpu = f"{peak_gpu:.1f} GiB" if peak_gpu is not None else "n/a"
    print("| shape | scheme | device | step | per window (projected) | total (projected) | peak GPU | peak RSS | Trainer overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.shape} | {scheme.name} | {result['device']} | {step_s:.3f} s | {window_s:.0f} s | "
          f"{result['projected']['total_min']:.0f} min | {gpu} | {result['peak_rss_gib']:.1f} GiB | "
          f"{100 * result['trainer_overhead_share']:.1f} % |")
    print(f"wrote {args.output / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed benchmark (BENCHMARK.md, "speed"): what one window of a recipe costs, stage by stage, and the whole model.

Reads a recipe exactly as ``cbq quantize`` does (:func:`benchmarks.peers.job.load_recipe`, device and precision
resolved for this machine), builds a random-weight LLaMA of the chosen shape through the recipe's own model loader
(``tiny-llama`` with the shape) holding K + 2S blocks (window size K, stride S = K - O), folds the recipe's rotations
and captures the inputs of random token ids, then walks the windows the way the runner does
(:func:`cbq_lightning.runner._build_state`, :class:`cbq_lightning.window_loop.WindowLoop`): window 0 enters and leaves
untrained (so the caches are where a steady-state window finds them), window 1 - which has blocks before and after
it, as almost every window of a real model - is fitted at the recipe's settings and timed stage by stage:

    gptq_start / quantize   making the entering block's quantized layers (GPTQ's Hessian stages included)
    clip_search             the per-group search for the starting clipping ratios
    cfp                     coarse-to-fine preprocessing (judged truncation, activation scaling)
    input_statistics        the entering block's inputs on the quantized path and their moments (GPTQ, clip search)
    teacher_caching         the rest of the window's entry: teacher snapshot and the targets Y_fp, Y_h
    training_steps          the optimiser steps (Lightning's step, forward + backward + update)
    validation              the hardened-objective passes (advanced.monitor.hardened_loss / extensions.keep_best only)
    advancing               after the fit: finalising the leaving blocks, pushing X_q and X_fp through them
    checkpoint              the per-window resume checkpoint (finalised blocks and both caches)
    trainer_overhead        the rest of the fit's wall time (Trainer construction, setup, teardown)

``window_work_over_forward`` = (teacher_caching + advancing) / one plain forward (no grad, inputs already on the
device, outputs discarded) of the same samples through the window's full-precision blocks, measured in the same run
before the window's entry and before its leave (the mean of the two).
The projection scales the window to the recipe's budget (samples x seqlen, epochs per visit) and the shape's block
count, adds rotation and input capture, projects the recipe's end-to-end phase (if any) from the plain forward and the
head, and the evaluation from one sequence through one block and the head.
On a GPU it also runs AutoRound (its default 200 iterations) on the same shape, random weights and token ids, so the
record holds ``cbq_over_autoround``; on CPU AutoRound is skipped unless ``--autoround on``.

    python benchmarks/speed.py --config configs/w4a16.yaml --shape llama3-8b                        # on a GPU
    python benchmarks/speed.py --config configs/smollm2_w4a16.yaml --shape smollm2-135m --device cpu
    python benchmarks/speed.py --config configs/tiny.yaml --shape tiny --device cpu --measure-samples 4 \\
        --measure-epochs 1                                                                           # seconds
Further flags are recipe overrides, as for ``cbq quantize`` (e.g. ``--quant.scheme W4A4``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the benchmarks package sits beside the project
    sys.path.insert(0, str(ROOT))

from benchmarks.peers.job import load_recipe  # noqa: E402
from callbacks.cross_block import CrossBlockCallback  # noqa: E402
from callbacks.hardened_objective import HardenedObjective  # noqa: E402
from callbacks.window_checkpoint import WindowCheckpoint  # noqa: E402
from cbq_lightning import runner  # noqa: E402
from cbq_lightning.checkpoint import WindowCheckpointer  # noqa: E402
from cbq_lightning.config import QuantizeConfig, validate  # noqa: E402
from cbq_lightning.distributed import Placement  # noqa: E402
from cbq_lightning.machine import resolve_machine_settings  # noqa: E402
from cbq_lightning.models.adapter import DecoderAdapter, kwargs_list_to, run_block  # noqa: E402
from cbq_lightning.models.loading import load_model, load_tokenizer  # noqa: E402
from cbq_lightning.models.tiny import tiny_name  # noqa: E402
from cbq_lightning.provenance import source_commit, versions  # noqa: E402
from cbq_lightning.quant.weight_quantizer import WeightQuantizer  # noqa: E402
from cbq_lightning.rotation.fold import rotate_model  # noqa: E402
from cbq_lightning.stop import GracefulStop  # noqa: E402
from cbq_lightning.window_loop import WindowLoop, quiet_lightning  # noqa: E402
from cbq_lightning.windows import Window, window_schedule  # noqa: E402

log = logging.getLogger("benchmarks.speed")

#: model shapes; ``eval_windows``: windows of 2048 tokens in the WikiText-2 test split with that family's tokenizer
#: (approximate outside SmolLM2, whose 148 are measured: BENCHMARK.md), used when a recipe evaluates the full set
SHAPES: dict[str, dict[str, int]] = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_heads": 32, "num_kv_heads": 32,
                  "blocks": 32, "vocab_size": 32000, "eval_windows": 166},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_heads": 32, "num_kv_heads": 8,
                  "blocks": 32, "vocab_size": 128256, "eval_windows": 141},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_heads": 9, "num_kv_heads": 3,
                     "blocks": 30, "vocab_size": 49152, "eval_windows": 148},
    "small": {"hidden_size": 512, "intermediate_size": 1376, "num_heads": 8, "num_kv_heads": 8,
              "blocks": 8, "vocab_size": 32000, "eval_windows": 148},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2,
             "blocks": 4, "vocab_size": 256, "eval_windows": 8},
}
#: the stages of the measured window, in the order they happen (the keys of the record's ``stages_s``)
STAGES = ("gptq_start", "quantize", "clip_search", "cfp", "input_statistics", "teacher_caching", "training_steps",
          "validation", "advancing", "checkpoint", "trainer_overhead")
#: stages whose work grows with the number of calibration samples (scaled when fewer samples are measured)
PER_SAMPLE = ("input_statistics", "teacher_caching", "advancing", "checkpoint", "validation")


class StageClock:
    """Exclusive wall time per stage: time inside a nested stage counts for the inner stage only; the same for the
    process's CPU time.

    Why exclusive: the stages nest (the clip search runs inside the quantization, which runs inside the window's
    entry), and the record's stages must add up to the window's wall time without counting anything twice. Why CPU
    time too: on a CPU shared with other work, the wall time of a stage moves with the others' load, the CPU time
    this process spent much less, so ratios of CPU times are the steadier measure there.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        #: wall time per stage with its nested stages in it
        self.inclusive: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open stage: [start, CPU start, nested wall, nested CPU]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        self._stack.append([time.perf_counter(), time.process_time(), 0.0, 0.0])
        try:
            yield
        finally:
            self._sync()
            started, cpu_started, nested, cpu_nested = self._stack.pop()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed - nested
            self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + cpu - cpu_nested
            self.inclusive[stage] = self.inclusive.get(stage, 0.0) + elapsed
            if self._stack:
                self._stack[-1][2] += elapsed
                self._stack[-1][3] += cpu

    def wrap(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` timed as ``stage`` on every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(stage):
                return function(*args, **kwargs)

        return timed


class _TimedPreprocessor:
    """A preprocessor timed as one stage; its other attributes (``max_samples``) read through to it."""

    def __init__(self, preprocess: Any, clock: StageClock, stage: str) -> None:
        self._preprocess, self._clock, self._stage = preprocess, clock, stage

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._clock(self._stage):
            return self._preprocess(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._preprocess, name)


@contextlib.contextmanager
def _timed_method(owner: type, name: str, clock: StageClock, stage: str) -> Iterator[None]:
    """Time every call of ``owner.name`` as ``stage`` while the block runs (the clip search and GPTQ live inside
    the quantized layers' construction, where no instance can be reached beforehand)."""
    original = getattr(owner, name)

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        with clock(stage):
            return original(self, *args, **kwargs)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


class StepTimer(L.Callback):
    """Wall time of every optimiser step and of every validation pass of a fit (synchronised on CUDA)."""

    def __init__(self, clock: StageClock) -> None:
        self.clock = clock
        self.steps: list[float] = []
        self._open: contextlib.AbstractContextManager | None = None
        self._started = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._open = self.clock("training_steps")
        self._open.__enter__()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._open.__exit__(None, None, None)
        self.steps.append(time.perf_counter() - self._started)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open = self.clock("validation")
        self._open.__enter__()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open.__exit__(None, None, None)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _recipe(path: str, overrides: Sequence[str], device: torch.device, shape: dict[str, int],
            blocks: int) -> QuantizeConfig:
    """The recipe as ``cbq quantize`` resolves it on this device, with the random-weight model of ``shape``."""
    accelerator = ["--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu"]
    config = resolve_machine_settings(load_recipe(path, [*accelerator, *overrides]))
    tiny = tiny_name("llama", hidden_size=shape["hidden_size"], num_layers=blocks, num_heads=shape["num_heads"],
                     num_kv_heads=shape["num_kv_heads"], intermediate_size=shape["intermediate_size"])
    model = dataclasses.replace(config.model, name_or_path=tiny)
    trainer = dataclasses.replace(config.trainer, devices=1, strategy="auto")
    quiet = dataclasses.replace(config.advanced.trainer, enable_progress_bar=False)
    advanced = dataclasses.replace(config.advanced, trainer=quiet)
    return dataclasses.replace(config, model=model, trainer=trainer, advanced=advanced)


def _measured(config: QuantizeConfig, samples: int | None, epochs: int | None) -> QuantizeConfig:
    """``config`` with fewer calibration samples or epochs measured (None: the recipe's own)."""
    data = dataclasses.replace(config.data, num_samples=samples) if samples else config.data
    train = dataclasses.replace(config.train, epochs=epochs, epochs_2bit=epochs) if epochs else config.train
    return dataclasses.replace(config, data=data, train=train)


def _steady_schedule(config: QuantizeConfig) -> tuple[int, list[Window]]:
    """Blocks to build (K + 2S) and their windows: window 1 then has blocks before and after it."""
    size, overlap = config.window.size, config.window.overlap
    stride = size - min(overlap, size - 1)
    blocks = size + 2 * stride
    return blocks, window_schedule(blocks, config.window)


@torch.no_grad()
def plain_forward_s(blocks: list[nn.Module], indices: Sequence[int], hidden: torch.Tensor, kwargs: Any,
                    device: torch.device, batch_size: int) -> tuple[float, float]:
    """One forward of ``hidden`` through ``blocks`` in batches of ``batch_size``: inputs moved to the device first,
    outputs dropped, so only the blocks' own compute is timed (the denominator of ``window_work_over_forward``).
    Its wall time and the process's CPU time."""
    per_block = kwargs_list_to(kwargs.for_blocks(indices), device)
    batches = [hidden[start : start + batch_size].to(device) for start in range(0, hidden.shape[0], batch_size)]
    moved = [block.to(device) for block in blocks]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for x in batches:
        for block, block_kwargs in zip(moved, per_block, strict=True):
            x = run_block(block, x, block_kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    for block in moved:
        block.to("cpu")
    return elapsed, cpu


@torch.no_grad()
def eval_sequence_s(adapter: DecoderAdapter, block: nn.Module, seqlen: int, vocab: int, device: torch.device) -> dict[str, float]:
    """One evaluation sequence: its time through one full-precision block and through the final norm and head."""
    ids = torch.randint(0, vocab, (1, seqlen), generator=torch.Generator().manual_seed(1))
    hidden, kwargs = adapter.capture_block_inputs(ids)
    block = copy.deepcopy(block).to(device)
    per_block = kwargs_list_to(kwargs.for_blocks([0]), device)[0]
    head = adapter.output_head().to(device)
    x = hidden.to(device)
    clock = StageClock(device)
    run_block(block, x, per_block)  # warm-up
    with clock("block"):
        out = run_block(block, x, per_block)
    with clock("head"):
        head(out)
    adapter.output_head().to("cpu")
    return clock.seconds


def _autoround(config: QuantizeConfig, ids: torch.Tensor, device: torch.device, vocab: int) -> dict[str, Any]:
    """AutoRound (its default 200 iterations and, on a GPU, its default mixed precision) on the same random
    model (same seed, unrotated, as a user would give it) and the same token ids; its time for the built blocks."""
    from benchmarks.peers import autoround
    from benchmarks.peers.settings import PeerUnavailable, peer_settings

    try:
        settings = peer_settings(validate(config))
    except PeerUnavailable as error:
        return {"status": "unavailable", "reason": str(error)}
    reason = autoround.unavailable_reason(settings)
    if reason is not None:
        return {"status": "unavailable", "reason": reason}
    model = load_model(config.model, vocab_size=vocab, seed=config.seed, hub=config.advanced.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        # AutoRound wants a tokenizer beside the token rows it is given: the loader's own for the tiny model
        outcome = autoround.quantize(model, load_tokenizer(config.model, hub=config.advanced.model), ids, settings, iters=autoround.DEFAULT_ITERS, seed=config.seed,
                                     device=str(device), amp=device.type == "cuda")
    except Exception as error:  # a peer that fails is a record saying so, not a lost run
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:300]}
    return {"status": "ok", "iters": autoround.DEFAULT_ITERS, "quantize_s": outcome.quantize_s,
            "settings": outcome.settings, "version": outcome.version,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None}


@dataclasses.dataclass
class WindowRun:
    """What the measured window gave: the clock's stages, the fit's steps, the plain forward, the window's wall."""

    stages: dict[str, float]
    steps: list[float]
    plain_forward_s: float
    #: each measurement of the plain forward (before the window's entry, before its leave)
    plain_forwards_s: list[float]
    window_s: float
    capture_s: float
    samples: int
    batch_size: int
    #: the process's CPU time per stage and of the plain forward (the mean of the two)
    cpu_stages: dict[str, float] = dataclasses.field(default_factory=dict)
    plain_forward_cpu_s: float | None = None


def measure_window(config: QuantizeConfig, adapter: DecoderAdapter, ids: torch.Tensor, device: torch.device,
                   output_dir: Path, clock: StageClock) -> WindowRun:
    """Window 0 enters and leaves untrained, window 1 runs as ``cbq quantize`` runs it, timed by ``clock``."""
    with clock("capture"):
        inputs, block_kwargs = adapter.capture_block_inputs(ids)
    job = runner._Job(
        config=config, scheme=validate(config), place=Placement(), output_dir=output_dir,
        checkpointer=WindowCheckpointer(output_dir, dataclasses.asdict(config)), resume=None, tokenizer=None,
        model=adapter.model, adapter=adapter, rounding=config.rounding, correction=config.extensions.correction,
        all_ids=ids, ids=ids, eval_sets=[],
    )
    built = runner._build_state(job, inputs, block_kwargs, device)
    state = built.state
    first, measured = _steady_schedule(config)[1][:2]
    # window 0 untrained, only to put the caches and kept states where a steady-state window finds them: its blocks
    # get the quantized layout without preprocessing, GPTQ or the clip search (what they cost is window 1's block's
    # to show; at 8B shapes on a GPU machine's CPU each would take as long as the measured window's)
    preprocessors, quantize = state.preprocessors, state.quantize
    state.preprocessors, state.quantize = [], built.quantizer.structure
    state.enter(first, device)
    state.leave(first, device)
    state.preprocessors, state.quantize = preprocessors, quantize

    state.preprocessors = [_TimedPreprocessor(p, clock, "cfp" if p is built.cfp else "input_statistics")
                           for p in state.preprocessors]
    state._quantized_path_inputs = clock.wrap("input_statistics", state._quantized_path_inputs)
    state.quantize = clock.wrap("gptq_start" if config.extensions.gptq is not None else "quantize", state.quantize)
    state.enter = clock.wrap("teacher_caching", state.enter)
    # the denominator, taken twice to bracket the window's work (before its entry and before its leave) and
    # averaged: on a shared machine the load moves within a run; before the entry the window's new blocks are
    # still the full-precision ones
    fp_blocks = [state.teachers.get(index, adapter.blocks[index]) for index in measured.blocks]
    plain = [plain_forward_s(fp_blocks, measured.blocks, state.x_q, block_kwargs, device, state.batch_size)]
    leave = clock.wrap("advancing", state.leave)

    def measured_leave(window: Window, leave_device: torch.device | str) -> Any:
        # the denominator before the teachers go: the same samples through the window's full-precision blocks
        with clock("plain_forward"):  # not part of the window: taken out of its wall time below
            plain.append(plain_forward_s([state.teachers[i] for i in window.blocks], window.blocks, state.x_q,
                                         block_kwargs, device, state.batch_size))
        return leave(window, leave_device)

    state.leave = measured_leave
    objective = HardenedObjective(keep_best=config.extensions.keep_best)
    records = CrossBlockCallback(state, device, objective)
    checkpoint = WindowCheckpoint(job.checkpointer, state, records, built.cfp, built.quantizer.generator, None)
    records.add_listener(clock.wrap("checkpoint", checkpoint.save))
    timer = StepTimer(clock)
    logger = TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="", default_hp_metric=False)
    loop = WindowLoop(
        config=config, scheme=job.scheme, state=state, logger=logger, records=records, objective=objective,
        extra_callbacks=[timer], output_head=None, stop=GracefulStop(), total_windows=2,
    )
    with _timed_method(WeightQuantizer, "search_clip", clock, "clip_search"):
        with clock("trainer_overhead"):  # what the fit's wall time holds beyond every named stage
            loop.run([measured], 0)
    window_s = clock.inclusive["trainer_overhead"]
    stages = {stage: clock.seconds.get(stage, 0.0) for stage in STAGES}
    walls = [wall for wall, _ in plain]
    return WindowRun(stages=stages, steps=timer.steps, plain_forward_s=sum(walls) / len(walls), plain_forwards_s=walls,
                     cpu_stages={stage: clock.cpu_seconds.get(stage, 0.0) for stage in STAGES},
                     plain_forward_cpu_s=sum(cpu for _, cpu in plain) / len(plain),
                     window_s=window_s - clock.seconds["plain_forward"], capture_s=clock.seconds["capture"],
                     samples=int(ids.shape[0]), batch_size=config.train.batch_size)


def end_to_end_s(run: WindowRun, budget: QuantizeConfig, blocks: int, evaluation: dict[str, float],
                 cuda: bool) -> float:
    """The recipe's end-to-end phase (``extensions.end_to_end``; 0 without one), projected from the measured plain forward
    (per block and sample) and the evaluation's head (per position): each training pass is about three forwards of
    every block (four where the blocks are recomputed in the backward: on CUDA by default) and of the head at the
    sampled positions, over every sample each epoch, plus the two measuring passes (forward only). Projected rather
    than run because the phase needs every block of the model finalised, which the built blocks are not."""
    settings = budget.extensions.end_to_end
    if settings is None:
        return 0.0
    block_sample_s = run.plain_forward_s / (budget.window.size * run.samples)
    forward_s = blocks * block_sample_s + settings.tokens * evaluation["head"] / budget.eval.seqlen
    recompute = settings.checkpoint_blocks if settings.checkpoint_blocks is not None else cuda
    return budget.data.num_samples * forward_s * (settings.epochs * (4 if recompute else 3) + 2)


def project(run: WindowRun, budget: QuantizeConfig, scheme_bits: int, shape: dict[str, int], rotation_s: float,
            built_blocks: int, evaluation: dict[str, float], cuda: bool = False) -> dict[str, Any]:
    """The whole model at the recipe's budget: every window as the measured steady-state one, the per-sample
    stages scaled to the budget's samples, the steps to its epochs, plus rotation, input capture, the end-to-end
    phase (:func:`end_to_end_s`) and evaluation."""
    samples = budget.data.num_samples
    scale = samples / run.samples
    steady = run.steps[1:] if len(run.steps) > 2 else run.steps  # the first step pays for warm-up
    step_s = sum(steady) / len(steady)
    steps = budget.train.epochs_for(scheme_bits) * math.ceil(samples / budget.train.batch_size)
    stages = {stage: seconds * (scale if stage in PER_SAMPLE else 1.0) for stage, seconds in run.stages.items()
              if stage != "training_steps"}
    stages["training_steps"] = steps * step_s
    window_s = sum(stages.values())
    windows = len(window_schedule(shape["blocks"], budget.window))
    eval_windows = budget.eval.max_windows or shape["eval_windows"]
    before_phase = budget.extensions.end_to_end is not None and budget.extensions.end_to_end.evaluate_before
    # per dataset: the quantized model, the FP reference, the windows' model before the phase (evaluate_before)
    sets = len(budget.eval.datasets) * (1 + int(budget.eval.fp_reference) + int(before_phase))
    eval_s = sets * eval_windows * (shape["blocks"] * evaluation["block"] + evaluation["head"])
    rotation_total = rotation_s * shape["blocks"] / built_blocks
    phase_s = end_to_end_s(run, budget, shape["blocks"], evaluation, cuda)
    calibration_s = rotation_total + run.capture_s * scale + windows * window_s + phase_s
    return {
        "samples": samples, "seqlen": budget.data.seqlen, "epochs": budget.train.epochs_for(scheme_bits),
        "batch_size": budget.train.batch_size, "steps_per_window": steps, "step_s": step_s,
        "windows": windows, "window_s": window_s, "stages_s": stages,
        "rotation_s": rotation_total, "capture_s": run.capture_s * scale, "end_to_end_s": phase_s,
        "evaluation_s": eval_s, "evaluation": {"sets": sets, "windows_per_set": eval_windows},
        "calibration_min": calibration_s / 60, "total_min": (calibration_s + eval_s) / 60,
    }


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="the recipe (a cbq quantize YAML)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--scheme", default=None, help="replace the recipe's quant.scheme (e.g. W4A4)")
    parser.add_argument("--measure-samples", type=int, default=None,
                        help="calibration samples in the measured window (default: the recipe's; the per-sample "
                        "stages are scaled to the recipe's count)")
    parser.add_argument("--measure-epochs", type=int, default=None,
                        help="epochs in the measured window (default: the recipe's; steps are projected)")
    parser.add_argument("--autoround", choices=("auto", "on", "off"), default="auto",
                        help="run AutoRound on the same shape (auto: on a GPU only)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results",
                        help="a folder (the record is named after shape, scheme and device) or a .json path")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.scheme:
        overrides = [*overrides, "--quant.scheme", args.scheme]
    return args, overrides


def _record_path(output: Path, shape: str, scheme: str, cuda: bool) -> Path:
    if output.suffix == ".json":
        return output
    return output / f"speed_{shape}_{scheme.lower()}_{'gpu' if cuda else 'cpu'}.json"


def _print_table(record: dict[str, Any]) -> None:
    """The stages of the measured window and of the projected one, then the whole model and the ratios."""
    projected, measured = record["projected"], record["measured"]
    print(f"| stage | measured window (s, {measured['samples']} samples) | projected window (s, "
          f"{projected['samples']} samples) |")
    print("|---|---|---|")
    for stage in STAGES:
        print(f"| {stage} | {measured['stages_s'][stage]:.2f} | {projected['stages_s'][stage]:.2f} |")
    print(f"| window | {measured['window_s']:.2f} | {projected['window_s']:.2f} |")
    whole = (f"| whole model ({projected['windows']} windows) | rotation {projected['rotation_s']:.1f} s, capture "
             f"{projected['capture_s']:.1f} s, end-to-end phase {projected['end_to_end_s']:.1f} s | calibration {projected['calibration_min']:.1f} min, evaluation "
             f"{projected['evaluation_s'] / 60:.1f} min, total {projected['total_min']:.1f} min |")
    print(whole)
    gpu = "n/a" if record["peak_gpu_gib"] is None else f"{record['peak_gpu_gib']:.1f} GiB"
    cpu_time = record["window_work_over_forward_cpu_time"]
    print(f"plain forward {measured['plain_forward_s']:.3f} s; window_work_over_forward "
          f"{record['window_work_over_forward']:.2f}" + (f" (CPU time {cpu_time:.2f})" if cpu_time else "")
          + f"; peak GPU {gpu}, peak RSS {record['peak_rss_gib']:.1f} GiB; AutoRound {record['autoround']['status']}"
          + (f", cbq_over_autoround {record['cbq_over_autoround']:.2f}" if record["cbq_over_autoround"] else ""))


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = _device(args.device)
    cuda = device.type == "cuda"
    shape = SHAPES[args.shape]
    probe = load_recipe(args.config, overrides)
    built_blocks, _ = _steady_schedule(probe)
    budget = _recipe(args.config, overrides, device, shape, built_blocks)
    config = _measured(budget, args.measure_samples, args.measure_epochs)
    scheme = validate(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    quiet_lightning()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = load_model(config.model, vocab_size=shape["vocab_size"], seed=config.seed, hub=config.advanced.model)
    adapter = DecoderAdapter(model)
    clock = StageClock(device)
    with clock("rotation"):
        rotation = rotate_model(adapter, config.extensions.rotation, config.seed) if config.extensions.rotation is not None else None
    ids = torch.randint(0, shape["vocab_size"], (config.data.num_samples, config.data.seqlen),
                        generator=torch.Generator().manual_seed(config.seed))
    with tempfile.TemporaryDirectory(prefix="cbq-speed-") as scratch:
        run = measure_window(config, adapter, ids, device, Path(scratch), clock)
    untouched = adapter.blocks[built_blocks - 1]  # after the measured window: never entered, full precision
    evaluation = eval_sequence_s(adapter, untouched, budget.eval.seqlen, shape["vocab_size"], device)
    projected = project(run, budget, scheme.w_bits, shape, clock.seconds["rotation"], built_blocks, evaluation, cuda)
    work = run.stages["teacher_caching"] + run.stages["advancing"]
    record = {
        "benchmark": "speed",
        "recipe": args.config,
        "overrides": overrides,
        "shape": args.shape,
        "scheme": scheme.name,
        "device": torch.cuda.get_device_name(device) if cuda else
        f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": str(config.trainer.precision),
        "model_dtype": str(config.model.dtype),
        "window": {"size": config.window.size, "overlap": config.window.overlap, "built_blocks": built_blocks,
                   "measured_index": 1},
        "rotation": rotation is not None,
        # the work of a window that is not training, over one plain forward of its samples through its blocks
        "window_work_over_forward": work / run.plain_forward_s,
        # the same from the process's CPU time (CPU runs only: steadier than wall time on a shared machine)
        "window_work_over_forward_cpu_time": None if cuda else
        (run.cpu_stages["teacher_caching"] + run.cpu_stages["advancing"]) / run.plain_forward_cpu_s,
        "measured": {
            "samples": run.samples, "seqlen": config.data.seqlen, "batch_size": run.batch_size,
            "steps": len(run.steps), "step_times_s": run.steps, "stages_s": run.stages, "window_s": run.window_s,
            "plain_forward_s": run.plain_forward_s, "plain_forwards_s": run.plain_forwards_s,
            "cpu_time_stages_s": run.cpu_stages, "plain_forward_cpu_time_s": run.plain_forward_cpu_s,
            "teacher_caching_plus_advancing_s": work,
            "capture_s": run.capture_s, "rotation_s": clock.seconds["rotation"],
            "evaluation_sequence_s": evaluation,
        },
        "projected": projected,
        "autoround": {"status": "pending"},
        "cbq_over_autoround": None,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 1024**3 if cuda else None,
        "peak_rss_gib": _peak_rss_gib(),
        "versions": versions(),
        "commit": source_commit(),
        "command": " ".join(["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = _record_path(args.output, args.shape, scheme.name, cuda)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.autoround == "on" or (args.autoround == "auto" and cuda):
        path.write_text(json.dumps(record, indent=2) + "\n")  # CBQ's figures are kept should AutoRound not finish
        budget_ids = torch.randint(0, shape["vocab_size"], (budget.data.num_samples, budget.data.seqlen),
                                   generator=torch.Generator().manual_seed(config.seed))
        del adapter, model
        record["autoround"] = _autoround(budget, budget_ids, device, shape["vocab_size"])
    else:
        record["autoround"] = {"status": "skipped",
                               "reason": "CPU run: AutoRound runs on a GPU here (--autoround on forces it)"}
    if record["autoround"]["status"] == "ok":
        # AutoRound's time for the built blocks (its input caching included), per block, times the shape's blocks
        record["autoround"]["projected_min"] = record["autoround"]["quantize_s"] * shape["blocks"] / built_blocks / 60
        record["cbq_over_autoround"] = projected["calibration_min"] / record["autoround"]["projected_min"]
    path.write_text(json.dumps(record, indent=2) + "\n")
    _print_table(record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

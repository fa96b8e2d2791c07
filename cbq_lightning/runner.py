"""The quantization job: load, calibrate window by window, save. One ``trainer.fit`` per window."""

from __future__ import annotations

import dataclasses
import logging
import platform
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from callbacks.cross_block import CrossBlockCallback, WindowTargets, log_preprocess
from callbacks.hardened_objective import HardenedObjective
from callbacks.progress import WindowProgressBar
from callbacks.window_checkpoint import WindowCheckpoint
from cbq_lightning.block_quantizer import BlockQuantizer
from cbq_lightning.cache import TensorStore
from cbq_lightning.cfp import CoarseToFinePreprocessor
from cbq_lightning.checkpoint import ResumePoint, WindowCheckpointer, restore_rng
from cbq_lightning.config import QuantizeConfig, validate
from cbq_lightning.crossblock import CrossBlockState
from cbq_lightning.data.calibration import calibration_ids
from cbq_lightning.distributed import Placement, all_gather_objects, compute_device, placement
from cbq_lightning.errors import RunStopped, TrainingError
from cbq_lightning.evaluation.perplexity import EvalSet, evaluate_sets, prepare_eval_set
from cbq_lightning.export.fake_quant import MODEL_DIR, save_fake_quant_checkpoint
from cbq_lightning.export.gguf_plan import GgufPlan, plan_types
from cbq_lightning.export.packed import export_run
from cbq_lightning.export.quant_state import QUANT_STATE_FILE, save_quant_state
from cbq_lightning.guard import DivergenceError
from cbq_lightning.io import atomic_write_json, atomic_write_text
from cbq_lightning.lock import quantize_lock
from cbq_lightning.machine import resolve_machine_settings
from cbq_lightning.models.adapter import BlockKwargs, DecoderAdapter
from cbq_lightning.models.families import checkpoint_name
from cbq_lightning.models.loading import load_model, load_tokenizer
from cbq_lightning.quant.convert import (
    all_block_linears,
    check_correction_rank,
    check_group_size,
    finalized_linears,
    narrow_layers,
    reset_block_to_round_to_nearest,
)
from cbq_lightning.quant.correction import CorrectionConfig
from cbq_lightning.quant.input_moments import InputMoments
from cbq_lightning.quant.mixed_precision import (
    allocate,
    average_bits,
    check_layer_bits,
    fused_groups,
    measure_sensitivity,
)
from cbq_lightning.quant.qlinear import LayerQuantConfig
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.quant.weight_quantizer import ClipSearch
from cbq_lightning.rotation.fold import RotationConfig, rotate_model, rotation_unavailable
from cbq_lightning.stop import GracefulStop
from cbq_lightning.window import WindowModule
from cbq_lightning.windows import Window, WindowConfig, window_schedule

log = logging.getLogger("cbq_lightning")


@dataclass
class QuantizeResult:
    """What a run returns in-process: the report written to disk, and the quantized model itself."""

    report: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    #: False on the other DDP ranks: their report holds only their windows, rank 0 writes the outputs
    main: bool = True


def _peak_rss_gib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**3 if sys.platform == "darwin" else 1024**2)


def versions() -> dict[str, str]:
    import lightning
    import transformers

    from cbq_lightning import __version__

    return {
        "cbq_lightning": __version__,
        "git": source_commit(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def source_commit(paths: Sequence[str] = ("cbq_lightning", "configs")) -> str | None:
    """The git commit of the code that ran (``-dirty`` when ``paths``, by default the package and the recipes,
    had changes not committed), or None for an installed copy outside a checkout. Why: the package version does not change
    between commits, and a result copied away from its run (a benchmark record, an imported run) should still
    say which code made it."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *paths],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _quiet_lightning() -> None:
    """One Trainer per window would repeat Lightning's start-up banners dozens of times."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # blocks run in eval mode on purpose: calibration must not enable dropout
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _strategy(name: str) -> str | DDPStrategy:
    """A fresh strategy per window's Trainer (Lightning binds a strategy object to its first Trainer).

    Plain ``ddp`` skips the per-step buffer broadcast: the frozen weights are buffers that agree on every
    rank already, and broadcasting a window of 7B blocks each step would cost more than the step.
    """
    return DDPStrategy(broadcast_buffers=False) if name == "ddp" else name


def _window_module(
    config: QuantizeConfig, state: CrossBlockState, window: Window, step_offset: int, lr_scale: float,
    output_head: nn.Module | None,
) -> WindowModule:
    """The LightningModule of one window's fit (a retry builds a new one at a lower ``lr_scale``)."""
    return WindowModule(
        blocks=[state.blocks[i] for i in window.blocks],
        window=window,
        block_kwargs=state.block_kwargs.for_blocks(window.blocks),
        loss=config.loss,
        rounding=config.rounding,
        optim=config.train,
        step_offset=step_offset,
        lr_scale=lr_scale,
        explode_factor=config.guard.explode_factor,
        output_head=output_head,
        continuous=config.quant.continuous,
    )


def _measures_hardened_objective(config: QuantizeConfig) -> bool:
    """Whether a fit runs its validation loop, the hardened objective (``monitor.hardened_loss`` or
    ``train.keep_best``, which compares it epoch against epoch)."""
    return config.monitor.hardened_loss or config.train.keep_best


def _window_trainer(
    config: QuantizeConfig, epochs: int, logger: TensorBoardLogger, callbacks: list[L.Callback], total_windows: int
) -> L.Trainer:
    """The ``Trainer`` of one window's fit: the recipe's trainer settings, the run's shared logger, no
    checkpointing of its own (:class:`~callbacks.window_checkpoint.WindowCheckpoint` saves finished windows),
    and the window progress bar.

    The validation loop measures the hardened objective (:mod:`callbacks.hardened_objective`): once over every
    batch before training (Lightning's sanity check: the starting state), then after the last epoch, or after
    every epoch with ``train.keep_best``. It runs without inference mode: the window caches tensors in its
    forward that training reuses."""
    progress = [WindowProgressBar(total_windows)] if config.trainer.enable_progress_bar else []
    measured = _measures_hardened_objective(config)
    return L.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[*callbacks, *progress],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=-1 if measured else 0,
        limit_val_batches=1.0 if measured else 0,
        check_val_every_n_epoch=1 if config.train.keep_best else epochs,
        inference_mode=False,
        default_root_dir=config.output_dir,
        use_distributed_sampler=False,  # each rank already holds only its shard
        **{**dataclasses.asdict(config.trainer), "strategy": _strategy(config.trainer.strategy)},
    )


@dataclass
class _WindowLoop:
    """CBQ's walk: one LightningModule and one ``trainer.fit`` per window, all logging into one run.

    A diverging fit is retried from the window's starting state with lower learning rates, then falls back to
    round-to-nearest (:mod:`cbq_lightning.guard`). ``records`` writes every window's record (trained or
    fallen back); ``checkpoint`` saves the run after each window. ``output_head`` (final norm + LM head) goes to
    the window holding the last block, for ``loss.output_kl_weight``.
    """

    config: QuantizeConfig
    scheme: QuantScheme
    state: CrossBlockState
    logger: TensorBoardLogger
    records: CrossBlockCallback
    objective: HardenedObjective
    checkpoint: WindowCheckpoint
    extra_callbacks: Sequence[L.Callback]
    output_head: nn.Module | None
    stop: GracefulStop
    #: the whole run's window count: after a resume the schedule holds only the windows still to do
    total_windows: int

    def run(self, schedule: list[Window], step_offset: int) -> list[dict[str, Any]]:
        """Fit every window of ``schedule`` in turn; the records of the whole run (resumed windows included)."""
        for window in schedule:
            if self.stop.requested:
                raise self._stopped("before", window)
            step_offset = self._fit(window, step_offset)
        return self.records.window_summaries

    def _fit(self, window: Window, step_offset: int) -> int:
        """One window, with the guard's retries; returns the TensorBoard step the next window starts from."""
        guard, lr_scale = self.config.guard, 1.0
        last_block = len(self.state.blocks) - 1
        head = self.output_head if last_block in window.blocks else None
        for attempt in range(1, guard.retries + 2):
            module = _window_module(self.config, self.state, window, step_offset, lr_scale, head)
            # records, then the objective (it restores the kept state before records read it), then the save
            callbacks = [self.records, self.objective, *self.extra_callbacks, self.checkpoint]
            trainer = _window_trainer(self.config, self.config.train.epochs_for(self.scheme.w_bits), self.logger,
                                      callbacks, self.total_windows)
            targets, batch_size = WindowTargets(self.state), self.config.train.batch_size
            loader = DataLoader(targets, batch_size=batch_size, shuffle=self.config.train.shuffle,
                                generator=torch.Generator().manual_seed(self.config.seed + window.index))
            # the loss normalises per batch, so measurements meant to be compared batch the samples one fixed
            # way; its own generator: drawing a loader's base seed must not advance the global RNG
            fixed = (DataLoader(targets, batch_size=batch_size, shuffle=False, generator=torch.Generator())
                     if _measures_hardened_objective(self.config) else None)
            self.records.begin_attempt(attempt, lr_scale)
            try:
                trainer.fit(module, train_dataloaders=loader, val_dataloaders=fixed)
            except SIGTERMException:  # Lightning ended the fit at a step boundary: this window is not saved
                raise self._stopped("during", window) from None
            except DivergenceError as error:
                step_offset += trainer.global_step
                module.restore_start_state()
                if attempt <= guard.retries:
                    lr_scale *= guard.lr_factor
                    log.warning("%s; retrying from the window's start with learning rates x%g", error, lr_scale)
                    continue
                self._fall_back(window, attempt, error, step_offset)
                return step_offset
            summary = self.records.window_summaries[-1]
            losses = (summary["loss_first"], summary["loss_last"])
            if None in losses:  # hardened losses not measured: report the training loss
                losses = (summary["train_loss_first"], summary["train_loss_last"])
            log.info("%s: %d steps, loss %.4g -> %.4g, %.1fs", window, summary["steps"], *losses, summary["wall_s"])
            return step_offset + trainer.global_step
        raise AssertionError("unreachable: the last attempt returns or falls back")

    def _fall_back(self, window: Window, attempts: int, error: DivergenceError, step_offset: int) -> None:
        """A window that kept diverging: an error (``guard.fallback=error``), or finalised at round-to-nearest,
        its overlap blocks' warm start included, recorded and saved like a trained one."""
        if self.config.guard.fallback == "error":
            raise TrainingError(
                f"{error}; still diverging after {self.config.guard.retries} retries. Lower train.lr_rounding / "
                "train.lr_clip, use precision 32-true, or set guard.fallback=rtn."
            ) from error
        log.warning("%s; after %d retries %s falls back to round-to-nearest", error, self.config.guard.retries, window)
        started = time.perf_counter()
        for index in window.blocks:
            reset_block_to_round_to_nearest(self.state.blocks[index])
        self.records.finish_untrained(window, self.logger, "cbq", started, attempts=attempts, fallback="rtn",
                                      divergence=str(error))
        self.checkpoint.save(window, step_offset)

    def _stopped(self, when: str, window: Window) -> RunStopped:
        """The message of a SIGTERM stop: where (windows counted from 1, as the progress bar), what is saved,
        how to go on."""
        finished = self.records.window_summaries
        last = finished[-1]["index"] + 1 if finished else 0
        where_saved = Path(self.config.output_dir) / "checkpoints"
        saved = {0: "no window had finished", 1: f"window 1 is saved in {where_saved}"}.get(
            last, f"windows 1-{last} are saved in {where_saved}")
        where = f"{when} window {window.index + 1}/{self.total_windows} (blocks {window.blocks[0]}-{window.blocks[-1]})"
        return RunStopped(f"SIGTERM: stopped {where}; {saved}. Rerun the same command to resume.")


def _round_to_nearest(state: CrossBlockState, schedule: list[Window], records: CrossBlockCallback,
                      logger: TensorBoardLogger) -> list[dict[str, Any]]:
    """The RTN baseline: the same walk down the model, finalising each block without training."""
    for window in tqdm(schedule, desc="RTN blocks", unit="block"):
        started = time.perf_counter()
        entering = state.enter(window, records.device, cache_targets=False)
        log_preprocess(logger, state.preprocess_stats, entering)
        records.finish_untrained(window, logger, "rtn", started)
    return records.window_summaries


def _evaluate(
    config: QuantizeConfig, model: nn.Module, sets: list[EvalSet], device: torch.device, label: str
) -> list[dict[str, Any]]:
    """Perplexity of ``model`` on every set, on ``device`` (the model goes back to the CPU after)."""
    model.to(device)
    try:
        return evaluate_sets(model, sets, device, config.eval.batch_size, label=label)
    finally:
        model.to("cpu")


def _eval_entries(quantized: list[dict[str, Any]], fp: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Report entries ``{dataset, split, seqlen, windows, tokens, ppl, ppl_fp, ...}``."""
    entries = []
    for index, result in enumerate(quantized):
        entry = {key: value for key, value in result.items() if key != "eval_s"}
        entry["ppl_fp"] = fp[index]["ppl"] if fp else None
        entry["eval_s"] = result["eval_s"] + (fp[index]["eval_s"] if fp else 0.0)
        entries.append(entry)
    return entries


def _resume(point: ResumePoint, checkpointer: WindowCheckpointer, built: _Built, records: CrossBlockCallback,
            schedule: list[Window]) -> int:
    """Give the state, CFP, the records and the random generator back what an interrupted run had after window
    ``point.last_window``; returns the TensorBoard step to continue from.

    Every block that had entered a window is rebuilt from its saved state: finalised blocks from their own
    files, overlap blocks (still calibrating) from the moving state, each after getting its teacher back.
    """
    finished = [w for w in schedule if w.index <= point.last_window]
    finalized = {b for w in finished for b in w.finalized}
    for index in sorted({b for w in finished for b in w.blocks}):
        saved = point.block_state(checkpointer.directory, index) if index in finalized else point.overlap_state(index)
        built.state.reenter(index, built.quantizer.structure, saved, finalized=index in finalized)
    built.state.load_state_dict({**point.meta, **point.tensors})
    built.cfp.load_state_dict(point.meta)
    records.load_state_dict(point.meta)
    restore_rng(point, built.quantizer.generator)
    return int(point.meta["step_offset"])


def _correction_summary(model: nn.Module, correction: CorrectionConfig | None) -> dict[str, Any] | None:
    """What the low-rank corrections add: their ranks and full-precision parameters, against the quantized
    linears' own weight count (the corrections are not folded into the integer weights)."""
    if correction is None:
        return None
    layers = [layer for _, layer in finalized_linears(model)]
    added = sum(layer.correction_parameter_count() for layer in layers)
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    ranks = sorted({layer.correction.rank for layer in layers if layer.correction is not None})
    return {
        "rank": correction.rank or None,
        "rank_fraction": correction.rank_fraction or None,
        "ranks": ranks,
        "init": correction.init,
        "parameters": added,
        "parameters_per_quantized_weight": added / weights if weights else 0.0,
    }


def _layer_bits(
    config: QuantizeConfig,
    adapter: DecoderAdapter,
    inputs: torch.Tensor,
    block_kwargs: BlockKwargs,
    scheme: QuantScheme,
    clip_search: ClipSearch | None,
    device: torch.device,
) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Per-layer weight bits (``blocks.<i>.<name>`` -> bits) and their summary for the report, or ``({}, None)``.

    With ``mixed.budget``: a sensitivity pass on the full-precision model and the allocation under the budget;
    with ``quant.layer_bits``: those overrides, checked against the model's layers and fused groups.
    """
    mixed = config.mixed
    if mixed is None and not config.quant.layer_bits:
        return {}, None
    weights = {name: linear.weight.numel() for name, linear in all_block_linears(adapter.blocks)}
    sensitivity = None
    if mixed is not None:
        groups = measure_sensitivity(
            adapter.blocks, inputs[: mixed.samples], block_kwargs, scheme, mixed.candidates, clip_search, device,
            config.train.forward_batch_size, progress=config.trainer.enable_progress_bar,
        )
        layer_bits = allocate(groups, mixed.candidates, mixed.budget)
        sensitivity = [{"layers": g.names, "weights": g.weights, "errors": {str(b): e for b, e in g.errors.items()}}
                       for g in groups]
    else:
        layer_bits = {name: int(bits) for name, bits in config.quant.layer_bits.items()}
        check_layer_bits(layer_bits, list(weights), fused_groups(adapter.blocks[0], inputs, block_kwargs[0]),
                         adapter.num_blocks)
    full_bits = {name: layer_bits.get(name, scheme.w_bits) for name in weights}
    achieved = average_bits(weights, full_bits)
    counts = {str(b): sum(1 for v in full_bits.values() if v == b) for b in sorted(set(full_bits.values()))}
    summary = {
        "budget": None if mixed is None else mixed.budget,
        "average_bits": achieved,
        "layers_per_bits": counts,
        "layer_bits": full_bits,
        **({"sensitivity": sensitivity} if sensitivity is not None else {}),
    }
    log.info("mixed precision: %.3f average weight bits (%s layers per bit-width)", achieved, counts)
    return full_bits, summary


def _log_layer_bits(logger: Any, layer_bits: dict[str, int]) -> None:
    """One TensorBoard chart per layer (name in the block): its bits along the depth of the model."""
    for name, bits in layer_bits.items():
        _, index, inner = name.split(".", 2)
        logger.log_metrics({f"mixed_precision/bits/{inner}": float(bits)}, step=int(index))


def run_quantize(config: QuantizeConfig, callbacks: Sequence[L.Callback] = ()) -> QuantizeResult:
    """Run a whole quantization job and write its outputs to ``config.output_dir``.

    ``callbacks`` join every window's ``Trainer`` (monitoring, or tests that plant faults). SIGTERM stops the
    run at the next safe point with :class:`RunStopped` (:mod:`cbq_lightning.stop`).
    """
    with GracefulStop() as stop, quantize_lock(config):  # one run per output folder (cbq_lightning.lock)
        return _run_quantize(resolve_machine_settings(config), callbacks, stop)


def _run_quantize(config: QuantizeConfig, callbacks: Sequence[L.Callback], stop: GracefulStop) -> QuantizeResult:
    """The job's stages: read and check every input, then (and only then) replace earlier outputs, measure the
    full-precision reference, build the walking state, calibrate window by window, write the outputs."""
    started = time.perf_counter()
    job = _read_inputs(config)
    # every input has been read and checked: only now may earlier outputs of this folder be replaced
    if job.resume is None:
        job.checkpointer.clear()
    if job.place.is_main:
        atomic_write_text(job.output_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    device = compute_device(config.trainer.accelerator, job.place)
    fp_results = _fp_reference(job, device)
    inputs, block_kwargs = job.adapter.capture_block_inputs(job.ids)
    built = _build_state(job, inputs, block_kwargs, device)
    logger = TensorBoardLogger(save_dir=str(job.output_dir), name="tensorboard", version="", default_hp_metric=False)
    if built.quantizer.layer_bits and job.place.is_main:
        _log_layer_bits(logger, built.quantizer.layer_bits)
    windows = _calibrate(job, built, fp_results, logger, device, callbacks, stop)
    built.store.cleanup()  # the disk caches (if any) are not needed past calibration
    calibrated_s = time.perf_counter() - started
    # every rank says which samples it calibrated on (a collective: all ranks take part)
    shards = all_gather_objects({"rank": job.place.rank, "samples": job.place.shard_indices(int(job.all_ids.shape[0])),
                                 "cached_rows": int(built.state.x_q.shape[0])})
    if not job.place.is_main:  # rank 0 holds the same model and writes every output
        return QuantizeResult(report={"rank": job.place.rank, "windows": windows}, model=job.model,
                              tokenizer=job.tokenizer, main=False)
    return _write_outputs(job, built, windows, fp_results, logger, device, shards, started, calibrated_s)


@dataclass
class _Job:
    """What a run has read and checked before it replaces anything in its output folder."""

    config: QuantizeConfig
    scheme: QuantScheme
    place: Placement
    output_dir: Path
    checkpointer: WindowCheckpointer
    resume: ResumePoint | None
    tokenizer: Any
    model: nn.Module
    adapter: DecoderAdapter
    rounding: RoundingConfig
    correction: CorrectionConfig | None
    all_ids: torch.Tensor
    ids: torch.Tensor
    eval_sets: list[EvalSet]
    #: what :func:`~cbq_lightning.rotation.fold.rotate_model` folded in (None: no rotation)
    rotation: dict[str, Any] | None = None
    #: what the recipe asked for that this model cannot take, and what ran instead (:func:`_adapt_to_model`)
    adapted: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: a llama.cpp mix's GGML type per weight (:mod:`cbq_lightning.export.gguf_plan`; None: not a mix)
    gguf_plan: GgufPlan | None = None

    @property
    def cbq(self) -> bool:
        return self.config.method == "cbq"


def _read_inputs(config: QuantizeConfig) -> _Job:
    """Validate the configuration, load the model and read the calibration and evaluation data; every check a
    configuration can fail against the model runs here, before any data is read or any evaluation runs."""
    scheme = validate(config)
    # DDP shards the CBQ windows' training; RTN trains nothing and runs in one process
    place = placement(config.trainer.strategy, config.trainer.devices, config.trainer.num_nodes)
    place = place if config.method == "cbq" else Placement()
    _quiet_lightning()
    L.seed_everything(config.seed, workers=True, verbose=False)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = WindowCheckpointer(output_dir, dataclasses.asdict(config), rank=place.rank, world=place.world)
    resume: ResumePoint | None = None
    if config.method == "cbq" and config.resume:
        resume = checkpointer.load()  # refuses a checkpoint of a different configuration, naming the keys

    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, vocab_size=len(tokenizer), seed=config.seed)
    adapter = DecoderAdapter(model)
    cbq = config.method == "cbq"
    rounding = config.rounding if cbq else RoundingConfig(enabled=False)
    correction = config.correction if cbq else None
    # the configuration against the model's shapes, before any data is read or any evaluation runs
    check_group_size(adapter.blocks, scheme)
    check_correction_rank(adapter.blocks, correction)
    gguf_plan = _gguf_plan(scheme, model, adapter)
    rotation_config, adapted = _adapt_to_model(config.rotation, rounding, adapter)
    all_ids = calibration_ids(config.data, tokenizer, config.seed, config.data_dir)
    evaluation = config.eval
    eval_sets = [
        prepare_eval_set(source, tokenizer, evaluation.seqlen, evaluation.split, evaluation.max_windows, config.data_dir)
        for source in evaluation.datasets
    ]
    # everything is read and checked: rotate before anything measures the model (the full-precision
    # reference then measures the rotated model, which computes the same function)
    rotation = rotate_model(adapter, rotation_config, config.seed) if rotation_config is not None else None
    return _Job(
        config=config, scheme=scheme, place=place, output_dir=output_dir, checkpointer=checkpointer, resume=resume,
        tokenizer=tokenizer, model=model, adapter=adapter, rounding=rounding, correction=correction,
        all_ids=all_ids, ids=place.shard(all_ids),  # DDP: this rank's samples (all of them in a single process)
        eval_sets=eval_sets, rotation=rotation, adapted=adapted, gguf_plan=gguf_plan,
    )


def _gguf_plan(scheme: QuantScheme, model: nn.Module, adapter: DecoderAdapter) -> GgufPlan | None:
    """With a llama.cpp mix (``quant.scheme: Q4_K_M`` ...): the GGML type llama.cpp would store for each weight of
    this model, logged with its fallbacks; None for any other scheme."""
    if scheme.gguf_mix is None:
        return None
    config = model.config.to_dict()
    shapes = [(checkpoint_name(adapter.model_type, name), tuple(p.shape)) for name, p in model.named_parameters()]
    plan = plan_types(scheme.gguf_mix, config, shapes)
    plan.log()
    return plan


def _mix_schemes(job: _Job) -> dict[str, QuantScheme]:
    """Each block linear's scheme under the job's llama.cpp mix (``blocks.<i>.<name>`` -> its GGML type's)."""
    plan = job.gguf_plan
    if plan is None:
        return {}
    schemes = {}
    for name, _ in all_block_linears(job.adapter.blocks):
        _, index, layer = name.split(".", 2)
        key = checkpoint_name(job.adapter.model_type, f"{job.adapter.family.blocks}.{index}.{layer}.weight")
        schemes[name] = job.scheme.with_ggml_type(plan.stored(key))
    return schemes


def _adapt_to_model(
    rotation: RotationConfig | None, rounding: RoundingConfig, adapter: DecoderAdapter,
) -> tuple[RotationConfig | None, dict[str, Any]]:
    """The recipe's extensions fitted to this model: the rotation to fold (None where the family has no exact
    layout) and ``{part: what changed and why}`` for the log and ``report.json``.

    Why: one recipe per scheme serves every supported family. An extension that cannot apply to a model (a
    rotation that does not fold exactly, a LoRA rank wider than a layer) is left out or narrowed for that model
    with one log line, instead of refusing a model the method itself supports.
    """
    adapted: dict[str, Any] = {}
    reason = rotation_unavailable(adapter) if rotation is not None else None
    if reason is not None:
        log.warning("rotation skipped: %s; this run quantizes the unrotated model", reason)
        adapted["rotation"] = {"action": "skipped", "reason": reason}
        rotation = None
    narrow = narrow_layers(adapter.blocks, rounding)
    if narrow:
        log.warning("rounding.rank=%d is not below the smaller dimension of %d layers: they use half of it (%s)",
                    rounding.rank, len(narrow), ", ".join(sorted({str(rank) for rank in narrow.values()})))
        adapted["rounding.rank"] = {"action": "narrowed", "requested": rounding.rank, "layers": narrow}
    return rotation, adapted


def _fp_reference(job: _Job, device: torch.device) -> list[dict[str, Any]] | None:
    """The full-precision perplexities (rank 0 only), or those a resumed run measured before its interruption."""
    if job.resume is not None and job.resume.meta.get("fp_results") is not None:
        return job.resume.meta["fp_results"]
    if job.eval_sets and job.config.eval.fp_reference and job.place.is_main:
        return _evaluate(job.config, job.model, job.eval_sets, device, "fp")
    return None


@dataclass
class _Built:
    """The state that walks down the model with the windows, and the pieces that act on it."""

    state: CrossBlockState
    quantizer: BlockQuantizer
    cfp: CoarseToFinePreprocessor
    store: TensorStore
    mixed_summary: dict[str, Any] | None


def _build_state(job: _Job, inputs: torch.Tensor, block_kwargs: BlockKwargs, device: torch.device) -> _Built:
    """The block quantizer, CFP, the input statistics and the cross-block state over the captured inputs."""
    config, cbq, scheme = job.config, job.cbq, job.scheme
    learnable_clip = config.quant.learnable_clip and cbq
    clip_search = config.quant.clip_search_settings() if cbq else None
    gptq = config.quant.gptq
    act = config.quant.act_settings(trained=cbq)
    # before CFP and any quantization: the sensitivity pass runs the full-precision model
    layer_bits, mixed_summary = _layer_bits(config, job.adapter, inputs, block_kwargs, scheme, clip_search, device)
    layer_schemes = {name: replace(scheme, w_bits=bits) for name, bits in layer_bits.items()} or _mix_schemes(job)
    layer = LayerQuantConfig(
        scheme=scheme, rounding=job.rounding, learnable_clip=learnable_clip,
        clip_init=config.quant.clip_init if learnable_clip else 1.0, clip_search=clip_search, act=act, gptq=gptq,
        correction=job.correction,
    )
    sequential = gptq is not None and gptq.true_sequential
    needs_moments = layer.needs_input_moments or gptq is not None
    moments = InputMoments(full=gptq is not None, sequential=sequential) if needs_moments else None
    quantizer = BlockQuantizer(
        layer=layer, generator=torch.Generator().manual_seed(config.seed), moments=moments,
        untrained_act=config.quant.act_settings(trained=False), layer_schemes=layer_schemes,
    )
    cfp = CoarseToFinePreprocessor(
        config.cfp, scale_activations=config.cfp.activations and act is not None,
        batch_size=config.train.forward_batch_size, rtn=quantizer.round_to_nearest, pairs=job.adapter.scaling_pairs,
    )
    # CFP first: the clip search's moments must describe the inputs the quantized linears will see
    preprocessors = [p for p in (cfp if cfp.active else None, moments) if p is not None]
    cache_dir = Path(config.cache.directory) if config.cache.directory else job.output_dir / "cache"
    cache_dir = cache_dir / f"rank_{job.place.rank}" if job.place.world > 1 else cache_dir
    store = TensorStore(cache_dir if config.cache.location == "disk" else None)
    state = CrossBlockState(
        blocks=job.adapter.blocks,
        inputs=inputs,
        block_kwargs=block_kwargs,
        quantize=quantizer.quantize,
        rtn_reference=quantizer.rtn_reference if cbq and config.monitor.rtn_reference else None,
        batch_size=config.train.forward_batch_size,
        preprocessors=preprocessors,
        store=store,
        target_dtype=config.cache.targets_dtype(),
    )
    return _Built(state=state, quantizer=quantizer, cfp=cfp, store=store, mixed_summary=mixed_summary)


def _calibrate(
    job: _Job, built: _Built, fp_results: list[dict[str, Any]] | None, logger: TensorBoardLogger,
    device: torch.device, callbacks: Sequence[L.Callback], stop: GracefulStop,
) -> list[dict[str, Any]]:
    """CBQ's windows (resuming after the last saved one), or the RTN baseline's walk; the windows' records."""
    config, state = job.config, built.state
    objective = HardenedObjective(keep_best=config.train.keep_best)
    records = CrossBlockCallback(state, device, objective)
    if not job.cbq:
        return _round_to_nearest(state, window_schedule(job.adapter.num_blocks, WindowConfig(size=1, overlap=0)),
                                 records, logger)
    schedule = window_schedule(job.adapter.num_blocks, config.window)
    total_windows, step_offset = len(schedule), 0
    if job.resume is not None:
        step_offset = _resume(job.resume, job.checkpointer, built, records, schedule)
        schedule = [w for w in schedule if w.index > job.resume.last_window]
        log.info("resuming after window %d of %d from %s", job.resume.last_window + 1, total_windows,
                 job.checkpointer.directory)
    checkpoint = WindowCheckpoint(job.checkpointer, state, records, built.cfp, built.quantizer.generator, fp_results)
    loop = _WindowLoop(
        config=config, scheme=job.scheme, state=state, logger=logger, records=records, objective=objective,
        checkpoint=checkpoint,
        extra_callbacks=callbacks, stop=stop, total_windows=total_windows,
        output_head=job.adapter.output_head() if config.loss.output_kl_weight > 0 else None,
    )
    return loop.run(schedule, step_offset)


def _write_outputs(
    job: _Job, built: _Built, windows: list[dict[str, Any]], fp_results: list[dict[str, Any]] | None,
    logger: TensorBoardLogger, device: torch.device, shards: list[Any], started: float, calibrated_s: float,
) -> QuantizeResult:
    """The integer quant state, the fake-quant checkpoint, the evaluation, the report and (if asked) the export."""
    config, model, quantizer = job.config, job.model, built.quantizer
    scheme_info = {
        **dataclasses.asdict(job.scheme),
        "name": job.scheme.name,
        "activations": None if quantizer.layer.act is None else dataclasses.asdict(quantizer.layer.act),
    }
    correction_info = _correction_summary(model, job.correction)
    quantization = {
        "method": config.method, "scheme": scheme_info, "quant_state": f"../{QUANT_STATE_FILE}",
        **({"correction": correction_info} if correction_info else {}),
        # the folded rotations, and the online one `cbq evaluate` puts back (absent: no rotation)
        **({"rotation": job.rotation} if job.rotation else {}),
    }
    save_quant_state(model, job.output_dir / QUANT_STATE_FILE, scheme_info)
    save_fake_quant_checkpoint(model, job.tokenizer, job.output_dir / MODEL_DIR, quantization)
    eval_entries = _eval_entries(_evaluate(config, model, job.eval_sets, device, config.method), fp_results)
    for entry in eval_entries:
        name = Path(entry["dataset"]).stem  # a dataset name, or a file's name without its folders
        metrics = {f"eval/ppl/{name}": entry["ppl"]}
        if entry["ppl_fp"] is not None:
            metrics[f"eval/ppl_fp/{name}"] = entry["ppl_fp"]
        logger.log_metrics(metrics, step=0)
    logger.finalize("success")
    report = _report(job, built, windows, scheme_info, correction_info, eval_entries, shards, device, started,
                     calibrated_s)
    atomic_write_json(job.output_dir / "report.json", report)
    job.checkpointer.clear()  # the outputs are complete: the per-window state is no longer needed
    if config.export.format is not None:
        # from the files just written, exactly as `cbq export --run output_dir` would
        report["export"] = export_run(job.output_dir, config.export)
        atomic_write_json(job.output_dir / "report.json", report)
    return QuantizeResult(report=report, model=model, tokenizer=job.tokenizer)


def _report(
    job: _Job, built: _Built, windows: list[dict[str, Any]], scheme_info: dict[str, Any],
    correction_info: dict[str, Any] | None, eval_entries: list[dict[str, Any]], shards: list[Any],
    device: torch.device, started: float, calibrated_s: float,
) -> dict[str, Any]:
    """``report.json``: what ran, on what, what each window did, the errors and the perplexities."""
    config, state, cfp, resume = job.config, built.state, built.cfp, job.resume
    final = state.block_errors[-1]
    return {
        "method": config.method,
        "scheme": scheme_info,
        "window": {"size": config.window.size, "overlap": config.window.overlap} if job.cbq else {"size": 1, "overlap": 0},
        "model": {
            "name_or_path": config.model.name_or_path,
            "model_type": job.adapter.model_type,
            "num_blocks": job.adapter.num_blocks,
            # where CFP's channel scaling can fold exactly in this family, and what it cannot
            "scaling_pairs": job.adapter.scaling_pairs.describe(),
            # mixture of experts: tokens routed to each expert in calibration, what stays full precision
            "moe": job.adapter.describe_experts(state.routed_tokens),
        },
        "calibration": {
            "source": config.data.source,
            "num_samples": int(job.all_ids.shape[0]),
            "seqlen": int(job.all_ids.shape[1]),
            "tokens": int(job.all_ids.numel()),
        },
        "distributed": {"world_size": job.place.world, "shards": shards},
        "windows": windows,
        "block_errors": [dataclasses.asdict(e) for e in state.block_errors],
        "cfp": {
            "weights": config.cfp.weights,
            "activations": cfp.scale_activations,
            "outlier_channels": {str(index): found for index, found in sorted(cfp.outlier_channels.items())},
        },
        "preprocess": {str(index): stats for index, stats in sorted(state.preprocess_stats.items())},
        # the rotations folded into the model before calibration (None: none)
        "rotation": job.rotation,
        # what the recipe asked for that this model could not take, and what ran instead ({}: nothing)
        "adapted_to_model": job.adapted,
        # the low-rank correction's cost, which the integer weights do not show (None without one)
        "correction": correction_info,
        # per-layer bits (mixed.budget / quant.layer_bits), their average and the sensitivities (None: uniform)
        "mixed_precision": built.mixed_summary,
        # a llama.cpp mix: the GGML type each weight is stored in and the fallbacks (None: not a mix)
        "gguf_types": None if job.gguf_plan is None else job.gguf_plan.summary(),
        "final_error": {config.method: final.quantized, **({"rtn": final.rtn} if final.rtn is not None else {})},
        "eval": eval_entries,
        "resumed_after_window": None if resume is None else resume.last_window,
        # the windows this invocation trained (all of them, unless it resumed a killed run)
        "recomputed_windows": [w["index"] for w in windows if resume is None or w["index"] > resume.last_window],
        "guard": {
            "retried_windows": [w["index"] for w in windows if w.get("attempts", 1) > 1],
            "rtn_fallback_windows": [w["index"] for w in windows if w.get("fallback") == "rtn"],
        },
        "calibration_time_s": calibrated_s,
        "wall_time_s": time.perf_counter() - started,
        "peak_rss_gib": _peak_rss_gib(),
        "versions": versions(),
        "device": _device_name(device),
        "seed": config.seed,
    }

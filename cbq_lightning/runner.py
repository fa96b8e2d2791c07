"""The quantization job as its stages, in the order they run (read this file top to bottom):

1. :func:`_read_inputs`: validate the configuration, load (or take over) the model, read calibration and evaluation
   data, fit the recipe's extensions to the model (:func:`~cbq_lightning.adapt.adapt_to_model`), rotate; nothing is replaced before this.
2. :func:`_fp_reference`: the full-precision perplexities (resumed, cached, or measured).
3. :func:`_build_state`: the block quantizer, CFP and the cross-block state over the captured block inputs.
4. :func:`_calibrate`: the windows (:mod:`cbq_lightning.window_loop`), resumed after the last saved one.
5. :func:`_write_outputs`: quant state, fake-quant checkpoint, evaluation, ``report.json``
   (:mod:`cbq_lightning.report`), the export.

The Python API (:mod:`cbq_lightning.api`) and the command line both enter through :func:`run_quantize`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from callbacks.cross_block import CrossBlockCallback
from callbacks.hardened_objective import HardenedObjective
from callbacks.window_checkpoint import WindowCheckpoint
from cbq_lightning.adapt import adapt_to_model
from cbq_lightning.block_quantizer import BlockQuantizer
from cbq_lightning.cache import TensorStore
from cbq_lightning.cfp import CoarseToFinePreprocessor
from cbq_lightning.checkpoint import ResumePoint, WindowCheckpointer
from cbq_lightning.config import QuantizeConfig, validate
from cbq_lightning.crossblock import CrossBlockState
from cbq_lightning.data.calibration import calibration_ids
from cbq_lightning.distributed import Placement, all_gather_objects, compute_device
from cbq_lightning.end_to_end import run_end_to_end
from cbq_lightning.errors import ConfigError
from cbq_lightning.evaluation.fp_cache import load_reference, model_identity, reference_key, save_reference
from cbq_lightning.evaluation.perplexity import EvalSet, evaluate_sets, prepare_eval_set
from cbq_lightning.export.fake_quant import MODEL_DIR, save_fake_quant_checkpoint
from cbq_lightning.export.gguf_plan import GgufPlan, plan_for_model
from cbq_lightning.export.packed import export_run
from cbq_lightning.export.quant_state import QUANT_STATE_FILE, save_quant_state
from cbq_lightning.io import atomic_write_json, atomic_write_text
from cbq_lightning.lock import quantize_lock
from cbq_lightning.machine import resolve_machine_settings
from cbq_lightning.models.adapter import BlockKwargs, DecoderAdapter
from cbq_lightning.models.loading import load_model, load_tokenizer
from cbq_lightning.quant.convert import check_correction_rank, check_group_size
from cbq_lightning.quant.correction import CorrectionConfig
from cbq_lightning.quant.input_moments import InputMoments
from cbq_lightning.quant.mixed_precision import log_layer_bits, run_layer_bits
from cbq_lightning.quant.qlinear import LayerQuantConfig
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.report import correction_summary, eval_entries, run_report
from cbq_lightning.rotation.fold import rotate_model
from cbq_lightning.stop import GracefulStop
from cbq_lightning.supplied import SuppliedInputs
from cbq_lightning.window_loop import WindowLoop, quiet_lightning, round_to_nearest
from cbq_lightning.windows import WindowConfig, window_schedule

log = logging.getLogger("cbq_lightning")


@dataclass
class QuantizeResult:
    """What a run returns in-process: the report written to disk, and the quantized model itself."""

    report: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    #: False on the other DDP ranks: their report holds only their windows, rank 0 writes the outputs
    main: bool = True


def _evaluate(config: QuantizeConfig, model: nn.Module, sets: list[EvalSet], device: torch.device, label: str
              ) -> list[dict[str, Any]]:
    """Perplexity of ``model`` on every set, on ``device`` (the model goes back to the CPU after)."""
    model.to(device)
    try:
        return evaluate_sets(model, sets, device, config.advanced.eval.batch_size, label=label,
                             progress_bar=config.advanced.trainer.enable_progress_bar)
    finally:
        model.to("cpu")


def run_quantize(
    config: QuantizeConfig, callbacks: Sequence[L.Callback] = (), supplied: SuppliedInputs | None = None,
) -> QuantizeResult:
    """Run a whole quantization job and write its outputs to ``config.output_dir``.

    ``callbacks`` join every window's ``Trainer`` (monitoring, or tests that plant faults). ``supplied``: a model
    (and tokenizer, calibration ids) already in memory instead of the recipe's ``model`` (and ``data``) sections
    (:func:`cbq_lightning.quantize`). SIGTERM stops the run at the next safe point with :class:`RunStopped`
    (:mod:`cbq_lightning.stop`).
    """
    config = supplied.adjust(config) if supplied is not None else config
    with GracefulStop() as stop, quantize_lock(config):  # one run per output folder (cbq_lightning.lock)
        return _run_quantize(resolve_machine_settings(config), callbacks, stop, supplied)


def _run_quantize(
    config: QuantizeConfig, callbacks: Sequence[L.Callback], stop: GracefulStop, supplied: SuppliedInputs | None,
) -> QuantizeResult:
    """The job's stages: read and check every input, then (and only then) replace earlier outputs, measure the
    full-precision reference, build the walking state, calibrate window by window, write the outputs."""
    started = time.perf_counter()
    job = _read_inputs(config, supplied)
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
        log_layer_bits(logger, built.quantizer.layer_bits)
    with stop.deferred():  # fits stop at a step boundary; elsewhere a SIGTERM stops the run at once
        windows = _calibrate(job, built, fp_results, logger, device, callbacks, stop)
        built.end_to_end = _end_to_end(job, built, logger, device)  # before the caches go: it reads them
    built.store.cleanup()  # the disk caches (if any) are not needed past calibration
    calibrated_s = time.perf_counter() - started
    # every rank says which samples it calibrated on (a collective: all ranks take part)
    shards = all_gather_objects({"rank": job.place.rank, "samples": job.place.shard_indices(int(job.all_ids.shape[0])),
                                 "cached_rows": int(built.state.x_q.shape[0])})
    if not job.place.is_main:  # rank 0 holds the same model and writes every output
        return QuantizeResult(report={"rank": job.place.rank, "windows": windows}, model=job.model,
                              tokenizer=job.tokenizer, main=False)
    return _write_outputs(job, built, windows, fp_results, logger, device, shards, started, calibrated_s)


def _end_to_end(job: _Job, built: _Built, logger: TensorBoardLogger, device: torch.device) -> dict[str, Any] | None:
    """The end-to-end phase (a CBQ run: validate refuses it with rtn; it reads X at block 0 and the last Y_fp), after an
    evaluation of the windows' model with ``extensions.end_to_end.evaluate_before`` (rank 0); its record, None without it."""
    settings = job.config.extensions.end_to_end
    if settings is None:
        return None
    measure = settings.evaluate_before and job.eval_sets and job.place.is_main
    before = _evaluate(job.config, job.model, job.eval_sets, device, "before end-to-end") if measure else None
    record = run_end_to_end(job.config, built.state, job.adapter.output_head(), logger)
    if before is not None:
        record["eval_before"] = [{"dataset": entry["dataset"], "ppl": entry["ppl"]} for entry in before]
    return record


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
    #: what the recipe asked for that this model cannot take, and what ran instead (:func:`~cbq_lightning.adapt.adapt_to_model`)
    adapted: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: a llama.cpp mix's GGML type per weight (:mod:`cbq_lightning.export.gguf_plan`; None: not a mix)
    gguf_plan: GgufPlan | None = None
    #: what the caller handed over in memory (the Python API) instead of the recipe's model (and data); None: the CLI
    supplied: SuppliedInputs | None = None

    @property
    def cbq(self) -> bool:
        return self.config.method == "cbq"

    @property
    def in_memory(self) -> bool:
        """The model was handed over in memory rather than loaded from ``model.name_or_path``."""
        return self.supplied is not None

    @property
    def supplied_ids(self) -> bool:
        """The calibration ids were handed over too (the ``data`` section was not read)."""
        return self.supplied is not None and self.supplied.calibration_ids is not None


def _read_inputs(config: QuantizeConfig, supplied: SuppliedInputs | None = None) -> _Job:
    """Validate the configuration, load the model (or take the supplied one) and read the calibration and
    evaluation data; every check a configuration can fail against the model runs here, before any data is read
    or any evaluation runs."""
    scheme = validate(config, supplied_model_type=supplied.model_type if supplied is not None else None)
    if supplied is not None and supplied.tokenizer is None and config.eval.datasets:
        raise ConfigError(
            f"eval.datasets={list(config.eval.datasets)} needs the model's tokenizer to read the text: pass the "
            "tokenizer, or set eval.datasets to [] (evaluate later with `cbq evaluate`)."
        )
    cbq = config.method == "cbq"
    # DDP shards the CBQ windows' training; RTN trains nothing and runs in one process
    place = config.placement() if cbq else Placement()
    quiet_lightning()
    L.seed_everything(config.seed, workers=True, verbose=False)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # a supplied model and calibration ids are part of what a resume must find unchanged
    fingerprint = dataclasses.asdict(config) | ({"supplied": supplied.fingerprint()} if supplied is not None else {})
    checkpointer = WindowCheckpointer(output_dir, fingerprint, rank=place.rank, world=place.world)
    resume: ResumePoint | None = None
    if cbq and config.resume:
        resume = checkpointer.load()  # refuses a checkpoint of a different configuration, naming the keys
    if supplied is not None:
        tokenizer, model = supplied.tokenizer, supplied.prepared_model()
    else:
        tokenizer = load_tokenizer(config.model, hub=config.advanced.model)
        model = load_model(config.model, vocab_size=len(tokenizer), seed=config.seed, hub=config.advanced.model)
    adapter = DecoderAdapter(model)
    rounding = config.rounding if cbq else RoundingConfig(enabled=False)
    correction = config.extensions.correction if cbq else None
    # the configuration against the model's shapes, before any data is read or any evaluation runs
    check_group_size(adapter.blocks, scheme)
    check_correction_rank(adapter.blocks, correction)
    gguf_plan = plan_for_model(scheme.gguf_mix, model, adapter)
    rotation_config, adapted = adapt_to_model(config.extensions.rotation, rounding, adapter)
    if supplied is not None and supplied.calibration_ids is not None:
        all_ids = supplied.calibration_ids.to(torch.int64).cpu()
    else:
        all_ids = calibration_ids(config.data, tokenizer, config.seed, config.data_dir, config.advanced.data.text_field)
    evaluation = config.eval
    eval_sets = [prepare_eval_set(source, tokenizer, evaluation.seqlen, config.advanced.eval.split,
                                  evaluation.max_windows, config.data_dir) for source in evaluation.datasets]
    # everything is read and checked: rotate before anything measures the model (the full-precision
    # reference then measures the rotated model, which computes the same function)
    rotation = rotate_model(adapter, rotation_config, config.seed) if rotation_config is not None else None
    return _Job(
        config=config, scheme=scheme, place=place, output_dir=output_dir, checkpointer=checkpointer, resume=resume,
        tokenizer=tokenizer, model=model, adapter=adapter, rounding=rounding, correction=correction,
        all_ids=all_ids, ids=place.shard(all_ids),  # DDP: this rank's samples (all of them in a single process)
        eval_sets=eval_sets, rotation=rotation, adapted=adapted, gguf_plan=gguf_plan, supplied=supplied,
    )


def _fp_reference(job: _Job, device: torch.device) -> list[dict[str, Any]] | None:
    """The full-precision perplexities (rank 0 only): those a resumed run measured before its interruption, those
    an earlier run of the same model on the same tokens measured (:mod:`cbq_lightning.evaluation.fp_cache`), or
    measured now and kept for the next run."""
    if job.resume is not None and job.resume.meta.get("fp_results") is not None:
        return job.resume.meta["fp_results"]
    if not (job.eval_sets and job.config.eval.fp_reference and job.place.is_main):
        return None
    identity = None if job.in_memory else model_identity(job.config.model, job.model, job.config.seed, job.config.advanced.model.revision)
    key = None if identity is None else reference_key(
        identity, dtype=next(job.model.parameters()).dtype, rotation=job.rotation, sets=job.eval_sets,
        batch_size=job.config.advanced.eval.batch_size, device=device)
    cached = load_reference(key) if key is not None else None
    if cached is not None:
        return [{**result, "eval_s": 0.0, "cached": True} for result in cached]
    results = _evaluate(job.config, job.model, job.eval_sets, device, "fp")
    if key is not None:
        save_reference(key, results)
    return results


@dataclass
class _Built:
    """The state that walks down the model with the windows, and the pieces that act on it."""

    state: CrossBlockState
    quantizer: BlockQuantizer
    cfp: CoarseToFinePreprocessor
    store: TensorStore
    mixed_summary: dict[str, Any] | None
    #: the end-to-end phase's record (None: no phase)
    end_to_end: dict[str, Any] | None = None


def _build_state(job: _Job, inputs: torch.Tensor, block_kwargs: BlockKwargs, device: torch.device) -> _Built:
    """The block quantizer, CFP, the input statistics and the cross-block state over the captured inputs."""
    config, cbq, scheme = job.config, job.cbq, job.scheme
    learnable_clip = config.quant.learnable_clip and cbq
    clip_search = config.extensions.clip_search if learnable_clip else None
    gptq = config.extensions.gptq
    act = config.act_settings(trained=cbq)
    # before CFP and any quantization: the sensitivity pass runs the full-precision model
    layer_bits, mixed_summary = run_layer_bits(config, job.adapter, inputs, block_kwargs, scheme, clip_search, device)
    # per-layer schemes: mixed precision's bits, else a llama.cpp mix's GGML types
    layer_schemes = {name: replace(scheme, w_bits=bits) for name, bits in layer_bits.items()}
    if not layer_schemes and job.gguf_plan is not None:
        layer_schemes = job.gguf_plan.block_schemes(job.adapter, scheme)
    layer = LayerQuantConfig(
        scheme=scheme, rounding=job.rounding, learnable_clip=learnable_clip,
        clip_init=config.advanced.quant.clip_init if learnable_clip else 1.0, clip_search=clip_search, act=act, gptq=gptq,
        correction=job.correction, column_scale=config.extensions.column_scale, rounding_tuning=config.advanced.rounding,
        rounding_forward=config.extensions.rounding_forward,
    )
    sequential = gptq is not None and gptq.true_sequential
    needs_moments = layer.needs_input_moments or gptq is not None
    moments = InputMoments(full=gptq is not None, sequential=sequential) if needs_moments else None
    quantizer = BlockQuantizer(
        layer=layer, generator=torch.Generator().manual_seed(config.seed), moments=moments,
        untrained_act=config.act_settings(trained=False), layer_schemes=layer_schemes,
    )
    cfp = CoarseToFinePreprocessor(
        config.cfp, scale_activations=config.cfp.activations and act is not None,
        batch_size=config.advanced.train.forward_batch_size, rtn=quantizer.round_to_nearest, pairs=job.adapter.scaling_pairs,
        tuning=config.advanced.cfp, mlp=config.extensions.cfp_mlp,
    )
    # CFP first: the clip search's moments must describe the inputs the quantized linears will see
    preprocessors = [p for p in (cfp if cfp.active else None, moments) if p is not None]
    cache = config.advanced.cache
    cache_dir = Path(cache.directory) if cache.directory else job.output_dir / "cache"
    cache_dir = cache_dir / f"rank_{job.place.rank}" if job.place.world > 1 else cache_dir
    store = TensorStore(cache_dir if cache.location == "disk" else None)
    state = CrossBlockState(
        blocks=job.adapter.blocks, inputs=inputs, block_kwargs=block_kwargs, quantize=quantizer.quantize,
        rtn_reference=quantizer.rtn_reference if cbq and config.advanced.monitor.rtn_reference else None,
        batch_size=config.advanced.train.forward_batch_size,
        preprocessors=preprocessors,
        store=store,
        target_dtype=cache.targets_dtype(),
    )
    return _Built(state=state, quantizer=quantizer, cfp=cfp, store=store, mixed_summary=mixed_summary)


def _calibrate(
    job: _Job, built: _Built, fp_results: list[dict[str, Any]] | None, logger: TensorBoardLogger,
    device: torch.device, callbacks: Sequence[L.Callback], stop: GracefulStop,
) -> list[dict[str, Any]]:
    """CBQ's windows (resuming after the last saved one), or the RTN baseline's walk; the windows' records."""
    config, state = job.config, built.state
    objective = HardenedObjective(keep_best=config.extensions.keep_best)
    records = CrossBlockCallback(state, device, objective)
    if not job.cbq:
        return round_to_nearest(state, window_schedule(job.adapter.num_blocks, WindowConfig(size=1, overlap=0)),
                                 records, logger)
    schedule = window_schedule(job.adapter.num_blocks, config.window)
    total_windows, step_offset = len(schedule), 0
    checkpoint = WindowCheckpoint(job.checkpointer, state, records, built.cfp, built.quantizer.generator, fp_results)
    records.add_listener(checkpoint.save)  # every finished window is saved, trained or fallen back
    if job.resume is not None:
        step_offset = checkpoint.restore(job.resume, schedule, built.quantizer.structure)
        schedule = [w for w in schedule if w.index > job.resume.last_window]
        log.info("resuming after window %d of %d from %s", job.resume.last_window + 1, total_windows,
                 job.checkpointer.directory)
    loop = WindowLoop(
        config=config, scheme=job.scheme, state=state, logger=logger, records=records, objective=objective,
        extra_callbacks=callbacks, stop=stop, total_windows=total_windows,
        output_head=job.adapter.output_head() if config.extensions.output_kl_weight > 0 else None,
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
    correction_info = correction_summary(model, job.correction)
    quantization = {
        "method": config.method, "scheme": scheme_info, "quant_state": f"../{QUANT_STATE_FILE}",
        **({"correction": correction_info} if correction_info else {}),
        # the folded rotations, and the online one `cbq evaluate` puts back (absent: no rotation)
        **({"rotation": job.rotation} if job.rotation else {}),
    }
    save_quant_state(model, job.output_dir / QUANT_STATE_FILE, scheme_info)
    save_fake_quant_checkpoint(model, job.tokenizer, job.output_dir / MODEL_DIR, quantization)
    entries = eval_entries(_evaluate(config, model, job.eval_sets, device, config.method), fp_results)
    for entry in entries:
        name = Path(entry["dataset"]).stem  # a dataset name, or a file's name without its folders
        metrics = {f"eval/ppl/{name}": entry["ppl"]}
        if entry["ppl_fp"] is not None:
            metrics[f"eval/ppl_fp/{name}"] = entry["ppl_fp"]
        logger.log_metrics(metrics, step=0)
    logger.finalize("success")
    report = run_report(job, built, windows, scheme_info, correction_info, entries, shards, device, started,
                     calibrated_s)
    atomic_write_json(job.output_dir / "report.json", report)
    if config.export.format is not None:
        # from the files just written, exactly as `cbq export --run output_dir` would
        report["export"] = export_run(job.output_dir, config.export)
        atomic_write_json(job.output_dir / "report.json", report)
    job.checkpointer.finish(keep=config.keep_checkpoints)  # last: a run stopped before this point resumes from them
    return QuantizeResult(report=report, model=model, tokenizer=job.tokenizer)



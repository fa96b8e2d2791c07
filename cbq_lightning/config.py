"""The complete configuration of a ``cbq quantize`` run, and its boundary validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from cbq_lightning.advanced import AdvancedConfig
from cbq_lightning.cfp import CFPConfig
from cbq_lightning.data.calibration import CalibrationConfig
from cbq_lightning.distributed import Placement, check_divisible, placement
from cbq_lightning.errors import ConfigError
from cbq_lightning.evaluation.perplexity import EvalConfig
from cbq_lightning.export.packed import ExportConfig, check_holds_run
from cbq_lightning.export.quantized_run import ExportScheme
from cbq_lightning.extensions import ExtensionsConfig
from cbq_lightning.loss import LossConfig
from cbq_lightning.models.loading import ModelConfig, resolve_source, source_model_type
from cbq_lightning.quant.act_quantizer import ActQuantSettings
from cbq_lightning.quant.config import QuantConfig
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.quant.weight_quantizer import clip_logit
from cbq_lightning.section_types import changed_fields
from cbq_lightning.train_config import OptimConfig, TrainerConfig
from cbq_lightning.windows import WindowConfig


@dataclass
class QuantizeConfig:
    """Everything ``cbq quantize`` reads (each field is a YAML key and a ``--dotted.flag``).

    Attributes:
        output_dir: where config.yaml, report.json, model/, quant_state.safetensors and tensorboard/ go.
        method: ``cbq`` (cross-block training) or ``rtn`` (round-to-nearest baseline, same pipeline).
        seed: seeds calibration sampling, rounding initialisation and data order.
        data_dir: local mirror of the named datasets (``wikitext2`` ...), laid out as
            ``wikitext/wikitext-2-raw-v1/<split>.jsonl``; a split found there is read from it, anything else
            from the hub. Null: ``$CBQ_DATA_DIR`` when set, else the hub.
        resume: continue from ``output_dir/checkpoints/`` when an interrupted CBQ run left one there
            (refused, naming the keys, if the configuration changed); false starts over.
        keep_checkpoints: keep ``output_dir/checkpoints/`` once the outputs are written. Why: the windows are the
            expensive part of a run; with their checkpoints kept, a rerun that changes only what comes after them
            (``extensions.end_to_end``, evaluation, export) resumes after the last window and trains none again.
        extensions: the levers this project adds to the paper (:class:`~cbq_lightning.extensions.ExtensionsConfig`),
            each off by default; the other sections are the paper's method and what every run needs.
        advanced: what a recipe rarely sets (:class:`~cbq_lightning.advanced.AdvancedConfig`): the Trainer's finer
            switches, extra measurements, the divergence guard, the caches' place.

    Each section checks its own values when it is built; :func:`validate` checks what involves several sections.
    """

    output_dir: str = "runs/cbq"
    method: Literal["cbq", "rtn"] = "cbq"
    seed: int = 0
    data_dir: str | None = None
    resume: bool = True
    keep_checkpoints: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    cfp: CFPConfig = field(default_factory=CFPConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    extensions: ExtensionsConfig = field(default_factory=ExtensionsConfig)
    advanced: AdvancedConfig = field(default_factory=AdvancedConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed={self.seed} must lie in [0, 2**32) (the range numpy and torch accept).")

    def placement(self) -> Placement:
        """This process's rank and the world size of the run, from the trainer settings and the launcher's
        environment (one reading for the checks, the lock and the runner)."""
        return placement(self.trainer.strategy, self.trainer.devices, self.advanced.trainer.num_nodes)

    def act_settings(self, trained: bool) -> ActQuantSettings | None:
        """The run's activation quantizers (None for a weight-only scheme): the mode is the scheme's choice
        (``quant``), where the clipping starts and whether it trains are ``advanced.quant``'s."""
        return self.quant.act_settings(trained, self.advanced.quant)


def validate(config: QuantizeConfig, supplied_model_type: str | None = None) -> QuantScheme:
    """Check everything that can be checked before loading weights; return the resolved scheme.

    ``supplied_model_type``: the model is already in memory (the Python API), of this ``model_type``; its source
    is then not looked up. Each group of rules is a function below; a rule that another part of the package
    enforces as well (an export's limits, the GPTQ start's rounding form) is called from its owner.
    """
    if config.method not in ("cbq", "rtn"):
        raise ConfigError(f"method={config.method!r} is unknown: use 'cbq' or 'rtn'.")
    scheme = config.quant.resolve()
    config.act_settings(trained=True)  # a starting activation clipping ratio out of range is named now
    _check_machine_and_source(config, supplied_model_type)
    _check_quantizer_options(config, scheme)
    _check_outputs(config, scheme, supplied_model_type)
    if config.method == "cbq":
        _check_trainable(config, scheme)
    if config.extensions.end_to_end is not None:
        _check_end_to_end(config, scheme)
    return scheme


def _check_machine_and_source(config: QuantizeConfig, supplied_model_type: str | None) -> None:
    """The device exists, the model source and dtype are readable, the samples split over the processes."""
    if config.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={config.trainer.accelerator!r} but no CUDA device is visible: use "
            "trainer.accelerator=cpu, or auto (a GPU when there is one)."
        )
    if supplied_model_type is None:
        resolve_source(config.model)
        config.model.torch_dtype()
    if config.method == "cbq":
        world = config.placement().world
        check_divisible(config.data.num_samples, world)


def _check_quantizer_options(config: QuantizeConfig, scheme: QuantScheme) -> None:
    """Options that would change nothing, or contradict each other, in how the weights are rounded."""
    extensions = config.extensions
    continuous = extensions.continuous
    cbq = config.method == "cbq"
    if continuous is not None and not continuous.active:
        raise ConfigError(
            "extensions.continuous with estimator=ste and clamp=hard changes nothing: set "
            "extensions.continuous.estimator sigmoid and/or extensions.continuous.clamp smooth, or "
            "extensions.continuous null."
        )
    if extensions.clip_search is not None and not config.quant.learnable_clip and cbq:
        raise ConfigError(
            "extensions.clip_search sets the starting ratio of learnable clipping thresholds, but "
            "quant.learnable_clip is false: it would do nothing. Set extensions.clip_search null, or "
            "quant.learnable_clip true."
        )
    if extensions.column_scale and config.rounding.form != "residual":
        raise ConfigError(
            f"extensions.column_scale={extensions.column_scale} needs rounding.form=residual: it scales the "
            "low-rank term on top of V0, which the other forms do not have."
        )
    if continuous is not None and continuous.estimator == "sigmoid" and cbq:
        soft_rounding = config.rounding.enabled and config.rounding.form != "offset"
        if soft_rounding and not scheme.quantizes_activations:
            raise ConfigError(
                "extensions.continuous.estimator=sigmoid smooths the rounding that is not learned, but this run's "
                f"weights are rounded by soft LoRA-Rounding (rounding.form={config.rounding.form!r}) and it "
                "quantizes no activations: it would change nothing. Use rounding.form=offset or "
                "rounding.enabled=false, an activation scheme, or extensions.continuous.estimator=ste."
            )
    if extensions.gptq is not None and cbq:
        config.rounding.check_gptq_start()
    _check_rounding_start(config)


def _check_rounding_start(config: QuantizeConfig) -> None:
    """How the LoRA factors start, against the rounding form that has to hold them."""
    extensions, form = config.extensions, config.rounding.form
    if extensions.rounding_init == "gradient" and form == "lowrank":
        raise ConfigError(
            "extensions.rounding_init=gradient needs rounding.form=residual: it re-chooses A2 while A1 is zero, and "
            "the pure low-rank form starts both factors random (changing A2 would change the starting decisions)."
        )
    starts = changed_fields(extensions, ("rounding_init", "rounding_init_batches"))
    tuned = [f"extensions.{name}={value}" for name, value, _ in starts] + config.advanced.rounding.changed()
    if config.rounding.enabled and form == "offset" and tuned:
        raise ConfigError(
            f"rounding.form=offset has no LoRA factors and no regulariser, so {', '.join(tuned)} would do nothing: "
            "leave them at their defaults, or use rounding.form=residual."
        )


def _check_outputs(config: QuantizeConfig, scheme: QuantScheme, supplied_model_type: str | None) -> None:
    """Per-layer bits, rotations and the export format against each other, before any calibration."""
    extensions = config.extensions
    if extensions.mixed is not None and extensions.layer_bits:
        raise ConfigError(
            "extensions.mixed.budget computes extensions.layer_bits from a sensitivity pass; both are set. Keep "
            "one: the budget, or your own per-layer bits."
        )
    if (extensions.mixed is not None or extensions.layer_bits) and scheme.ggml is not None:
        block = scheme.ggml
        raise ConfigError(
            f"extensions.{'mixed' if extensions.mixed is not None else 'layer_bits'} with {block.name}: a GGML "
            f"type fixes every layer's bits ({block.bits}); use a W<bits>A16 scheme for per-layer bits, or drop it."
        )
    rotation = extensions.rotation
    online_down = rotation is not None and rotation.online_down
    if online_down and extensions.cfp_mlp:
        raise ConfigError(
            "extensions.cfp_mlp with extensions.rotation.online_down: CFP would scale the down projection's input channels, "
            "but that input is rotated before the down projection sees it, so the scale no longer folds into its "
            "columns. Set extensions.cfp_mlp false (the rotation spreads those outliers already) or "
            "extensions.rotation.online_down false."
        )
    if config.export.format is None:
        return
    check_holds_run(
        config.export.format, "this run", correction=extensions.correction is not None and config.method == "cbq",
        online_rotation=online_down, mixed_bits=extensions.mixed is not None or bool(extensions.layer_bits),
    )
    # a packed format that cannot hold the scheme (or, GGUF, the model family) is refused now, not after the calibration
    config.export.check(ExportScheme.from_settings(scheme, config.act_settings(trained=True)))
    if config.export.depends_on_model_type:
        config.export.check_model_type(supplied_model_type or source_model_type(config.model, hub=config.advanced.model))


def _check_trainable(config: QuantizeConfig, scheme: QuantScheme) -> None:
    """A CBQ run has something to train, a valid clipping start and at least one epoch."""
    if config.quant.learnable_clip:
        clip_logit(config.advanced.quant.clip_init, key="advanced.quant.clip_init")
    learnable_act = scheme.quantizes_activations and config.advanced.quant.act_learnable
    if not (config.rounding.enabled or config.quant.learnable_clip or learnable_act):
        raise ConfigError(
            "method=cbq with rounding.enabled=false and quant.learnable_clip=false leaves nothing to "
            "train: enable one of them, or use method=rtn."
        )
    if config.train.epochs_for(scheme.w_bits) < 1:
        raise ConfigError("method=cbq needs train.epochs >= 1 (train.epochs_2bit for 2-bit weights).")


def _check_end_to_end(config: QuantizeConfig, scheme: QuantScheme) -> None:
    """The end-to-end phase trains a CBQ run's scales, which a GGML grid does not let move alone."""
    if config.method != "cbq":
        raise ConfigError(
            "extensions.end_to_end trains the scales of a CBQ run after its windows; method=rtn is the untrained "
            "baseline. Use method=cbq, or drop the phase (--extensions.end_to_end null)."
        )
    if scheme.gguf_type is not None or config.export.format == "gguf":
        raise ConfigError(
            "extensions.end_to_end with a GGML grid (a Q* scheme or export.format gguf): its scales are stored as "
            "float16 multiples of a super-block's, so trained scales would not survive the export bit for bit. "
            "Drop extensions.end_to_end, or use a W<bits>A<bits> scheme with another export."
        )

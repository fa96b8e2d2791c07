"""The complete configuration of a ``cbq quantize`` run, and its boundary validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from cbq_lightning.cache import CacheConfig
from cbq_lightning.cfp import CFPConfig
from cbq_lightning.data.calibration import CalibrationConfig
from cbq_lightning.distributed import check_divisible, placement
from cbq_lightning.errors import ConfigError
from cbq_lightning.evaluation.perplexity import EvalConfig
from cbq_lightning.export.packed import ExportConfig
from cbq_lightning.export.quantized_run import ExportScheme
from cbq_lightning.guard import GuardConfig
from cbq_lightning.loss import LossConfig
from cbq_lightning.models.loading import ModelConfig, resolve_source, source_model_type
from cbq_lightning.quant.config import QuantConfig
from cbq_lightning.quant.correction import CorrectionConfig
from cbq_lightning.quant.mixed_precision import MixedPrecisionConfig
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.quant.weight_quantizer import clip_logit
from cbq_lightning.rotation.fold import RotationConfig
from cbq_lightning.train_config import OptimConfig, TrainerConfig
from cbq_lightning.windows import WindowConfig


@dataclass
class MonitorConfig:
    """Observability extras.

    Attributes:
        rtn_reference: also push the calibration inputs through a round-to-nearest copy of each block,
            so the per-block error of RTN is logged next to CBQ's (costs one extra forward per block).
        hardened_loss: measure each window's loss with hardened rounding before and after its fit
            (``window/loss_first``/``loss_last``; two extra passes over the calibration set per window).
    """

    rtn_reference: bool = True
    hardened_loss: bool = True


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
        correction: an extension: a trainable low-rank correction on every quantized linear
            (:class:`CorrectionConfig`); null: none.
        mixed: an extension: per-layer bit-widths chosen by sensitivity under an average-bits budget
            (:class:`MixedPrecisionConfig`); null: every layer at the scheme's bits.
        rotation: an extension: orthogonal rotations folded into the model before anything else
            (:class:`~cbq_lightning.rotation.fold.RotationConfig`); null: none.

    Extensions are optional sections: null (the default) is off, a section (``{}`` or any of its keys, e.g.
    ``--quant.gptq.damp 0.02``) is on. Each section checks its own values when it is built; :func:`validate`
    checks what involves several sections.
    """

    output_dir: str = "runs/cbq"
    method: Literal["cbq", "rtn"] = "cbq"
    seed: int = 0
    data_dir: str | None = None
    resume: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    correction: CorrectionConfig | None = None
    mixed: MixedPrecisionConfig | None = None
    rotation: RotationConfig | None = None
    cfp: CFPConfig = field(default_factory=CFPConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed={self.seed} must lie in [0, 2**32) (the range numpy and torch accept).")


def validate(config: QuantizeConfig) -> QuantScheme:
    """Check everything that can be checked before loading weights; return the resolved scheme."""
    if config.method not in ("cbq", "rtn"):
        raise ConfigError(f"method={config.method!r} is unknown: use 'cbq' or 'rtn'.")
    scheme = config.quant.resolve()
    if config.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={config.trainer.accelerator!r} but no CUDA device is visible: use "
            "trainer.accelerator=cpu, or auto (a GPU when there is one)."
        )
    resolve_source(config.model)
    config.model.torch_dtype()
    if config.method == "cbq":
        world = placement(config.trainer.strategy, config.trainer.devices, config.trainer.num_nodes).world
        check_divisible(config.data.num_samples, world)
    continuous = config.quant.continuous
    if continuous is not None and not continuous.active:
        raise ConfigError(
            "quant.continuous with estimator=ste and clamp=hard changes nothing: set quant.continuous.estimator "
            "sigmoid and/or quant.continuous.clamp smooth, or quant.continuous null."
        )
    if config.quant.clip_search is not None and not config.quant.learnable_clip and config.method == "cbq":
        raise ConfigError(
            "quant.clip_search sets the starting ratio of learnable clipping thresholds, but "
            "quant.learnable_clip is false: it would do nothing. Set quant.clip_search null, or learnable_clip true."
        )
    if continuous is not None and continuous.estimator == "sigmoid" and config.method == "cbq":
        soft_rounding = config.rounding.enabled and config.rounding.form != "offset"
        if soft_rounding and not scheme.quantizes_activations:
            raise ConfigError(
                "quant.continuous.estimator=sigmoid smooths the rounding that is not learned, but this run's weights are "
                f"rounded by soft LoRA-Rounding (rounding.form={config.rounding.form!r}) and it quantizes no "
                "activations: it would change nothing. Use rounding.form=offset or rounding.enabled=false, "
                "an activation scheme, or quant.continuous.estimator=ste."
            )
    if config.quant.gptq is not None and config.method == "cbq" and config.rounding.enabled:
        if config.rounding.form == "lowrank":
            raise ConfigError(
                "quant.gptq with rounding.form='lowrank': the pure low-rank form has no frozen V0 to hold "
                "GPTQ's decisions; use rounding.form=residual (LoRA-Rounding on top of GPTQ), offset, or "
                "rounding.enabled=false."
            )
    mixed = config.mixed is not None or bool(config.quant.layer_bits)
    if config.mixed is not None and config.quant.layer_bits:
        raise ConfigError(
            "mixed.budget computes quant.layer_bits from a sensitivity pass; both are set. Keep one: the budget, "
            "or your own per-layer bits."
        )
    if mixed and config.export.format is not None:
        raise ConfigError(
            f"export.format={config.export.format!r} describes one weight scheme for all layers; this run mixes "
            "bit-widths (mixed.budget / quant.layer_bits). Keep export.format null: the fake-quant checkpoint and "
            "quant_state.safetensors (per-layer bits) hold the result."
        )
    if config.correction is not None and config.method == "cbq" and config.export.format is not None:
        raise ConfigError(
            f"export.format={config.export.format!r} cannot hold the low-rank correction (correction.rank / "
            "rank_fraction): its stock kernels compute Q(W) Q(x) only. Keep export.format null (the fake-quant "
            "checkpoint and quant_state.safetensors hold the correction; `cbq evaluate` on the run applies it) "
            "or switch the correction off."
        )
    if config.rotation is not None and config.rotation.online_down and config.export.format is not None:
        raise ConfigError(
            f"export.format={config.export.format!r} with rotation.online_down: stock loaders of packed formats do "
            "not run the online rotation before down_proj. Set rotation.online_down false for a stock-loadable "
            "export (the folded rotations are plain weights), or keep export.format null (the fake-quant "
            "checkpoint records it and `cbq evaluate` on the run applies it)."
        )
    if config.rotation is not None and config.rotation.online_down and config.cfp.mlp:
        raise ConfigError(
            "cfp.mlp with rotation.online_down: CFP would scale the down projection's input channels, but that "
            "input is rotated before the down projection sees it, so the scale no longer folds into its columns. "
            "Set cfp.mlp false (the rotation spreads those outliers already) or rotation.online_down false."
        )
    if config.mixed is not None and scheme.gguf_type is not None:
        raise ConfigError(
            f"mixed.budget with quant.scheme {scheme.gguf_type}: a GGML type fixes every layer's bits; use a "
            "W<bits>A16 scheme for a mixed-precision run, or drop mixed."
        )
    # a packed format that cannot hold the scheme (or, GGUF, the model family) is refused now, not after the calibration
    config.export.check(ExportScheme.from_settings(scheme, config.quant.act_settings(trained=True)))
    if config.export.depends_on_model_type:
        config.export.check_model_type(source_model_type(config.model))
    if config.method == "cbq":
        if config.quant.learnable_clip:
            clip_logit(config.quant.clip_init)  # raises a ConfigError naming clip_init when out of (0, 1)
        learnable_act = scheme.quantizes_activations and config.quant.act_learnable
        if not (config.rounding.enabled or config.quant.learnable_clip or learnable_act):
            raise ConfigError(
                "method=cbq with rounding.enabled=false and quant.learnable_clip=false leaves nothing to "
                "train: enable one of them, or use method=rtn."
            )
        if config.train.epochs_for(scheme.w_bits) < 1:
            raise ConfigError("method=cbq needs train.epochs >= 1 (train.epochs_2bit for 2-bit weights).")
    return scheme

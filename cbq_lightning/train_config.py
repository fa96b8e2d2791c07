"""Optimisation settings of a window fit, and the Lightning ``Trainer`` settings users may change."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

from cbq_lightning.errors import ConfigError


@dataclass
class OptimConfig:
    """How each window is trained.

    Attributes:
        epochs: passes over the calibration samples per window.
        epochs_2bit: epochs per window when weights have 2 bits (the paper doubles them).
        batch_size: calibration sequences per optimisation step.
        lr_rounding: learning rate of the LoRA-Rounding factors.
        lr_clip: learning rate of the clipping logits.

    How the samples are batched (:class:`TrainTuning`) is ``advanced.train``; the learning-rate schedule and the
    correction's rate are extensions (``extensions.lr_schedule``, ``extensions.lr_correction``).
    """

    epochs: int = 20
    epochs_2bit: int = 40
    batch_size: int = 4
    lr_rounding: float = 1e-3
    lr_clip: float = 5e-3

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.epochs_2bit < 0:
            raise ConfigError("train.epochs and train.epochs_2bit must be >= 0.")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size={self.batch_size} must be >= 1.")
        if not all(math.isfinite(rate) and rate > 0 for rate in (self.lr_rounding, self.lr_clip)):
            raise ConfigError("train.lr_rounding and train.lr_clip must be finite and > 0.")

    def epochs_for(self, w_bits: int) -> int:
        return self.epochs_2bit if w_bits <= 2 else self.epochs


@dataclass
class TrainTuning:
    """How the calibration samples are batched (``advanced.train``): memory and order, not what is learned.

    Attributes:
        forward_batch_size: sequences per forward when caching targets and advancing caches (no gradients: a
            memory knob; the results do not depend on it beyond float summation order).
        shuffle: reshuffle the calibration samples every epoch (seeded per window); off gives contiguous
            batches (with DDP, the union of the ranks' batches is then a single process's batch).
    """

    forward_batch_size: int = 8
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.forward_batch_size < 1:
            raise ConfigError(f"advanced.train.forward_batch_size={self.forward_batch_size} must be >= 1.")


@dataclass
class TrainerConfig:
    """Arguments passed to every window's ``lightning.Trainer``.

    Attributes:
        accelerator: ``auto``, ``cpu``, ``gpu``/``cuda``...
        devices: devices per node (an int, a list, or ``auto``).
        strategy: ``auto`` or ``ddp`` ... (nodes of a multi-node run: ``advanced.trainer.num_nodes``)
        precision: ``auto`` (the machine decides: ``bf16-mixed`` on a GPU with bfloat16 - bf16 autocast, fp32
            trainable parameters -, ``16-mixed`` on an older GPU, ``32-true`` on CPU; see
            :func:`~cbq_lightning.machine.resolve_machine_settings`), or any Lightning precision.

    The finer switches are :class:`TrainerExtras` (``advanced.trainer``).
    """

    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        # Lightning would refuse these only at the first window's fit, after loading and calibrating
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR

        allowed = ("auto", *get_args(_PRECISION_INPUT_STR), "64", "32", "16", "bf16")  # the last four: older spellings
        if str(self.precision) not in allowed:
            raise ConfigError(f"trainer.precision={self.precision!r} is not a Lightning precision: use one of "
                              f"{', '.join(allowed)} (auto: 32-true on CPU, bf16-mixed on recent GPUs).")


@dataclass
class TrainerExtras:
    """The ``Trainer``'s finer switches (``advanced.trainer``), passed to every fit with :class:`TrainerConfig`.

    Attributes:
        enable_progress_bar: show progress bars.
        gradient_clip_val: clip gradient norm (None: off).
        log_every_n_steps: how often training signals reach TensorBoard.
        deterministic: ask torch for deterministic kernels.
        num_nodes: machines of a multi-node DDP run (``trainer.devices`` GPUs each).
    """

    enable_progress_bar: bool = True
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 1
    deterministic: bool = False
    num_nodes: int = 1

    def __post_init__(self) -> None:
        if self.gradient_clip_val is not None and not (math.isfinite(self.gradient_clip_val)
                                                       and self.gradient_clip_val > 0):
            raise ConfigError(f"advanced.trainer.gradient_clip_val={self.gradient_clip_val} must be a finite number "
                              "> 0 (or null: no clipping).")
        if self.log_every_n_steps < 1:
            raise ConfigError(f"advanced.trainer.log_every_n_steps={self.log_every_n_steps} must be >= 1.")
        if self.num_nodes < 1:
            raise ConfigError(f"advanced.trainer.num_nodes={self.num_nodes} must be >= 1.")


@dataclass
class EndToEndConfig:
    """An extension: the end-to-end phase after the windows (:mod:`cbq_lightning.end_to_end`); null: none.

    Attributes:
        epochs: passes over the calibration samples; each costs about one forward and backward of the whole
            model per sample, plus the two measuring passes (forward only) of the whole phase.
        lr: Adam learning rate of the log-gains (0.001: a scale moves about 0.1 % per step).
        batch_size: sequences per step; null: ``train.batch_size``.
        tokens: positions per sequence the output head is applied to (training and measurement).
        activation_clip: also train the activation quantizers' clipping (activation schemes only). Off by default:
            at W4A4 on SmolLM2 training it with the scales raised the output KL (so the phase was dropped), while
            the scales alone lowered the held-back perplexity 7-9 % (docs/recipe-history.md, end-to-end phase).
        norms: also train the blocks' normalisation layers (their scales, and shifts where they have them), at
            ``lr``: full-precision vectors that rescale what every quantized linear reads, so they can move the
            activations to where the frozen codes serve them best (as norm tweaking, arXiv 2309.02784, does after
            GPTQ). Off by default; where a recipe turns it on, docs/recipe-history.md has the measurement.
        checkpoint_blocks: recompute each block's activations in the backward instead of keeping them (less
            memory, one more forward); null: on for CUDA devices, off on the CPU.
        evaluate_before: also evaluate the model before the phase (one more pass over ``eval``'s sets), reported as
            ``report.json``'s ``end_to_end.eval_before``: what the phase changed, from one run instead of two. It
            changes nothing the run computes (the evaluation draws no random numbers).
    """

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int | None = None
    tokens: int = 128
    activation_clip: bool = False
    norms: bool = False
    checkpoint_blocks: bool | None = None
    evaluate_before: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"extensions.end_to_end.epochs={self.epochs} must be >= 1 (drop the section for no phase).")
        if not self.lr > 0:
            raise ConfigError(f"extensions.end_to_end.lr={self.lr} must be > 0.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"extensions.end_to_end.batch_size={self.batch_size} must be >= 1 (null: train.batch_size).")
        if self.tokens < 1:
            raise ConfigError(f"extensions.end_to_end.tokens={self.tokens} must be >= 1 (positions per sequence).")

"""The ``extensions`` section: every research lever this project adds to the CBQ paper, in one place.

Why one section: the core of a configuration (model, data, scheme, windows, loss, training, trainer,
evaluation, export) is the paper's method and what every run needs; the extensions are optional levers, each
measured against the paper's settings (docs/recipes.md) and named next to every figure it touches. A recipe
that reads ``extensions:`` shows at a glance how far it departs from the paper, and the paper's own settings
are simply the recipe without that section. Each lever is off by default (null, 0 or false).

Keys that lived in other sections before this one existed are listed in
:data:`cbq_lightning.moved_keys.MOVED_KEYS`: a recipe that still uses an old name gets a one-line error naming the
new one, and the quality benchmark reads committed records under the names they were measured with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.continuous import ContinuousApprox
from cbq_lightning.quant.correction import CorrectionConfig
from cbq_lightning.quant.gptq import GPTQInit
from cbq_lightning.quant.mixed_precision import MixedPrecisionConfig
from cbq_lightning.quant.weight_quantizer import ClipSearch
from cbq_lightning.rotation.fold import RotationConfig
from cbq_lightning.train_config import EndToEndConfig


@dataclass
class ExtensionsConfig:
    """Levers beyond the CBQ paper (docs/method.md, "Extensions"); every one off by default.

    Attributes:
        clip_search: search each group's starting clipping ratio in ``[min_ratio, advanced.quant.clip_init]`` for the
            least weight (or, activation-aware, output) error (:class:`ClipSearch`); null: every group starts
            at ``advanced.quant.clip_init``. ``{}`` gives the defaults, or set any of its keys, e.g.
            ``--extensions.clip_search.norm 2.0``.
        gptq: start each layer's rounding from GPTQ's codes on its (searched) grid, computed from the layer's
            input Hessian on the window's quantized-path inputs (:class:`GPTQInit`, :mod:`cbq_lightning.quant.gptq`);
            null: round-to-nearest start. Works with ``method: rtn`` too, which then is plain GPTQ.
        continuous: continuous approximations in the training forward (:class:`ContinuousApprox`: a
            temperature-``T`` sigmoid for the rounding that is not learned and/or a softplus clamp, so the
            clipping bounds get gradient from values near and beyond them); null: straight-through rounding
            and hard clamps. Training only: measurements and the result are exact.
        layer_bits: per-layer weight bits overriding the scheme's, by layer name ``blocks.<index>.<name in the
            block>`` (e.g. ``blocks.3.mlp.down_proj: 4``); layers that read one input (q/k/v, gate/up) share one
            value. ``mixed`` writes these itself from a sensitivity pass.
        column_scale: exponent ``alpha`` of a fixed per-input-column scale on LoRA-Rounding's low-rank term
            (``rounding.form: residual``; 0 = off, the paper): ``V = V0 + (A1 A2) diag(c)`` with
            ``c_j = min(1, (rms_j / median rms) ^ -alpha)``, ``rms_j`` the calibration inputs' RMS of feature
            ``j``. Why: a weight's gradient grows with its input feature, so near the output a few huge features
            set ``dL/dA1`` for every column; with ``c`` each column weighs about equally and the loud ones, where
            one flipped decision moves the output most, move their logits more slowly. ``c`` is a frozen buffer:
            the trainable parameters are still ``A1`` and ``A2``.
        output_kl_weight: weight of an extra term for the window holding the model's last block: ``KL(p_fp ||
            p_q)`` of the next-token distributions (the final norm and LM head applied to the full-precision
            model's last hidden states and to the window's output). The hidden-state losses weigh every hidden
            dimension alike; the head weighs them by what they do to the prediction. 0: the paper's loss.
        output_kl_tokens: positions per sequence (drawn at random each step) the head is applied to: a small
            model's head is several times a block (SmolLM2: 49152 x 576), so every position would dominate the
            last window's step time.
        keep_best: measure the window's objective on all its calibration samples with hardened rounding when
            the fit starts and after every epoch, and finish with the best of those states. Training through
            rounding with a straight-through gradient does not descend monotonically: from a strong start (GPTQ)
            an epoch can leave the window worse than it found it. Costs one forward pass per epoch, plus one.
        correction: a trainable low-rank correction on every quantized linear (:class:`CorrectionConfig`);
            null: none.
        mixed: per-layer bit-widths chosen by sensitivity under an average-bits budget
            (:class:`MixedPrecisionConfig`); null: every layer at the scheme's bits.
        rotation: orthogonal rotations folded into the model before anything else
            (:class:`~cbq_lightning.rotation.fold.RotationConfig`); null: none.
        rounding_forward: what LoRA-Rounding's training forward uses: ``soft`` (the paper, AdaRound) the soft
            decisions ``h(V)``, hardened at 0.5 only at finalisation; ``hardened`` the decisions ``1[h(V) >= 0.5]``
            already, with the gradient passed straight through to ``h(V)``. Why: a soft fit optimises a model that
            does not exist after hardening, and closing that gap takes the regulariser's long anneal (thousands
            of steps per layer in AdaRound); a fit of a few dozen steps per window leaves a gap larger than what it
            gained. A hardened forward trains the model that will be kept, with the same parameters (``A1``, ``A2``
            inside the rectified sigmoid) and the same regulariser.
        rounding_init: how ``A2`` starts in the ``residual`` form (``A1`` starts at zero, so either choice leaves
            the layer's starting decisions unchanged): ``random`` (the paper: Gaussian,
            ``advanced.rounding.init_std``) or ``gradient``: the top-``rank`` right singular vectors of the
            objective's gradient with respect to the logits ``V``, measured on the window's first
            ``rounding_init_batches`` batches, at the same entry scale. Why: while ``A1`` is zero, a step moves
            ``V`` only inside the row space of ``A2``; a random ``A2`` of rank 64 captures about 64/in of a
            gradient row (4-11 % for SmolLM2's layers), an aligned one the directions along which the objective
            changes fastest, as a full-rank offset would (in the spirit of LoRA-GA; docs/method.md §2).
        rounding_init_batches: batches of the window's calibration samples (in order) whose summed gradient
            aligns ``A2`` (``rounding_init: gradient`` only); costs about that many training steps per window.
        cfp_mlp: CFP also scales outlier input channels of the down projection, folded into the up projection's
            output rows (exact; docs/method.md §4). Applied where CFP's activation scaling is.
        lr_schedule: the windows' learning-rate schedule: ``constant`` (the paper) or ``cosine`` (decay to 0 over
            each window's steps).
        lr_correction: learning rate of the low-rank correction factors (with ``correction``).
        end_to_end: after the windows, one more fit over the whole quantized model that trains the scales (the
            clipping thresholds, codes frozen) against the full-precision next-token distribution
            (:class:`~cbq_lightning.train_config.EndToEndConfig`); null: none.

    The optional sections follow one rule: null (the default) is off, a section (``{}`` or any of its keys, e.g.
    ``--extensions.gptq.damp 0.02``) is on.
    """

    clip_search: ClipSearch | None = None
    gptq: GPTQInit | None = None
    continuous: ContinuousApprox | None = None
    layer_bits: dict[str, int] = field(default_factory=dict)
    column_scale: float = 0.0
    output_kl_weight: float = 0.0
    output_kl_tokens: int = 128
    keep_best: bool = False
    correction: CorrectionConfig | None = None
    mixed: MixedPrecisionConfig | None = None
    rotation: RotationConfig | None = None
    end_to_end: EndToEndConfig | None = None
    rounding_forward: Literal["soft", "hardened"] = "soft"
    rounding_init: Literal["random", "gradient"] = "random"
    rounding_init_batches: int = 4
    cfp_mlp: bool = False
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_correction: float = 1e-4

    def __post_init__(self) -> None:
        if self.column_scale < 0:
            raise ConfigError(f"extensions.column_scale={self.column_scale} must be >= 0 (0 turns it off).")
        if self.output_kl_weight < 0:
            raise ConfigError(
                f"extensions.output_kl_weight={self.output_kl_weight} must be >= 0 (0 switches it off).")
        if self.rounding_forward not in ("soft", "hardened"):
            raise ConfigError(f"extensions.rounding_forward={self.rounding_forward!r} is unknown: use 'soft' or "
                              "'hardened'.")
        if self.rounding_init not in ("random", "gradient"):
            raise ConfigError(f"extensions.rounding_init={self.rounding_init!r} is unknown: use 'random' or "
                              "'gradient'.")
        if self.rounding_init_batches < 1:
            raise ConfigError(f"extensions.rounding_init_batches={self.rounding_init_batches} must be >= 1.")
        if not (math.isfinite(self.lr_correction) and self.lr_correction > 0):
            raise ConfigError(f"extensions.lr_correction={self.lr_correction} must be finite and > 0.")
        if self.output_kl_tokens < 1:
            raise ConfigError(
                f"extensions.output_kl_tokens={self.output_kl_tokens} must be >= 1 (positions per sequence).")

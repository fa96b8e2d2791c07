"""Learned rounding decisions: LoRA-Rounding (docs/method.md §2) and a signed-offset form.

LoRA-Rounding (``form: residual`` / ``lowrank``) learns soft decisions through AdaRound's rectified sigmoid
and needs a regulariser schedule long enough to push them to 0 or 1. The ``offset`` form (an extension, the
parameterisation AutoRound uses) learns an offset ``d`` in [-0.5, 0.5] per weight and rounds
``round(W/s + d)`` with a straight-through gradient: decisions are hard from the first step, so it needs no
annealing and suits short fits (the CPU recipes' 64 steps per window), at one trainable value per weight of
the window's blocks.

AdaRound learns one rounding logit per weight; CBQ makes that affordable for whole windows of blocks by
writing the logits as a low-rank product. By default a frozen full-rank offset ``V0`` makes the soft
rounding reproduce the original weight at initialisation, so training starts from the full-precision
function and the low-rank term only has to learn the *correction*. (Exactly so for every value the grid
can hold: the integer zero-point shifts the grid by up to half a step, so a value within half a step of
its group's max or min is clamped to the top/bottom code, as any integer-zero-point quantizer must.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.section_types import changed_fields

#: stretch of the rectified sigmoid (AdaRound): h can reach exactly 0 and 1 with finite logits
ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """Logit ``V`` with ``h(V) = h`` for ``h`` in [0, 1] (finite because of the stretch)."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1.0 - p))


@dataclass
class RoundingConfig:
    """How rounding is learned.

    Attributes:
        enabled: learn rounding (LoRA-Rounding); False rounds to nearest with a straight-through gradient.
        form: ``residual`` (default, ``V = V0 + A1 @ A2``), ``lowrank`` (the paper's ``V = A1 @ A2``) or
            ``offset`` (full-rank signed offset with straight-through rounding, no regulariser).
        rank: rank r of ``A1 @ A2`` (not used by ``offset``).

    How the training forward rounds and how ``A2`` starts, where they depart from the paper, are extensions
    (``extensions.rounding_forward``, ``extensions.rounding_init``). The paper's finer settings (the factors'
    starting scale, the regulariser's weight and anneal) are :class:`RoundingTuning` (``advanced.rounding``).
    """

    enabled: bool = True
    form: Literal["residual", "lowrank", "offset"] = "residual"
    rank: int = 4

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rounding.rank={self.rank} must be >= 1.")
        if self.form not in ("residual", "lowrank", "offset"):
            raise ConfigError(f"rounding.form={self.form!r} is unknown: use 'residual', 'lowrank' or 'offset'.")
        if self.form == "offset":
            self._refuse_settings_offset_ignores()

    def check_gptq_start(self) -> None:
        """Refuse a GPTQ start under rounding this form cannot start from; the one place the rule lives (the
        configuration checks call it before any work, a layer built outside a run calls it too).

        Why: GPTQ's decisions are held by the frozen ``V0`` of the residual form; the paper's pure low-rank form
        ``V = A1 @ A2`` has no such term, so it would silently discard them.
        """
        if self.enabled and self.form == "lowrank":
            raise ConfigError(
                "extensions.gptq with rounding.form='lowrank': the pure low-rank form has no frozen V0 to hold "
                "GPTQ's decisions; use rounding.form=residual (LoRA-Rounding on top of GPTQ), offset, or "
                "rounding.enabled=false."
            )


    def rank_for(self, out_features: int, in_features: int) -> int:
        """The rank of ``A1 A2`` for an ``out x in`` weight: ``rank``, or half the layer's smaller dimension
        for a layer too narrow for it.

        Why not refuse: a recipe's rank is chosen for the models it is shipped for (64 or 128 against
        576-4096-wide layers); a model with narrower layers (a tiny test model, a small MoE expert) should
        still run the recipe, with the narrow layers' factors kept low-rank. Layers the rank fits are
        unchanged, so a recipe computes the same on every model it fitted before. :func:`narrow_layers`
        lists the layers this caps, for the log and ``report.json``.
        """
        smallest = min(out_features, in_features)
        return self.rank if self.rank < smallest else max(1, smallest // 2)
    def _refuse_settings_offset_ignores(self) -> None:
        """``form: offset`` trains one full-rank offset per weight through a straight-through forward: it has no
        factors and no regulariser, so a changed rank, initialisation or regulariser setting would silently do
        nothing (the starting factors and the regulariser, ``extensions.rounding_init*`` and ``advanced.rounding``,
        are checked by the configuration, :func:`cbq_lightning.config.validate`)."""
        changed = changed_fields(self, ("rank",))
        if changed:
            shown = ", ".join(f"rounding.{name}={value}" for name, value, _ in changed)
            fix = " ".join(f"--rounding.{name} {default}" for name, _, default in changed)
            raise ConfigError(
                f"rounding.form=offset has no LoRA factors and no regulariser, so {shown} would do nothing: set "
                f"{fix} (the defaults), or use rounding.form=residual."
            )


@dataclass
class RoundingTuning:
    """LoRA-Rounding's finer settings at the paper's values (``advanced.rounding``): a recipe rarely changes them.

    Attributes:
        reg_weight: lambda, weight of the rounding regulariser in the window's loss.
        init_std: standard deviation of the random factor(s) at initialisation (and the entry scale of the
            gradient-aligned start).
        beta_start: regulariser exponent after warm-up (sharp: only near-0.5 values are penalised).
        beta_end: exponent at the last step (flat: every undecided value is pushed to 0 or 1).
        warmup: fraction of a window's steps without regulariser.
    """

    reg_weight: float = 0.01
    init_std: float = 0.1
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.reg_weight) and self.reg_weight >= 0):
            raise ConfigError(f"advanced.rounding.reg_weight={self.reg_weight} must be a finite number >= 0.")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ConfigError(f"advanced.rounding.init_std={self.init_std} must be a finite number > 0.")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"advanced.rounding.warmup={self.warmup} must lie in [0, 1).")

    def changed(self) -> list[str]:
        """``advanced.rounding.<name>=<value>`` for each setting away from its default (what a rounding form without
        factors or regulariser would silently ignore)."""
        return [f"advanced.rounding.{name}={value}" for name, value, _ in changed_fields(self)]


class Rounding(nn.Module):
    """How a calibrating layer rounds ``W/s``: the one interface :class:`~cbq_lightning.quant.qlinear.QuantLinear`
    reads, so the layer never asks which form it holds.

    A form gives the quantizer either up/down ``decisions`` added to ``floor(W/s)`` (LoRA-Rounding), or a signed
    ``offset`` added to ``W/s`` before rounding to nearest (the offset form), or neither (round to nearest), and
    may add a ``regularizer`` to the window's loss. ``kind`` names it in the trainable-parameter counts.
    """

    kind = "nearest"

    def decisions(self, hard: bool) -> torch.Tensor | None:
        """Decisions ``[out, in]`` in [0, 1] for the forward (``hard``: hardened, no gradient), or None."""
        return None

    def offset(self) -> torch.Tensor | None:
        """The learned signed offset ``[out, in]`` added to ``W/s`` before rounding, or None."""
        return None

    def regularizer(self, beta: float) -> torch.Tensor | None:
        """The term pushing soft decisions to 0 or 1 (None: the form's decisions are hard already)."""
        return None


class NearestRounding(Rounding):
    """Round to nearest, nothing learned (``rounding.enabled: false``, the RTN baseline, the guard's fallback)."""


class LoRARounding(Rounding):
    """Soft rounding decisions ``h(V)`` for one ``[out, in]`` weight, ``V`` low-rank (+ frozen offset).

    Args:
        frac: ``frac(W / s)`` at initialisation, ``[out, in]``; ``V0`` is set so that ``h(V0) = frac``.
        rank: rank of ``A1 @ A2``; must be below ``min(out, in)`` to be low-rank at all.
        form: ``residual`` or ``lowrank`` (see :class:`RoundingConfig`).
        init_std: std of the random factor(s).
        generator: random source for the factors (reproducibility).
        column_scale: the frozen per-input-column scale ``c`` of ``A1 A2`` (``[in]``, see
            :func:`column_scale_from_moments`), or None (the paper: no scale).
        hardened: the training forward uses the hardened decisions with the soft gradient passed straight through
            (``extensions.rounding_forward: hardened``) instead of the soft ones (``soft``, the paper).
    """

    kind = "lora"

    def __init__(
        self,
        frac: torch.Tensor,
        rank: int = 4,
        form: str = "residual",
        init_std: float = 0.1,
        generator: torch.Generator | None = None,
        column_scale: torch.Tensor | None = None,
        hardened: bool = False,
    ) -> None:
        super().__init__()
        self.hardened = hardened
        out_features, in_features = frac.shape
        if rank >= min(out_features, in_features):
            raise ConfigError(
                f"rounding.rank={rank} is not low-rank for a {out_features}x{in_features} weight: "
                f"use a rank below {min(out_features, in_features)}."
            )
        self.form = form
        self.init_std = init_std
        #: a zero ``[out, in]`` tensor added to the logits while :func:`logit_probes` measures ``dL/dV``
        self.probe: torch.Tensor | None = None
        a2 = torch.randn(rank, in_features, generator=generator) * init_std
        if form == "residual":
            self.register_buffer("v0", inverse_rectified_sigmoid(frac.float()))
            a1 = torch.zeros(out_features, rank)
        elif form == "lowrank":
            self.v0 = None
            a1 = torch.randn(out_features, rank, generator=generator) * init_std / math.sqrt(rank)
        else:
            raise ConfigError(f"rounding.form={form!r} is unknown: use 'residual' or 'lowrank'.")
        self.a1 = nn.Parameter(a1)
        self.a2 = nn.Parameter(a2)
        self.register_buffer("column_scale", None if column_scale is None else column_scale.float().reshape(1, -1))

    def logits(self) -> torch.Tensor:
        v = self.a1 @ self.a2
        v = v if self.column_scale is None else v * self.column_scale
        v = v if self.v0 is None else self.v0 + v
        return v if self.probe is None else v + self.probe

    def product_is_zero(self) -> bool:
        """Whether ``A1 A2`` is exactly zero (``A1`` untrained), so that ``A2`` may be re-chosen without changing
        any logit: true for a block entering its first window, false for the overlap block carried over."""
        return self.v0 is not None and not bool(self.a1.any())

    def align_to_gradient(self, gradient: torch.Tensor) -> None:
        """Set ``A2`` to the top-``rank`` right singular vectors of ``gradient`` (``dL/dV``, ``[out, in]``), each
        entry at the random start's scale (rows of norm ``init_std * sqrt(in)``): the first steps of ``A1``
        then move ``V`` along the directions the objective is most sensitive to. Only while ``A1`` is zero."""
        if not self.product_is_zero():
            raise RuntimeError("align_to_gradient needs A1 = 0: otherwise re-choosing A2 changes the logits")
        rank, in_features = self.a2.shape
        if self.column_scale is not None:  # dL/dA1 = dL/dV diag(c) A2^T
            gradient = gradient * self.column_scale
        _, _, vh = torch.linalg.svd(gradient.double(), full_matrices=False)
        with torch.no_grad():
            self.a2.copy_(vh[:rank].to(self.a2.dtype) * (self.init_std * math.sqrt(in_features)))

    def soft(self) -> torch.Tensor:
        """Soft rounding decisions in [0, 1], ``[out, in]``."""
        return rectified_sigmoid(self.logits())

    def hard(self) -> torch.Tensor:
        """Hardened decisions ``1[h >= 0.5]`` (float 0/1)."""
        with torch.no_grad():
            return (self.soft() >= 0.5).float()

    def hardened_straight_through(self) -> torch.Tensor:
        """``1[h >= 0.5]`` in the forward, the gradient of ``h(V)`` in the backward (``extensions.rounding_forward:
        hardened``)."""
        h = self.soft()
        return (h >= 0.5).float().detach() + h - h.detach()

    def decisions(self, hard: bool) -> torch.Tensor:
        """Hardened (``hard``), hardened with a straight-through gradient, or soft decisions, as the form trains."""
        if hard:
            return self.hard()
        return self.hardened_straight_through() if self.hardened else self.soft()

    def regularizer(self, beta: float) -> torch.Tensor:
        """``mean(1 - |2h - 1|^beta)``: zero once every decision is exactly 0 or 1."""
        h = self.soft()
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).mean()


def column_scale_from_moments(input_moments: torch.Tensor, alpha: float) -> torch.Tensor:
    """``c_j = min(1, (rms_j / median rms) ^ -alpha)`` from ``E[x_j^2]`` (``[in]``): columns whose inputs are
    louder than the layer's median get a proportionally smaller step, the rest keep the plain LoRA term
    (``extensions.column_scale``). A column with no signal (rms 0) keeps scale 1."""
    rms = input_moments.double().clamp_min(0).sqrt()
    median = rms.median().clamp_min(torch.finfo(torch.float64).tiny)
    ratio = (rms / median).clamp_min(torch.finfo(torch.float64).tiny)
    return ratio.pow(-alpha).clamp(max=1.0).float()


@contextmanager
def logit_probes(roundings: Sequence[LoRARounding]) -> Iterator[list[torch.Tensor]]:
    """Zero tensors added to each rounding's logits for the duration of the block: ``autograd.grad`` of a loss
    with respect to them is ``dL/dV``, which the factors alone cannot give (with ``A1 = 0`` the gradient of
    ``A1`` is ``dL/dV A2^T``, a projection)."""
    probes = [torch.zeros_like(rounding.v0, requires_grad=True) for rounding in roundings]
    for rounding, probe in zip(roundings, probes, strict=True):
        rounding.probe = probe
    try:
        yield probes
    finally:
        for rounding in roundings:
            rounding.probe = None


class RoundingOffset(Rounding):
    """Signed rounding offset ``d = clamp(V, -0.5, 0.5)`` for one ``[out, in]`` weight (``form: offset``).

    The weight is rounded as ``round(W/s + d)`` (see :meth:`WeightQuantizer.codes`); ``V`` starts at zero,
    i.e. at round-to-nearest, and each value can move the decision by at most one step, as AdaRound's can.
    The decision depends on the current scale, so it is made by the quantizer, not stored here.
    """

    kind = "offset"

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.zeros(shape, dtype=torch.float32))

    def offset(self) -> torch.Tensor:
        """The offset in [-0.5, 0.5], ``[out, in]`` (zero gradient once a value sits beyond a bound)."""
        return torch.clamp(self.v, -0.5, 0.5)


def beta_at(step: int, total_steps: int, config: RoundingTuning) -> float | None:
    """Regulariser exponent at ``step`` of ``total_steps``; ``None`` during warm-up (no regulariser).

    After warm-up beta falls linearly from ``beta_start`` to ``beta_end`` at the last step.
    """
    warmup_steps = math.floor(config.warmup * total_steps + 1e-9)  # int(0.29 * 100) would be 28
    if step < warmup_steps or total_steps <= 0:
        return None
    span = max(total_steps - 1 - warmup_steps, 1)
    t = min((step - warmup_steps) / span, 1.0)
    return config.beta_start + (config.beta_end - config.beta_start) * t

"""GPTQ as the starting point of the learned rounding (an extension: docs/method.md §2).

Why: round-to-nearest rounds every weight on its own, so the errors of a row add up in the layer's output
however they fall. GPTQ (Frantar et al., 2023) rounds the columns one at a time and, after each, moves the
not-yet-rounded columns to cancel the error just made, weighted by the inverse Hessian ``H = E[x x^T]`` of
the layer's inputs. On per-channel 4-bit weights this alone removes much of the RTN loss - far more than a
short CPU fit of the window's rounding offsets finds from round-to-nearest. Starting the window's training
from GPTQ's decisions lets the cross-block fit spend its steps on what GPTQ cannot see (the interplay of
layers and blocks) instead of re-deriving the layer-local solution.

The codes are computed on the quantizer's grid (its scales and zero-points after the clip search), so the
result is expressed as a signed rounding offset ``codes - z - W/s`` the quantizer adds before rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbq_lightning.errors import ConfigError
from cbq_lightning.section_types import check_field_types


@dataclass(frozen=True)
class GPTQInit:
    """The ``extensions.gptq`` section: start the learned rounding from GPTQ's codes (null: round-to-nearest start).

    Attributes:
        damp: dampening added to the Hessian's diagonal, as a fraction of its mean (GPTQ's ``percdamp``).
        act_order: round the columns in order of decreasing Hessian diagonal (GPTQ's ``desc_act``): the
            columns that matter most are rounded first, while the most columns remain to absorb the error.
            The scales stay tied to the original column groups, so the export is unchanged.
        true_sequential: measure each linear's Hessian behind the block's already-quantized linears
            (o_proj after q/k/v, the MLP after the attention, down_proj after gate/up), as GPTQ's
            ``true_sequential``; off: every Hessian from the full-precision block on the same inputs.
        block_size: columns updated together (the lazy-batch trick; it does not change the result).
    """

    damp: float = 0.01
    act_order: bool = True
    true_sequential: bool = False
    block_size: int = 128

    def __post_init__(self) -> None:
        check_field_types(self, "extensions.gptq")
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"extensions.gptq.damp={self.damp} must lie in (0, 1); 0.01 is GPTQ's default.")
        if self.block_size < 1:
            raise ConfigError(f"extensions.gptq.block_size={self.block_size} must be >= 1.")


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64).

    A Hessian from few tokens can be numerically singular; the dampening is raised tenfold (at most three
    times) before giving up with an error that says what to change.
    """
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = float(torch.diag(hessian).mean())
    for attempt in range(4):
        damped = hessian + (damp * 10**attempt) * mean_diag * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ConfigError(
        "GPTQ: the layer's input Hessian is not positive definite even with 1000x the dampening: calibrate "
        "on more tokens (data.num_samples / data.seqlen) or raise extensions.gptq.damp."
    )


@dataclass(frozen=True)
class GPTQResult:
    """What GPTQ decided for one weight, both ``[out, in]`` float64 in code units (before the zero-point).

    Attributes:
        codes: the integer codes (zero-point included, clamped to the grid).
        targets: the error-compensated value ``w'/s`` of each weight at the moment its column was rounded:
            GPTQ's code is ``clamp(floor(targets + 0.5) + zero)``. Its fractional part says how close the
            decision was, which is what a soft (LoRA-Rounding) start needs; an input feature that is never
            non-zero has its plain ``W/s`` here.
    """

    codes: torch.Tensor
    targets: torch.Tensor


@torch.no_grad()
def _compensated_rounding(
    w: torch.Tensor, hinv: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop in the permuted order: round each column, spread its error over the columns still to
    come through the inverse Hessian's Cholesky factor ``hinv`` (lazily, ``block_size`` columns at a time).
    Returns the codes and the values they round (``w / s`` after compensation); ``w`` is updated in place."""
    codes = torch.empty_like(w)
    targets = torch.empty_like(w)
    for start in range(0, w.shape[1], block_size):
        stop = min(start + block_size, w.shape[1])
        block = w[:, start:stop].clone()
        errors = torch.empty_like(block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = block[:, i]
            col_scale, col_zero = s[:, start + i], z[:, start + i]
            target = column / col_scale
            q = torch.clamp(torch.floor(target + 0.5) + col_zero, qmin, qmax)
            codes[:, start + i] = q
            targets[:, start + i] = target
            error = (column - col_scale * (q - col_zero)) / hinv_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return codes, targets


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: int,
    group: int,
    settings: GPTQInit = GPTQInit(),
    qmin: int = 0,
) -> GPTQResult:
    """GPTQ on a fixed grid: the integer codes of ``weight`` and the compensated values they round.

    Args:
        weight: ``[out, in]``.
        hessian: ``E[x x^T]`` of the layer's inputs, ``[in, in]`` (any positive multiple works).
        scale: ``[out, in/group, 1]``, the quantizer's scales.
        zero: ``[out, in/group, 1]``, its integer zero-points.
        qmax: largest code, ``2**bits - 1``.
        group: input features per scale (``in`` for per-channel).
        settings: dampening, column order, block size.
        qmin: smallest code (0; 1 on GGML's Q8_0 grid, which never stores -128).

    Rounding is half-up, as the quantizer's; an input feature that is never non-zero keeps its
    round-to-nearest code (GPTQ would zero it; nothing downstream can tell the difference).
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight of {tuple(weight.shape)}")
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if settings.act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    else:
        perm = torch.arange(in_features, device=weight.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, settings.damp)
    column_group = perm // group
    s = scale.reshape(out_features, -1).double()[:, column_group]  # [out, in], permuted
    z = zero.reshape(out_features, -1).double()[:, column_group]
    codes, targets = _compensated_rounding(w, hinv, s, z, qmin, qmax, settings.block_size)
    result = torch.empty_like(codes)
    result[:, perm] = codes
    result_targets = torch.empty_like(targets)
    result_targets[:, perm] = targets
    if bool(dead.any()):
        groups = torch.arange(in_features, device=weight.device) // group
        s_dead = scale.reshape(out_features, -1).double()[:, groups[dead]]
        z_dead = zero.reshape(out_features, -1).double()[:, groups[dead]]
        plain = weight.double()[:, dead] / s_dead
        result[:, dead] = torch.clamp(torch.floor(plain + 0.5) + z_dead, qmin, qmax)
        result_targets[:, dead] = plain
    return GPTQResult(result, result_targets)

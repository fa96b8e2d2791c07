"""Low-rank correction of a quantized linear (docs/method.md §3 extensions, Scetbon & Hensman 2024).

``y = Q(W) Q(x) + U V^T x``: a full-precision rank-``r`` term acting on the *unquantized* input, trained in
the window with the clipping thresholds and rounding. With activation quantization it can undo part of what
neither the weights nor the activation grid can (the error ``Q(W) (Q(x) - x)`` depends on ``x``, which the
correction sees exactly); with weight-only schemes it absorbs the largest directions of ``W - Q(W)``.

It costs ``r (in + out)`` extra parameters and a rank-``r`` matmul per layer at inference, so it is kept as
an explicit extra module: ``quant_state.safetensors`` stores ``U`` and ``V`` per layer, ``cbq evaluate`` on
the run puts them back (:func:`cbq_lightning.export.fake_quant.attach_corrections`), and the packed formats,
whose stock kernels have no such term, refuse such a run rather than drop it silently.

Initialisation: the top-``r`` singular directions of ``W - Q(W)`` at the fit's start (``U = U_r sqrt(S_r)``,
``V = V_r sqrt(S_r)``; LQER / ZeroQuant-V2's "LoRC"), so the layer starts with its weight error reduced to the
rank-``r`` remainder. ``init: zero`` starts from ``U = 0`` and a small random ``V`` (LoRA's start: the layer
begins exactly as the plain quantized one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.section_types import check_field_types


@dataclass
class CorrectionConfig:
    """The ``correction`` section: every quantized linear gets a low-rank correction of this rank (an extension;
    null: none).

    Attributes:
        rank: an absolute rank.
        rank_fraction: a rank as a fraction of ``min(in, out)`` of each layer; e.g. 0.1 gives rank 58 for a
            576 x 1536 layer. Set exactly one of the two.
        init: ``svd`` (top singular directions of the starting weight error) or ``zero`` (LoRA's start).
    """

    rank: int = 0
    rank_fraction: float = 0.0
    init: Literal["svd", "zero"] = "svd"

    def __post_init__(self) -> None:
        check_field_types(self, "correction")
        if self.rank < 0:
            raise ConfigError(f"extensions.correction.rank={self.rank} must be >= 0.")
        if not 0.0 <= self.rank_fraction < 1.0:
            raise ConfigError(f"extensions.correction.rank_fraction={self.rank_fraction} must lie in [0, 1).")
        if self.rank and self.rank_fraction:
            raise ConfigError(
                f"extensions.correction.rank={self.rank} and extensions.correction.rank_fraction={self.rank_fraction} are both set: "
                "give the rank either as a number or as a fraction of min(in, out)."
            )
        if not (self.rank or self.rank_fraction):
            raise ConfigError(
                "correction: neither rank nor rank_fraction is set, so it would add nothing: give one (e.g. "
                "--extensions.correction.rank 8), or set correction null for no correction."
            )
        if self.init not in ("svd", "zero"):
            raise ConfigError(f"extensions.correction.init={self.init!r} is unknown: use 'svd' or 'zero'.")

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The rank of a layer's correction: at least 1, below ``min(in, out)`` (or it would not be low-rank)."""
        smallest = min(out_features, in_features)
        rank = self.rank if self.rank else max(1, round(self.rank_fraction * smallest))
        if rank >= smallest:
            raise ConfigError(
                f"extensions.correction.rank={rank} is not low-rank for a {out_features}x{in_features} layer: use a rank "
                f"below {smallest} (or extensions.correction.rank_fraction)."
            )
        return rank


class LowRankCorrection(nn.Module):
    """``x -> (x V) U^T`` with ``U`` ``[out, r]`` and ``V`` ``[in, r]`` (full precision, trainable).

    Args:
        weight_error: ``W - Q(W)`` at the start, ``[out, in]`` (the ``svd`` start); None gives the ``zero`` start.
        rank: r.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, weight_error: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight_error is not None:
            u, v = svd_factors(weight_error.float(), rank)
        else:
            u, v = zero_start_factors(out_features, in_features, rank)
        self.u = nn.Parameter(u)
        self.v = nn.Parameter(v)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.v.to(x.dtype)) @ self.u.to(x.dtype).t()

    def matrix(self) -> torch.Tensor:
        """``U V^T``, ``[out, in]``."""
        return self.u @ self.v.t()

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r sqrt(S_r), V_r sqrt(S_r))``: the best rank-``r`` approximation of ``matrix`` split evenly.

    A matrix with no error at all (a layer the grid already holds exactly) gives the ``zero`` start instead:
    two zero factors would never receive a gradient.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if float(s[0]) == 0.0:
        return zero_start_factors(*matrix.shape, rank)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).contiguous(), (vh[:rank].t() * root).contiguous()


def zero_start_factors(out_features: int, in_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's start: ``U = 0``, ``V`` random with unit-variance outputs. Seeded by the shape, not the run's
    random state, so that adding a correction changes no other random draw of the run."""
    generator = torch.Generator().manual_seed(out_features * 131 + in_features)
    return torch.zeros(out_features, rank), torch.randn(in_features, rank, generator=generator) / in_features**0.5

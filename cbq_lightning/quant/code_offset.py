"""A low-rank, trainable offset on a finalised layer's integer codes: LoRA-Rounding for the end-to-end phase.

Why: after its last window a block's rounding decisions are integers, and the end-to-end phase trained only the
scales (and norms) around them; every window-level lever measured at W4A16 then ended at the same perplexity
(docs/recipe-history.md), so what the phase freezes, the codes, is what is left to move. The full-precision
weights are gone by then (no copy of the model is kept), so the decision cannot be re-made against ``W / s``.
What the windows leave instead is each decision's margin ``m = h(V) - 1[h(V) >= 0.5]`` in [-0.5, 0.5): where the
soft code sat against the hardened one. The phase moves each code by ``floor(m + A1 A2 + 0.5)`` whole steps
(clamped to the grid), with the rounding passed straight through in the backward (as the windows' hardened
forward does): a decision the windows left near its boundary flips after a small step of ``A1 A2``, a firm one
(``m = 0``) needs half a step, as in the windows, where GPTQ's start puts each logit at its compensated
fraction. ``A1`` starts at zero, so the phase starts from exactly the windows' codes; ``A2`` is random. As in the
windows, the rounding is a low-rank product: ``rank * (out + in)`` trainable values per layer, not one per weight.
"""

from __future__ import annotations

import torch
from torch import nn

from cbq_lightning.quant.rounding import capped_rank
from cbq_lightning.quant.ste import round_half_up_ste


class LowRankCodeOffset(nn.Module):
    """``round(A1 A2)`` added to ``[out, in]`` integer codes, with a straight-through gradient.

    Args:
        out_features, in_features: the layer's shape.
        rank: rank of ``A1 A2`` (capped at half the smaller dimension, as the windows' factors are).
        init_std: standard deviation of ``A2``'s random entries (``A1`` starts at zero).
        generator: random source for ``A2`` (reproducibility).
    """

    def __init__(self, out_features: int, in_features: int, rank: int, init_std: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        rank = capped_rank(rank, out_features, in_features)
        self.a1 = nn.Parameter(torch.zeros(out_features, rank))
        self.a2 = nn.Parameter(torch.randn(rank, in_features, generator=generator) * init_std)

    def _steps(self, margin: torch.Tensor | None) -> torch.Tensor:
        offset = self.a1 @ self.a2
        return round_half_up_ste(offset if margin is None else margin.float() + offset)

    def shifted_codes(self, codes: torch.Tensor, bits: int, margin: torch.Tensor | None) -> torch.Tensor:
        """``clamp(codes + floor(margin + A1 A2 + 0.5), 0, 2^bits - 1)`` as float32, differentiable in ``A1`` and
        ``A2`` (straight through the rounding; zero gradient where the clamp holds a code at the grid's edge).
        ``margin`` None: every decision counts as firm (0)."""
        return torch.clamp(codes.float() + self._steps(margin), 0.0, float(2**bits - 1))

    @torch.no_grad()
    def steps(self, margin: torch.Tensor | None) -> torch.Tensor:
        """The whole steps each code moves before clamping, ``[out, in]`` (integers as float32)."""
        return self._steps(margin)

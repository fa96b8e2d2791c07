"""Straight-through estimators: integer operations in the forward pass, identity gradient backwards.

They let gradients reach the clipping thresholds through ``W / s`` even though rounding is flat almost
everywhere (the LSQ / OmniQuant trick).
"""

from __future__ import annotations

import torch


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``floor(x)`` forward, identity gradient."""
    return x + (torch.floor(x) - x).detach()


def round_half_up_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half up (``floor(x + 0.5)``) forward, identity gradient.

    Half-up rather than ``torch.round``'s half-to-even so that hardening a LoRA-Rounding layer that never
    trained (``h = 1[frac >= 0.5]``) gives exactly the round-to-nearest codes.
    """
    return x + (torch.floor(x + 0.5) - x).detach()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (``torch.round``, what integer kernels do) forward, identity gradient."""
    return x + (torch.round(x) - x).detach()

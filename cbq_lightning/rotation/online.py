"""Online rotations: ``x -> x R`` applied to a linear's input at run time, where no weight can absorb it.

The rotation before ``down_proj`` (R4) is the case: the gated MLP's product ``act(gate(x)) * up(x)`` sits
between any weight and the down projection's input, so ``R`` cannot be folded upstream; ``down_proj``'s
weight absorbs ``R`` (``W R``) and the input is rotated on the fly, *before* its activation quantizer, so
the quantizer sees the rotated (outlier-free) activations.

Why a forward pre-hook and not a wrapper module: the linear keeps its name (``mlp.down_proj``), so
everything that finds linears by name (calibration, checkpoints, exports) keeps working; and every hook that
observes the linear's input (the statistics of GPTQ, CFP and the clip search) sees the rotated input the
quantized layer will multiply, because the rotation hook always runs first. The rotation travels with the
linear through its lives (``nn.Linear`` -> ``QuantLinear`` -> ``FinalizedQuantLinear``) by
:func:`move_online_rotation`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cbq_lightning.rotation.hadamard import Orthogonal

__all__ = ["OnlineRotation", "attach_online_rotation", "move_online_rotation", "online_rotation_of"]

#: the child module name under which a linear holds its online rotation
CHILD = "input_rotation"
#: the attribute holding the id of the pre-hook that applies it
_HOOK_ID = "_input_rotation_hook_id"


class OnlineRotation(nn.Module):
    """``x -> x R`` over the last dimension, computed in float32 and returned in ``x``'s dtype.

    A randomised Hadamard ``R = diag(s) (A (x) B)`` is applied factor by factor (``A^T X B`` on ``x`` reshaped to
    ``[m, 2^k]``, see :class:`~cbq_lightning.rotation.hadamard.Orthogonal`), a random orthogonal one as a
    dense matmul. The tensors are non-persistent buffers: checkpoints do not carry them, the run's sidecar
    describes the draw (size, kind, seed) and :mod:`cbq_lightning.rotation.fold` draws it again."""

    def __init__(self, rotation: Orthogonal, description: dict[str, Any]) -> None:
        super().__init__()
        self.size = rotation.size
        for name in ("signs", "left", "right", "dense"):
            tensor = getattr(rotation, name)
            self.register_buffer(name, None if tensor is None else tensor.to(torch.float32), persistent=False)
        self.description = dict(description)

    @property
    def matrix(self) -> torch.Tensor:
        """The whole matrix (tests and reports; the forward never builds it)."""
        return self.forward(torch.eye(self.size, device=(self.dense if self.dense is not None else self.signs).device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotated = x.to(torch.float32)
        if self.dense is not None:
            return (rotated @ self.dense).to(x.dtype)
        rotated = (rotated * self.signs).unflatten(-1, (self.left.shape[0], self.right.shape[0]))
        rotated = self.left.T @ (rotated @ self.right)
        return rotated.flatten(-2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, {self.description.get('construction', '')}"


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, CHILD)(args[0]), *args[1:])


def online_rotation_of(module: nn.Module) -> OnlineRotation | None:
    """The online rotation a linear applies to its input, or None."""
    rotation = module._modules.get(CHILD)
    return rotation if isinstance(rotation, OnlineRotation) else None


def attach_online_rotation(module: nn.Module, rotation: OnlineRotation) -> None:
    """Make ``module`` rotate its input with ``rotation`` before anything else sees it (prepended pre-hook)."""
    if online_rotation_of(module) is not None:
        raise ValueError(f"{type(module).__name__} already has an online rotation")
    module.add_module(CHILD, rotation)
    handle = module.register_forward_pre_hook(_rotate_input, prepend=True)
    setattr(module, _HOOK_ID, handle.id)


def move_online_rotation(old: nn.Module, new: nn.Module) -> None:
    """Move ``old``'s online rotation (if any) to ``new``, its replacement or wrapper: exactly one of the two
    rotates afterwards. A no-op for a module without one (the usual case)."""
    rotation = online_rotation_of(old)
    if rotation is None or old is new:
        return
    old._forward_pre_hooks.pop(getattr(old, _HOOK_ID), None)
    del old._modules[CHILD]
    delattr(old, _HOOK_ID)
    attach_online_rotation(new, rotation)

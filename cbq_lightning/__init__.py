"""cbq-lightning: CBQ (Cross-Block Quantization) for LLMs as a PyTorch Lightning training loop.

``from cbq_lightning import quantize`` quantizes a model already in memory (:mod:`cbq_lightning.api`); the ``cbq``
command runs the same job from a recipe file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_recipe", "quantize"]

if TYPE_CHECKING:
    from cbq_lightning.api import load_recipe, quantize


def __getattr__(name: str) -> Any:
    # lazy: `import cbq_lightning` (the CLI's --version, the package's submodules) must not import torch and Lightning
    if name in ("quantize", "load_recipe"):
        from cbq_lightning import api

        return getattr(api, name)
    raise AttributeError(f"module 'cbq_lightning' has no attribute {name!r}")

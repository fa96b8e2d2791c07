"""Per-input-feature second moments ``E[x_j^2]`` of every linear of a block, for the clip search.

Why: clipping a weight range by weight error alone is blind to what the weight multiplies. LLaMA-family
models carry "massive activations" (a few hidden features hundreds of times larger than the rest); a
weight-error search happily clips the weights that multiply them, and the model breaks although the
weight error went down. Weighting each input feature's error by ``E[x_j^2]`` makes the search minimise
(the diagonal approximation of) the layer's *output* error instead, as AWQ's clip search and GPTQ's
Hessian do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cbq_lightning.distributed import all_reduce_
from cbq_lightning.models.adapter import DecoderAdapter, observe_linear_inputs


class InputMoments:
    """A cross-block preprocessor: records ``E[x_j^2]`` at each linear's input, per block.

    Runs the (still full-precision) block on the first ``max_samples`` sequences of its quantized-path
    inputs with forward hooks; :meth:`pop` hands the moments to the quantizer of that block once.

    Args:
        max_samples: sequences used (the moments of a few thousand tokens are stable).
        batch_size: sequences per forward.
    """

    def __init__(self, max_samples: int = 16, batch_size: int = 8) -> None:
        self.max_samples = max_samples
        self.batch_size = batch_size
        self._moments: dict[int, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, index: int, block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, float]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def record(name: str, x: torch.Tensor) -> None:
            sums[name] = sums.get(name, 0) + x.double().pow(2).sum(dim=0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]

        linears = list(DecoderAdapter.block_linears(block))
        observe_linear_inputs(block, linears, inputs[: self.max_samples], kwargs, self.batch_size, record)
        for name in sorted(sums):  # one statistic for all DDP ranks (sorted: every rank reduces in one order)
            all_reduce_(sums[name])
            counts[name] = int(all_reduce_(torch.tensor([counts[name]], dtype=torch.float64))[0])
        moments = {name: (sums[name] / counts[name]).float() for name in sums}
        self._moments[index] = moments
        peak = max(float(m.max() / m.mean().clamp(min=1e-30)) for m in moments.values())
        return {"preprocess/input_moment_peak_to_mean": peak}

    def pop(self, index: int) -> dict[str, torch.Tensor] | None:
        """The moments recorded for block ``index`` (forgotten afterwards), or None."""
        return self._moments.pop(index, None)

"""Second moments of every linear's input in a block: ``E[x_j^2]`` for the clip search, ``E[x x^T]`` for GPTQ.

Why: clipping a weight range by weight error alone is blind to what the weight multiplies. LLaMA-family
models carry "massive activations" (a few hidden features hundreds of times larger than the rest); a
weight-error search happily clips the weights that multiply them, and the model breaks although the
weight error went down. Weighting each input feature's error by ``E[x_j^2]`` makes the search minimise
(the diagonal approximation of) the layer's *output* error instead, as AWQ's clip search and GPTQ's
Hessian do. GPTQ (:mod:`cbq_lightning.quant.gptq`) needs the whole matrix ``E[x x^T]``; its diagonal is
the same ``E[x_j^2]``, so one pass serves both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cbq_lightning.distributed import all_reduce_
from cbq_lightning.models.adapter import DecoderAdapter, observe_linear_inputs


class InputMoments:
    """A cross-block preprocessor: records the second moments at each linear's input, per block.

    Runs the (still full-precision) block on the first ``max_samples`` sequences of its quantized-path
    inputs with forward hooks; :meth:`pop` hands the moments to the quantizer of that block once.

    Args:
        max_samples: sequences used (the diagonal of a few thousand tokens is stable; the full matrix
            of a 1536-wide input wants more, hence the larger default when ``full``).
        batch_size: sequences per forward.
        full: record ``E[x x^T]`` (``[in, in]``) instead of its diagonal ``E[x_j^2]`` (``[in]``).
    """

    def __init__(self, max_samples: int | None = None, batch_size: int = 8, full: bool = False) -> None:
        self.max_samples = max_samples if max_samples is not None else (128 if full else 16)
        self.batch_size = batch_size
        self.full = full
        self._moments: dict[int, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, index: int, block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, float]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        last: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, its moment): q/k/v and gate/up share one

        def record(name: str, x: torch.Tensor) -> None:
            if last and last[0][0].data_ptr() == x.data_ptr() and last[0][0].shape == x.shape:
                moment = last[0][1]  # the held reference keeps the address from being reused
            else:
                # the full matrix multiplies in float32 (a float64 GEMM is several times slower on CPU) and
                # is summed over batches in float64
                moment = (x.float().T @ x.float()).double() if self.full else x.double().pow(2).sum(dim=0)
                last[:] = [(x, moment)]
            sums[name] = sums.get(name, 0) + moment.cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]

        linears = list(DecoderAdapter.block_linears(block))
        observe_linear_inputs(block, linears, inputs[: self.max_samples], kwargs, self.batch_size, record)
        for name in sorted(sums):  # one statistic for all DDP ranks (sorted: every rank reduces in one order)
            all_reduce_(sums[name])
            counts[name] = int(all_reduce_(torch.tensor([counts[name]], dtype=torch.float64))[0])
        moments = {name: (sums[name] / counts[name]).float() for name in sums}
        self._moments[index] = moments
        diagonals = [torch.diagonal(m) if self.full else m for m in moments.values()]
        peak = max(float(d.max() / d.mean().clamp(min=1e-30)) for d in diagonals)
        return {"preprocess/input_moment_peak_to_mean": peak}

    def pop(self, index: int) -> dict[str, torch.Tensor] | None:
        """The moments recorded for block ``index`` by linear name (forgotten afterwards), or None."""
        return self._moments.pop(index, None)

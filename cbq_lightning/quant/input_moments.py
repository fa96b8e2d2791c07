"""Second moments of every linear's input in a block: ``E[x_j^2]`` for the clip search, ``E[x x^T]`` for GPTQ.

Why: clipping a weight range by weight error alone is blind to what the weight multiplies. LLaMA-family
models carry "massive activations" (a few hidden features hundreds of times larger than the rest); a
weight-error search happily clips the weights that multiply them, and the model breaks although the
weight error went down. Weighting each input feature's error by ``E[x_j^2]`` makes the search minimise
(the diagonal approximation of) the layer's *output* error instead, as AWQ's clip search and GPTQ's
Hessian do. GPTQ (:mod:`cbq_lightning.quant.gptq`) needs the whole matrix ``E[x x^T]``; its diagonal is
the same ``E[x_j^2]``, so one pass serves both.

True-sequential mode (GPTQ's ``true_sequential``): inside a block, the later linears (o_proj, down_proj, the
MLP's inputs) see what the *quantized* earlier linears produce, not the full-precision block's internals.
The moments of the linears that read the block input are the same either way; the others are measured again,
stage by stage, after the stages before them were quantized (:meth:`InputMoments.stages`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cbq_lightning.distributed import all_reduce_
from cbq_lightning.models.adapter import DecoderAdapter, observe_linear_inputs
from cbq_lightning.models.moe import merge_expert_stages


class InputMoments:
    """A cross-block preprocessor: records the second moments at each linear's input, per block.

    Runs the (still full-precision) block on the first ``max_samples`` sequences of its quantized-path
    inputs with forward hooks; :meth:`pop` hands the moments to the quantizer of that block once.

    Args:
        max_samples: sequences used (the diagonal of a few thousand tokens is stable; the full matrix
            of a 1536-wide input wants more, hence the larger default when ``full``).
        batch_size: sequences per forward.
        full: record ``E[x x^T]`` (``[in, in]``) instead of its diagonal ``E[x_j^2]`` (``[in]``).
        sequential: keep the block's inputs so that :meth:`stages` can measure the later stages again on
            the partly quantized block.
    """

    def __init__(
        self, max_samples: int | None = None, batch_size: int = 8, full: bool = False, sequential: bool = False
    ) -> None:
        self.max_samples = max_samples if max_samples is not None else (128 if full else 16)
        self.batch_size = batch_size
        self.full = full
        self.sequential = sequential
        self._moments: dict[int, dict[str, torch.Tensor]] = {}
        #: per block: its linears grouped by shared input, in the order the forward calls them
        self._stages: dict[int, list[list[str]]] = {}
        #: per block (sequential mode): the inputs and kwargs the moments were measured on
        self._inputs: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

    @torch.no_grad()
    def __call__(self, index: int, block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, float]:
        inputs = inputs[: self.max_samples]
        # sequential: the later stages' matrices are measured again anyway; here only their diagonals (for
        # the statistic), which saves the largest product (down_proj's [in, in]) of every block
        moments, stages = self.measure(block, inputs, kwargs, first_stage_only=self.sequential)
        self._moments[index] = moments
        self._stages[index] = stages
        if self.sequential:  # a copy: the caller may release the cache the inputs live in
            self._inputs[index] = (inputs.clone(), kwargs)
        diagonals = [torch.diagonal(m) if m.dim() == 2 else m for m in moments.values()]
        peak = max(float(d.max() / d.mean().clamp(min=1e-30)) for d in diagonals)
        return {"preprocess/input_moment_peak_to_mean": peak}

    @torch.no_grad()
    def measure(
        self, block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], names: set[str] | None = None,
        first_stage_only: bool = False,
    ) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
        """Moments of the block's ``nn.Linear`` inputs (those in ``names``, or all), averaged over every DDP
        rank, and the linears grouped into stages: consecutive calls on one input tensor form a stage.

        ``first_stage_only``: full matrices (when ``full``) for the first stage only, diagonals for the rest.
        """
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        last: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, its moment): q/k/v and gate/up share one
        stages: list[list[str]] = []

        def record(name: str, x: torch.Tensor) -> None:
            if last and last[0][0].data_ptr() == x.data_ptr() and last[0][0].shape == x.shape:
                moment = last[0][1]  # the held reference keeps the address from being reused
                if not any(name in stage for stage in stages):  # first batch: joins the stage of its input
                    stages[-1].append(name)
            else:
                if not any(name in stage for stage in stages):
                    stages.append([name])
                # the full matrix multiplies in float32 (a float64 GEMM is several times slower on CPU) and
                # is summed over batches in float64
                matrix = self.full and not (first_stage_only and name not in stages[0])
                moment = (x.float().T @ x.float()).double() if matrix else x.double().pow(2).sum(dim=0)
                last[:] = [(x, moment)]
            sums[name] = sums.get(name, 0) + moment.cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]

        linears = [(name, linear) for name, linear in DecoderAdapter.block_linears(block) if names is None or name in names]
        observe_linear_inputs(block, linears, inputs, kwargs, self.batch_size, record)
        stages = merge_expert_stages(stages)  # a mixture of experts: one stage per kind of expert projection
        for name in sorted(sums):  # one statistic for all DDP ranks (sorted: every rank reduces in one order)
            all_reduce_(sums[name])
            counts[name] = int(all_reduce_(torch.tensor([counts[name]], dtype=torch.float64))[0])
        return {name: (sums[name] / counts[name]).float() for name in sums}, stages

    def pop(self, index: int) -> dict[str, torch.Tensor] | None:
        """The moments recorded for block ``index`` by linear name (forgotten afterwards), or None."""
        self._stages.pop(index, None)
        self._inputs.pop(index, None)
        return self._moments.pop(index, None)

    def stages(self, index: int, block: nn.Module) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """Block ``index``'s stages in forward order, each with its linears' moments (forgotten afterwards).

        The caller quantizes each stage before asking for the next: in sequential mode every stage after the
        first is measured then, on the block as it is (the earlier stages quantized); otherwise all come from
        the one full-precision pass of :meth:`__call__`.
        """
        moments = self._moments.pop(index)
        stages = self._stages.pop(index)
        inputs = self._inputs.pop(index, None)
        for position, names in enumerate(stages):
            if position > 0 and inputs is not None:
                moments, _ = self.measure(block, inputs[0], inputs[1], set(names))
            yield names, {name: moments[name] for name in names}

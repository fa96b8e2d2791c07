"""Layer-wise mixed precision: a sensitivity pass and an allocation under an average-bits budget.

Why: at 2 bits a few layers carry most of the damage. Giving them 3 or 4 bits and the insensitive ones 2
buys far more accuracy per bit than raising every layer uniformly.

**Sensitivity.** Each linear's output error at each candidate bit-width, on the calibration data:
``E_x ||(W - Q_b(W)) x||^2 = tr(E H E^T)`` with ``E = W - Q_b(W)`` and ``H = E[x x^T]`` measured on the
full-precision model's own inputs to that layer (block by block, the model is run in full precision). ``Q_b``
is the run's starting quantizer at ``b`` bits (same group size and symmetry; the clip search when the recipe
uses one), i.e. what the window's fit starts from.

**Groups.** Linears that read one input tensor (q/k/v, gate/up: found from a forward, not from names) are
fused into one GEMM by serving kernels, which need one scheme for the fused weight; they form one group
and get one bit-width.

**Allocation.** Minimise the summed output error subject to ``sum(bits * weights) <= budget * all weights``:
a multiple-choice knapsack, solved exactly by dynamic programming over the groups' weight counts (in units
of their greatest common divisor, coarsened to at most :data:`MAX_UNITS` units; costs are rounded *up*, so
the budget always holds). The result is written as per-layer overrides (``extensions.layer_bits``) that the rest
of the pipeline honours, so an allocation can be saved, edited and replayed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # the configuration imports this module's MixedPrecisionConfig
    from cbq_lightning.config import QuantizeConfig

from cbq_lightning.errors import ConfigError
from cbq_lightning.models.adapter import BlockKwargs, DecoderAdapter, run_blocks_batched
from cbq_lightning.quant.convert import all_block_linears
from cbq_lightning.quant.input_moments import InputMoments
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.quant.weight_quantizer import ClipSearch, build_weight_quantizer
from cbq_lightning.section_types import check_field_types

#: the knapsack's capacity is kept below this many units (coarser units round every cost up)
MAX_UNITS = 20_000


@dataclass
class MixedPrecisionConfig:
    """The ``mixed:`` section: mixed precision by sensitivity under an average-bits budget (an extension; null:
    every layer at the scheme's bits, unless ``extensions.layer_bits`` says otherwise).

    Attributes:
        budget: average weight bits over all quantized linears (e.g. 2.5). Group scales are not counted:
            they cost the same at every bit-width of a given group size.
        candidates: bit-widths a layer may get.
        samples: calibration sequences the sensitivity pass runs on (its Hessians average their tokens).
    """

    budget: float
    candidates: list[int] = field(default_factory=lambda: [2, 3, 4])
    samples: int = 8

    def __post_init__(self) -> None:
        check_field_types(self, "mixed")
        if not self.candidates or any(not 2 <= b <= 8 for b in self.candidates):
            raise ConfigError(f"extensions.mixed.candidates={self.candidates}: give bit-widths in 2..8.")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"extensions.mixed.candidates={self.candidates} repeats a bit-width.")
        if not min(self.candidates) <= self.budget <= max(self.candidates):
            raise ConfigError(
                f"extensions.mixed.budget={self.budget} must lie between the smallest and largest of extensions.mixed.candidates "
                f"({min(self.candidates)}..{max(self.candidates)}): no allocation can average anything else."
            )
        if self.samples < 1:
            raise ConfigError(f"extensions.mixed.samples={self.samples} must be >= 1.")


@dataclass
class GroupSensitivity:
    """One group of linears that must share a bit-width, with its output error at each candidate.

    Attributes:
        names: the layers, as ``blocks.<index>.<name in the block>``.
        weights: their weight count.
        errors: bit-width -> summed ``E_x ||(W - Q_b(W)) x||^2`` of the group's layers.
    """

    names: list[str]
    weights: int
    errors: dict[int, float]


def layer_output_error(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, clip_search: ClipSearch | None
) -> float:
    """``tr(E H E^T)`` for ``E = W - Q(W)``: the layer's mean squared output error per token, summed over outputs."""
    weight = weight.detach().float()
    hessian = hessian.to(weight.device, torch.float32)
    quantizer = build_weight_quantizer(
        weight, scheme, learnable_clip=clip_search is not None, clip_init=0.99 if clip_search is not None else 1.0,
    ).to(weight.device)
    if clip_search is not None:
        quantizer.search_clip(weight, clip_search, torch.diagonal(hessian))
    with torch.no_grad():
        error = weight - quantizer.fake_quantize(weight)
        return float(((error @ hessian) * error).sum())


def fused_groups(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]) -> list[list[str]]:
    """The block's linears grouped by shared input (one forward of one sequence), in forward order."""
    _, stages = InputMoments(max_samples=1, batch_size=1).measure(block, inputs[:1], kwargs)
    return stages


@torch.no_grad()
def measure_sensitivity(
    blocks: nn.ModuleList,
    inputs: torch.Tensor,
    kwargs: BlockKwargs,
    scheme: QuantScheme,
    candidates: list[int],
    clip_search: ClipSearch | None,
    device: torch.device | str,
    batch_size: int = 8,
    progress: bool = False,
) -> list[GroupSensitivity]:
    """Run the full-precision model block by block on ``inputs`` and measure every group at every candidate."""
    from tqdm.auto import tqdm

    groups: list[GroupSensitivity] = []
    hidden = inputs
    for index, block in enumerate(tqdm(blocks, desc="sensitivity", unit="block", disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        moments, stages = InputMoments(max_samples=hidden.shape[0], batch_size=batch_size, full=True).measure(
            block, hidden, kwargs[index]
        )
        linears = dict(DecoderAdapter.block_linears(block))
        for stage in stages:
            errors = {
                bits: sum(
                    layer_output_error(linears[name].weight, moments[name], replace(scheme, w_bits=bits), clip_search)
                    for name in stage
                )
                for bits in candidates
            }
            weights = sum(linears[name].weight.numel() for name in stage)
            groups.append(GroupSensitivity([f"blocks.{index}.{name}" for name in stage], weights, errors))
        if index + 1 < len(blocks):
            hidden = run_blocks_batched([block], hidden, kwargs[index], device, batch_size)
        block.to(home)
    return groups


def allocate(groups: list[GroupSensitivity], candidates: list[int], budget: float) -> dict[str, int]:
    """The least-error bit-width per layer whose weighted average is at most ``budget`` (see the module doc)."""
    candidates = sorted(candidates)
    total = sum(g.weights for g in groups)
    unit = math.gcd(*(g.weights for g in groups))
    unit = max(unit, math.ceil(total * max(candidates) / MAX_UNITS))
    capacity = math.floor(budget * total / unit + 1e-9)
    costs = [[math.ceil(g.weights * bits / unit) for bits in candidates] for g in groups]
    if sum(min(c) for c in costs) > capacity:
        raise ConfigError(
            f"extensions.mixed.budget={budget} is too small once costs are rounded to {unit}-weight units: raise it a little "
            f"(every layer at {candidates[0]} bits already averages {candidates[0]})."
        )
    infinity = float("inf")
    best = torch.full((capacity + 1,), infinity, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for group, group_costs in zip(groups, costs, strict=True):
        options = torch.full((len(candidates), capacity + 1), infinity, dtype=torch.float64)
        for k, (bits, cost) in enumerate(zip(candidates, group_costs, strict=True)):
            if cost <= capacity:
                options[k, cost:] = best[: capacity + 1 - cost] + group.errors[bits]
        best, choice = options.min(dim=0)
        choices.append(choice)
    spent = int(torch.argmin(best))
    allocation: dict[str, int] = {}
    for group, group_costs, choice in zip(reversed(groups), reversed(costs), reversed(choices), strict=True):
        k = int(choice[spent])
        for name in group.names:
            allocation[name] = candidates[k]
        spent -= group_costs[k]
    return allocation


def average_bits(weights: dict[str, int], layer_bits: dict[str, int]) -> float:
    """Weight-count-weighted mean bit-width (``weights``: layer -> weight count; ``layer_bits``: layer -> bits)."""
    return sum(weights[name] * layer_bits[name] for name in weights) / sum(weights.values())


def check_layer_bits(
    layer_bits: dict[str, int], names: list[str], groups: list[list[str]], num_blocks: int
) -> None:
    """Refuse overrides that name no layer, have impossible bits, or split a fused group.

    ``names``: every quantized linear (``blocks.<i>.<name>``); ``groups``: block 0's fused groups by name
    in the block (the same in every block).
    """
    known = set(names)
    unknown = sorted(set(layer_bits) - known)
    if unknown:
        raise ConfigError(
            f"extensions.layer_bits names {', '.join(unknown[:3])}, which is not a quantized layer: use names like "
            f"{', '.join(names[:3])} (blocks.<index>.<name in the block>)."
        )
    for name, bits in layer_bits.items():
        if not 2 <= int(bits) <= 8:
            raise ConfigError(f"extensions.layer_bits[{name!r}]={bits} is out of range: use 2..8.")
    for index in range(num_blocks):
        for group in groups:
            full = [f"blocks.{index}.{name}" for name in group]
            overridden = [name for name in full if name in layer_bits]
            if overridden and (len(overridden) < len(full) or len({layer_bits[n] for n in overridden}) > 1):
                raise ConfigError(
                    f"extensions.layer_bits gives {', '.join(full)} different bit-widths: they read one input and "
                    "serving kernels fuse them into one GEMM with one scheme. Name all of them, with the same bits."
                )


log = logging.getLogger("cbq_lightning")

def run_layer_bits(
    config: QuantizeConfig,
    adapter: DecoderAdapter,
    inputs: torch.Tensor,
    block_kwargs: BlockKwargs,
    scheme: QuantScheme,
    clip_search: ClipSearch | None,
    device: torch.device,
) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Per-layer weight bits (``blocks.<i>.<name>`` -> bits) and their summary for the report, or ``({}, None)``.

    With ``extensions.mixed.budget``: a sensitivity pass on the full-precision model and the allocation under the budget;
    with ``extensions.layer_bits``: those overrides, checked against the model's layers and fused groups.
    """
    mixed, given_bits = config.extensions.mixed, config.extensions.layer_bits
    if mixed is None and not given_bits:
        return {}, None
    weights = {name: linear.weight.numel() for name, linear in all_block_linears(adapter.blocks)}
    sensitivity = None
    if mixed is not None:
        groups = measure_sensitivity(
            adapter.blocks, inputs[: mixed.samples], block_kwargs, scheme, mixed.candidates, clip_search, device,
            config.advanced.train.forward_batch_size, progress=config.advanced.trainer.enable_progress_bar,
        )
        layer_bits = allocate(groups, mixed.candidates, mixed.budget)
        sensitivity = [{"layers": g.names, "weights": g.weights, "errors": {str(b): e for b, e in g.errors.items()}}
                       for g in groups]
    else:
        layer_bits = {name: int(bits) for name, bits in given_bits.items()}
        check_layer_bits(layer_bits, list(weights), fused_groups(adapter.blocks[0], inputs, block_kwargs[0]),
                         adapter.num_blocks)
    full_bits = {name: layer_bits.get(name, scheme.w_bits) for name in weights}
    achieved = average_bits(weights, full_bits)
    counts = {str(b): sum(1 for v in full_bits.values() if v == b) for b in sorted(set(full_bits.values()))}
    summary = {
        "budget": None if mixed is None else mixed.budget,
        "average_bits": achieved,
        "layers_per_bits": counts,
        "layer_bits": full_bits,
        **({"sensitivity": sensitivity} if sensitivity is not None else {}),
    }
    log.info("mixed precision: %.3f average weight bits (%s layers per bit-width)", achieved, counts)
    return full_bits, summary


def log_layer_bits(logger: Any, layer_bits: dict[str, int]) -> None:
    """One TensorBoard chart per layer (name in the block): its bits along the depth of the model."""
    for name, bits in layer_bits.items():
        _, index, inner = name.split(".", 2)
        logger.log_metrics({f"mixed_precision/bits/{inner}": float(bits)}, step=int(index))


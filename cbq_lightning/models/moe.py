"""Mixture-of-experts blocks as CBQ sees them: every expert a set of ``nn.Linear``, the router in full precision.

transformers 5 stores the experts of Qwen2-MoE, Qwen3-MoE and Mixtral as two fused 3-D parameters per block
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) with no ``nn.Linear`` inside, so a
quantizer that looks for linears silently skips them: the most common MoE failure in PTQ tools. Here the
fused module is replaced, once, by :class:`UnfusedExperts`: one :class:`ExpertMLP` per expert with the
checkpoint's own per-expert names (``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj``; Mixtral's ``w1``
/ ``w3`` / ``w2``). It computes exactly what the fused module computes, every part of CBQ (GPTQ, the clip
search, CFP's statistics, LoRA-Rounding, finalisation, quant state) then treats each expert like any linear,
and the fake-quant checkpoint and the compressed-tensors export carry per-expert tensors under the names
transformers' loader already converts back into its fused layout.

Calibration statistics and routing: with the real routing an expert sees only the tokens routed to it, and a
rarely chosen expert gets a Hessian from a handful of tokens (or none). While statistics are gathered
(:func:`route_all_tokens`, used by :func:`~cbq_lightning.models.adapter.observe_linear_inputs`), every
expert runs on *all* tokens, so its input statistics describe the distribution it may be routed, and only
the routed tokens' outputs are added to the block's output, which therefore stays exactly the model's. The
reconstruction loss is always trained with the real routing. When a block is finalised, the tokens its
router sends to each expert on the calibration inputs are counted (:func:`count_routed_tokens`, reported per
block in ``report.json``): an expert that no token reaches was calibrated by its statistics alone.

Routers (``mlp.gate``) and shared-expert gates (Qwen2-MoE's ``shared_expert_gate``, an ``nn.Linear(H, 1)``)
stay in full precision: they are tiny, and a rounding error there moves tokens between experts.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cbq_lightning.distributed import all_reduce_
from cbq_lightning.errors import ModelSourceError

#: attribute marking a linear that CBQ leaves in full precision (routers, shared-expert gates)
KEEP_FULL_PRECISION = "_cbq_keep_full_precision"


@dataclass(frozen=True)
class ExpertLayout:
    """How one family names an expert's three projections in its checkpoints, and what stays unquantized.

    ``gate`` / ``up`` / ``down``: the per-expert linear names (``gate_up_proj``'s first half is ``gate``).
    ``full_precision``: dotted names inside a block of linears CBQ must not quantize.
    """

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    full_precision: tuple[str, ...] = ("mlp.gate", "mlp.shared_expert_gate")


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with its projections as plain linears."""

    def __init__(self, layout: ExpertLayout, hidden: int, intermediate: int, act_fn: nn.Module,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.names = (layout.gate, layout.up, layout.down)
        for name, (inputs, outputs) in zip(self.names, ((hidden, intermediate),) * 2 + ((intermediate, hidden),),
                                           strict=True):
            self.add_module(name, nn.Linear(inputs, outputs, bias=False, dtype=dtype, device=device))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in replacement of a fused experts module (same call: ``(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``), one :class:`ExpertMLP` per expert.

    A ``ModuleList`` so that the experts' names are ``experts.<e>.<projection>``, the checkpoints' names.
    """

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        #: statistics mode (see the module docstring): every expert runs on every token
        self.route_all = False
        #: while set, ``routed_tokens`` adds up the (token, slot) assignments of each expert
        self.counting = False
        self.register_buffer("routed_tokens", torch.zeros(len(experts), dtype=torch.long), persistent=False)

    @classmethod
    def from_fused(cls, fused: nn.Module, layout: ExpertLayout) -> UnfusedExperts:
        """The experts of ``fused`` (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) as linears, same weights."""
        gate_up, down = fused.gate_up_proj, fused.down_proj
        count, double, hidden = gate_up.shape
        intermediate = double // 2
        if down.shape != (count, hidden, intermediate) or double % 2:
            raise ModelSourceError(
                f"{type(fused).__name__} has gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)}, "
                "not the [E, 2I, H] / [E, H, I] layout cbq-lightning unfuses; this MoE variant is not supported yet."
            )
        experts = []
        for index in range(count):
            expert = ExpertMLP(layout, hidden, intermediate, fused.act_fn, gate_up.dtype, gate_up.device)
            gate, up, out = (getattr(expert, name) for name in expert.names)
            if not gate_up.is_meta:  # on the meta device (an export reading names and shapes) nothing to copy
                with torch.no_grad():
                    gate.weight.copy_(gate_up[index, :intermediate])
                    up.weight.copy_(gate_up[index, intermediate:])
                    out.weight.copy_(down[index])
            expert.requires_grad_(gate_up.requires_grad)
            experts.append(expert)
        return cls(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [E, k, T]: which (slot, token) pairs each expert was chosen for
            chosen = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            if self.counting:
                self.routed_tokens += chosen.sum(dim=(1, 2)).to(self.routed_tokens.device)
        for index, expert in enumerate(self):
            slot, token = torch.where(chosen[index])
            if self.route_all:  # one expert's activations at a time: memory of a dense MLP, not of E of them
                result = expert(hidden_states)[token]
            elif token.numel() == 0:
                continue
            else:
                result = expert(hidden_states[token])
            weights = top_k_weights[token, slot, None]
            output.index_add_(0, token, (result * weights).to(output.dtype))
        return output


#: an expert's index inside a linear's dotted name (``mlp.experts.17.down_proj``)
_EXPERT_INDEX = re.compile(r"(?<=experts\.)\d+(?=\.)")


def merge_expert_stages(stages: list[list[str]]) -> list[list[str]]:
    """GPTQ's true-sequential stages of a block with every expert's projections of one kind in one stage.

    Measured in forward order, each expert forms its own stages (its ``gate``/``up`` read the block's hidden
    state, its ``down`` its own activation), so a block of E experts would be measured 2E times. The experts
    are parallel: an expert's ``down`` depends only on its own ``gate``/``up``, so once every expert's
    ``gate``/``up`` is quantized all ``down`` projections can be measured in one pass. Stages whose names
    differ only in the expert index are merged at the place of the first.
    """
    merged: list[list[str]] = []
    by_kind: dict[tuple[str, ...], list[str]] = {}
    for stage in stages:
        kind = tuple(sorted({_EXPERT_INDEX.sub("*", name) for name in stage}))
        if not any("experts.*." in name for name in kind):
            merged.append(list(stage))
            continue
        if kind not in by_kind:
            by_kind[kind] = []
            merged.append(by_kind[kind])
        by_kind[kind].extend(stage)
    return merged


def _fused_experts(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in block.named_modules():
        parameters = dict(module.named_parameters(recurse=False))
        if "gate_up_proj" in parameters and "down_proj" in parameters and parameters["gate_up_proj"].dim() == 3:
            yield name, module


def unfuse_experts(blocks: nn.ModuleList, layout: ExpertLayout) -> int:
    """Replace every fused experts module in ``blocks`` by :class:`UnfusedExperts` (in place) and mark the
    routers and shared-expert gates as full precision; returns how many modules were unfused."""
    count = 0
    for block in blocks:
        for name, fused in list(_fused_experts(block)):
            if getattr(fused, "has_bias", False) or hasattr(fused, "gate_up_proj_bias"):
                raise ModelSourceError(
                    f"{type(fused).__name__} has expert biases, which cbq-lightning does not unfuse yet; this MoE "
                    "variant is not supported."
                )
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, UnfusedExperts.from_fused(fused, layout))
            count += 1
        for name in layout.full_precision:
            try:
                module = block.get_submodule(name)
            except AttributeError:
                continue
            setattr(module, KEEP_FULL_PRECISION, True)
    return count


def keeps_full_precision(module: nn.Module) -> bool:
    """Whether CBQ must leave this linear unquantized (a router or shared-expert gate of an MoE block)."""
    return bool(getattr(module, KEEP_FULL_PRECISION, False))


def _experts_of(block: nn.Module) -> list[UnfusedExperts]:
    return [module for module in block.modules() if isinstance(module, UnfusedExperts)]


@contextlib.contextmanager
def route_all_tokens(block: nn.Module) -> Iterator[None]:
    """Within the context every expert of ``block`` runs on all tokens (for statistics; the block's output is
    unchanged). A no-op for a block without experts."""
    experts = _experts_of(block)
    for module in experts:
        module.route_all = True
    try:
        yield
    finally:
        for module in experts:
            module.route_all = False


@contextlib.contextmanager
def count_routed_tokens(block: nn.Module) -> Iterator[list[int]]:
    """Count, over the forward passes inside the context, the tokens ``block``'s router sends to each expert;
    the list yielded is filled on exit (summed over DDP ranks; empty for a block without experts, and for a
    block with several expert modules, their counts one after the other)."""
    experts = _experts_of(block)
    for module in experts:
        module.routed_tokens.zero_()
        module.counting = True
    counts: list[int] = []
    try:
        yield counts
    finally:
        for module in experts:
            module.counting = False
            counts += [int(count) for count in all_reduce_(module.routed_tokens)]

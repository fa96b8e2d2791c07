"""Where each supported decoder family keeps its blocks, its final norm, and its exact scaling pairs.

Everything CBQ does to a block is generic (it finds the ``nn.Linear`` modules and replays the block call
with the kwargs the model itself passed); what is *not* generic is knowing which norm feeds which linears,
which linear feeds which through an elementwise product only, and how each norm applies its weight. Those
facts decide whether CFP's channel scaling (and later rotations) can be folded into the weights exactly, so
they are declared here, one small table entry per family, and checked against the model on use: a pair
whose modules are missing is an error naming the switch that avoids it, never a silent skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbq_lightning.errors import ModelSourceError
from cbq_lightning.models.moe import ExpertLayout


@dataclass(frozen=True)
class NormPair:
    """A norm whose output only the listed linears read: a per-channel scale folds into the norm exactly."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class LinearPair:
    """A producer linear whose output channels the consumer reads through elementwise operations that commute
    with a positive per-channel scale (a gate product, or a ReLU: ``relu(z / s) = relu(z) / s`` for ``s > 0``).

    ``producer_half``: the producer is a fused ``[gate; up]`` projection (Phi-3's ``gate_up_proj``) and only
    its second half of output rows (``up``) is the consumer's input; ``None``: all rows.
    """

    producer: str
    consumer: str
    producer_half: int | None = None


@dataclass(frozen=True)
class RotationLayout:
    """Where an orthogonal rotation of the residual stream leaves a block, and the per-head value path.

    The linears that *read* the residual stream are the norm pairs' linears (the norms' scales are folded into
    them first, so each norm is a bare RMS normalisation that commutes with a rotation); ``writers`` add their
    output to it. ``value``/``output``: the per-head rotation sits between them. ``down``: the linear whose
    input gets the online rotation.
    """

    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    value: str = "self_attn.v_proj"
    output: str = "self_attn.o_proj"
    down: str = "mlp.down_proj"


@dataclass(frozen=True)
class FamilyLayout:
    """One decoder family's layout as CBQ needs it.

    Attributes:
        model_types: the ``config.model_type`` values it covers.
        blocks: dotted path of the ``nn.ModuleList`` of decoder blocks in the causal LM.
        final_norm: dotted path of the norm after the last block.
        after_norm: dotted paths of modules between the final norm and the LM head (OPT's ``project_out``).
        norm_offset: the norm multiplies by ``norm_offset + weight`` (Gemma: 1), so a fold must keep that sum.
        norm_pairs / linear_pairs: the exact scaling pairs of a block (empty where the family has none).
        not_folded: what has no exact pair in this layout, and why (stated in ``report.json``).
        logit_softcap: config attribute of a ``tanh`` soft-cap on the logits (Gemma 2), or None.
        pre_norm: config attribute that must be true for the norm pairs to exist (OPT-350m normalises after
            each sub-layer, so its norms feed the residual stream, not the linears).
        logits_divisor: config attribute the logits are divided by (Granite's ``logits_scaling``), or None.
        experts: mixture-of-experts families: how the experts are named once unfused
            (:mod:`cbq_lightning.models.moe`); None for dense families.
        rotation: where rotations fold in this family (:mod:`cbq_lightning.rotation`); None where they cannot
            be folded exactly (norms after sub-layers, LayerNorm's mean, fused projections, experts).
    """

    model_types: tuple[str, ...]
    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    after_norm: tuple[str, ...] = ()
    norm_offset: float = 0.0
    norm_pairs: tuple[NormPair, ...] = ()
    linear_pairs: tuple[LinearPair, ...] = ()
    not_folded: tuple[str, ...] = ()
    logit_softcap: str | None = None
    pre_norm: str | None = None
    logits_divisor: str | None = None
    experts: ExpertLayout | None = None
    #: ``(module path part, checkpoint name part)``: where transformers saves a module under another name
    #: than the model's (Mixtral's experts live in ``mlp`` and are saved under ``block_sparse_moe``)
    saved_as: tuple[tuple[str, str], ...] = ()
    rotation: RotationLayout | None = None


_LLAMA_NORMS = (
    NormPair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    NormPair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_GATED_MLP = (LinearPair("mlp.up_proj", "mlp.down_proj"),)
_GEMMA_NORMS = (
    NormPair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    NormPair("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
#: what CFP cannot fold in a mixture-of-experts block
_MOE_NOT_FOLDED = (
    "post_attention_layernorm -> experts: the router reads the same features (its weight would need the inverse "
    "scale)",
    "expert up -> down: not folded per expert yet",
)

#: the families CBQ has been checked on, in the order the README lists them
FAMILIES: tuple[FamilyLayout, ...] = (
    # LLaMA layout: pre-norm RMSNorm before attention and the gated MLP. Granite adds scalar multipliers
    # inside the block and on the logits; they act on whole tensors, so the pairs stay exact.
    FamilyLayout(("llama", "mistral", "qwen2", "qwen3"), norm_pairs=_LLAMA_NORMS, linear_pairs=_GATED_MLP,
                 rotation=RotationLayout()),
    FamilyLayout(("granite",), norm_pairs=_LLAMA_NORMS, linear_pairs=_GATED_MLP, logits_divisor="logits_scaling",
                 rotation=RotationLayout()),
    # Gemma 2 / 3: RMSNorm computes x_hat * (1 + weight); a norm before and after each sub-layer (the "post"
    # norms act on the sub-layer's output, which feeds the residual stream, not a linear)
    FamilyLayout(
        ("gemma2", "gemma3_text"), norm_offset=1.0, norm_pairs=_GEMMA_NORMS, linear_pairs=_GATED_MLP,
        not_folded=("post_attention_layernorm, post_feedforward_layernorm: they normalise sub-layer outputs",),
        logit_softcap="final_logit_softcapping",
    ),
    # Phi-3: fused qkv_proj and gate_up_proj ([gate; up] rows)
    FamilyLayout(
        ("phi3",),
        norm_pairs=(NormPair("input_layernorm", ("self_attn.qkv_proj",)),
                    NormPair("post_attention_layernorm", ("mlp.gate_up_proj",))),
        linear_pairs=(LinearPair("mlp.gate_up_proj", "mlp.down_proj", producer_half=1),),
    ),
    # OLMo 2: RMSNorm only after each sub-layer (and QK-norm over the whole projection): no norm feeds a linear
    FamilyLayout(
        ("olmo2",), linear_pairs=_GATED_MLP,
        not_folded=("norm -> linear: OLMo 2 normalises sub-layer outputs only (no pre-norm)",),
    ),
    # OPT: LayerNorm with bias (folding divides both), biased fc1 -> ReLU -> fc2
    FamilyLayout(
        ("opt",), blocks="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
        after_norm=("model.decoder.project_out",),
        norm_pairs=(NormPair("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                    NormPair("final_layer_norm", ("fc1",))),
        linear_pairs=(LinearPair("fc1", "fc2"),),
        pre_norm="do_layer_norm_before",
    ),
    # Mixture of experts: the LLaMA attention, and an MLP of E experts (fused 3-D weights in transformers 5,
    # unfused for CBQ) chosen per token by a router. The router reads the post-attention norm's output too,
    # so that norm has no exact pair with the experts alone.
    FamilyLayout(
        ("qwen2_moe", "qwen3_moe"), norm_pairs=_LLAMA_NORMS[:1], experts=ExpertLayout(),
        not_folded=_MOE_NOT_FOLDED,
    ),
    FamilyLayout(
        ("mixtral",), norm_pairs=_LLAMA_NORMS[:1], experts=ExpertLayout(gate="w1", up="w3", down="w2"),
        not_folded=_MOE_NOT_FOLDED, saved_as=((".mlp.", ".block_sparse_moe."),),
    ),
)

#: every model type some family covers
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for family in FAMILIES for t in family.model_types)

#: what is refused, and why, for the types users ask for most (the generic message covers the rest)
_REFUSED = {
    "gemma3": "this is Gemma 3's multimodal wrapper; load its text model (model type gemma3_text)",
}


def _layout_of(model_type: str | None) -> FamilyLayout | None:
    """The layout covering ``model_type``, or None."""
    return next((family for family in FAMILIES if model_type in family.model_types), None)


def family_for(model_type: str) -> FamilyLayout:
    """The layout of ``model_type``, or a one-line error naming what is missing and what is supported."""
    family = _layout_of(model_type)
    if family is not None:
        return family
    reason = _REFUSED.get(model_type, "its block layout has not been checked")
    raise ModelSourceError(
        f"model type {model_type!r} is not supported yet ({reason}): cbq-lightning handles "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use a model of one of these types or open an issue for it."
    )


def has_experts(model_type: str | None) -> bool:
    """Whether ``model_type`` is a mixture-of-experts family CBQ supports (its experts are unfused for CBQ and
    stored per expert in its outputs)."""
    family = _layout_of(model_type)
    return family is not None and family.experts is not None


def checkpoint_name(model_type: str | None, module_name: str) -> str:
    """The name under which transformers' ``save_pretrained`` stores ``module_name`` of a ``model_type`` model
    (the same name but for the family's ``saved_as`` renames): a packed export must use the checkpoint's
    names, which the loader maps back to modules."""
    family = _layout_of(model_type)
    for module_part, saved_part in family.saved_as if family is not None else ():
        module_name = module_name.replace(module_part, saved_part)
    return module_name


def norm_pairs(family: FamilyLayout, config: Any) -> tuple[NormPair, ...]:
    """The family's norm pairs for this model config (none where the config normalises after sub-layers)."""
    if family.pre_norm is not None and not getattr(config, family.pre_norm, True):
        return ()
    return family.norm_pairs


class LogitTransform(nn.Module):
    """What a family's causal LM does to the LM head's output before it is a distribution: Gemma 2's soft-cap
    ``cap * tanh(logits / cap)`` and Granite's division by ``logits_scaling``. The output head must apply it,
    or the last window's next-token KL would match logits the model never produces."""

    def __init__(self, softcap: float | None, divisor: float | None) -> None:
        super().__init__()
        self.softcap = softcap
        self.divisor = divisor

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

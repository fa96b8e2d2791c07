"""Turn the linears of a block into calibrating :class:`QuantLinear` layers, finalise them into
:class:`FinalizedQuantLinear` layers, and walk either kind."""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.models.adapter import DecoderAdapter, replace_module
from cbq_lightning.quant.act_quantizer import ActQuantSettings
from cbq_lightning.quant.correction import CorrectionConfig
from cbq_lightning.quant.qlinear import FinalizedQuantLinear, LayerQuantConfig, QuantLinear
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import QuantScheme, valid_group_sizes


def all_block_linears(blocks: nn.ModuleList) -> Iterator[tuple[str, nn.Linear]]:
    """Every linear of every block, named ``blocks.<index>.<name>``."""
    for index, block in enumerate(blocks):
        for name, linear in DecoderAdapter.block_linears(block):
            yield f"blocks.{index}.{name}", linear


def check_group_size(blocks: nn.ModuleList, scheme: QuantScheme) -> None:
    """Fail early, naming the layer, when the group size does not divide a linear's in_features."""
    if scheme.group_size is None or scheme.gguf_mix is not None:
        return  # a llama.cpp mix gives each layer a type its rows fit (cbq_lightning.export.gguf_plan)
    linears = list(all_block_linears(blocks))
    for name, linear in linears:
        if linear.in_features % scheme.group_size and scheme.gguf_type is not None:
            raise ConfigError(
                f"{scheme.gguf_type} stores blocks of {scheme.group_size} weights along each row, and layer {name} "
                f"has in_features={linear.in_features}, not a multiple of {scheme.group_size}: this model has no "
                f"{scheme.gguf_type} form: quantize with one of llama.cpp's mixes (e.g. Q4_K_M), which falls back to "
                "another type for such layers as llama.cpp does."
            )
        if linear.in_features % scheme.group_size:
            sizes = {lin.in_features for _, lin in linears}
            common = sorted(set.intersection(*(set(valid_group_sizes(n)) for n in sizes)))
            raise ConfigError(
                f"group_size={scheme.group_size} does not divide in_features={linear.in_features} of "
                f"layer {name}: use a group size that divides every layer's in_features "
                f"(valid here: {', '.join(map(str, common)) or 'none - use per-channel (-1)'}), or -1 "
                "for per-channel."
            )


def narrow_layers(blocks: nn.ModuleList, rounding: RoundingConfig) -> dict[str, int]:
    """``{layer: rank}`` for the linears too narrow for ``rounding.rank`` (:meth:`RoundingConfig.rank_for`
    gives them half their smaller dimension); empty when the rank fits every layer or nothing is low-rank."""
    if not rounding.enabled or rounding.form == "offset":  # the offset form is full-rank by design
        return {}
    ranks = {name: rounding.rank_for(lin.out_features, lin.in_features) for name, lin in all_block_linears(blocks)}
    return {name: rank for name, rank in ranks.items() if rank != rounding.rank}


def check_correction_rank(blocks: nn.ModuleList, correction: CorrectionConfig | None) -> None:
    """Fail early, naming the layer, when the low-rank correction's rank is not below a linear's smaller dimension."""
    if correction is None:
        return
    for name, linear in all_block_linears(blocks):
        try:
            correction.rank_for(linear.out_features, linear.in_features)
        except ConfigError as error:
            raise ConfigError(f"layer {name}: {error}") from None


def quantize_block(
    block: nn.Module,
    config: LayerQuantConfig,
    generator: torch.Generator | None = None,
    input_moments: dict[str, torch.Tensor] | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
    names: Collection[str] | None = None,
    layer_schemes: dict[str, QuantScheme] | None = None,
) -> None:
    """Replace every linear of ``block`` (or those in ``names``) by a calibrating :class:`QuantLinear` (in place),
    each quantized as ``config`` says.

    ``input_moments`` maps a linear's name in the block to ``E[x_j^2]`` of its inputs (activation-aware clip
    search); ``hessians`` (name -> ``E[x x^T]``) feed ``config.gptq``. ``names`` lets GPTQ quantize a block
    stage by stage; the layers are built in the block's order either way, so the random draws are the same.
    ``layer_schemes`` (name in the block -> scheme) overrides the scheme per layer (mixed precision's bits, a
    llama.cpp mix's GGML types).
    """

    def factory(name: str, linear: nn.Linear) -> nn.Module:
        if names is not None and name not in names:
            return linear
        moments = input_moments.get(name) if input_moments else None
        hessian = hessians.get(name) if hessians else None
        layer_config = config.with_scheme(layer_schemes[name]) if layer_schemes and name in layer_schemes else config
        return QuantLinear(linear, layer_config, generator, moments, hessian).to(linear.weight.device)

    DecoderAdapter.replace_linears(block, factory)


def quant_linears(module: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """Every calibrating :class:`QuantLinear` under ``module`` with its dotted name."""
    for name, child in module.named_modules():
        if isinstance(child, QuantLinear):
            yield name, child


def finalized_linears(module: nn.Module) -> Iterator[tuple[str, FinalizedQuantLinear]]:
    """Every :class:`FinalizedQuantLinear` under ``module`` with its dotted name."""
    for name, child in module.named_modules():
        if isinstance(child, FinalizedQuantLinear):
            yield name, child


@contextmanager
def hard_rounding(module: nn.Module) -> Iterator[None]:
    """Within the block, quantized linears use hardened rounding decisions (as after finalisation)."""
    layers = [layer for _, layer in quant_linears(module)]
    for layer in layers:
        layer.use_hard_rounding = True
    try:
        yield
    finally:
        for layer in layers:
            layer.use_hard_rounding = False


def finalize_block(block: nn.Module) -> None:
    """Put a :class:`FinalizedQuantLinear` (hardened rounding, frozen clipping, integer codes) in the place of
    every calibrating :class:`QuantLinear` of ``block``; a block with none left is unchanged."""
    for name, layer in list(quant_linears(block)):
        replace_module(block, name, layer.finalize())


def reset_block_to_round_to_nearest(block: nn.Module) -> None:
    """Drop the learned state of every calibrating quantized linear of ``block`` (the guard's RTN fallback)."""
    for _, layer in quant_linears(block):
        layer.reset_to_round_to_nearest()


def rtn_block(
    block: nn.Module, scheme: QuantScheme, act: ActQuantSettings | None = None,
    layer_schemes: dict[str, QuantScheme] | None = None,
) -> nn.Module:
    """A round-to-nearest (min/max, no training) quantized copy of a full-precision block.

    ``act`` (if any) should be the untrained form of the run's activation quantization; ``layer_schemes`` the
    block's per-layer schemes (mixed precision, a llama.cpp mix), so the reference is quantized as the run is.
    """
    baseline = copy.deepcopy(block)
    config = LayerQuantConfig(scheme, RoundingConfig(enabled=False), learnable_clip=False, clip_init=1.0, act=act)
    quantize_block(baseline, config, layer_schemes=layer_schemes)
    finalize_block(baseline)
    return baseline

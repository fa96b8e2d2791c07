"""How a run turns a full-precision block into a calibrating quantized one.

Why an object: the cross-block state, CFP and resume each need "quantize block i the way this run does" (with
the run's scheme, per-layer schemes, GPTQ start, clip search and random state), and before this class that
knowledge lived in four closures inside the job function. One object owns it, so the three callers cannot
disagree about how a block is quantized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from cbq_lightning.quant.act_quantizer import ActQuantSettings
from cbq_lightning.quant.convert import quantize_block, rtn_block
from cbq_lightning.quant.input_moments import InputMoments
from cbq_lightning.quant.qlinear import LayerQuantConfig
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.quant.weight_quantizer import build_weight_quantizer


@dataclass
class BlockQuantizer:
    """The run's quantization of one block, resolved once from the configuration.

    Attributes:
        layer: how every linear is quantized (scheme, rounding, clipping, clip search, activations, GPTQ start,
            correction); a mixed-precision run or a llama.cpp mix changes only the scheme per layer.
        generator: the run's random source for the rounding factors (advanced by every quantized block).
        moments: the input statistics collected before each block is quantized (clip search, GPTQ), or None.
        untrained_act: the activation quantization without learned parameters (the RTN reference).
        layer_schemes: per-layer schemes, ``blocks.<i>.<name>`` -> scheme (empty: the run's scheme for every layer):
            the bits a mixed-precision run chose, or the GGML type a llama.cpp mix gives the layer.
    """

    layer: LayerQuantConfig
    generator: torch.Generator
    moments: InputMoments | None
    untrained_act: ActQuantSettings | None
    layer_schemes: dict[str, QuantScheme]

    @property
    def scheme(self) -> QuantScheme:
        return self.layer.scheme

    @property
    def layer_bits(self) -> dict[str, int]:
        """Per-layer weight bits where layers differ (for the report's charts); empty for a uniform run."""
        return {name: scheme.w_bits for name, scheme in self.layer_schemes.items()}

    def schemes_of(self, index: int) -> dict[str, QuantScheme]:
        """Per-layer schemes of block ``index``, keyed by the layer's name inside the block."""
        prefix = f"blocks.{index}."
        return {name[len(prefix):]: s for name, s in self.layer_schemes.items() if name.startswith(prefix)}

    def round_to_nearest(self, index: int, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` rounded to nearest on its layer's min/max grid (CFP judges truncation with it)."""
        scheme = self.schemes_of(index).get(name, self.scheme)
        quantizer = build_weight_quantizer(weight, scheme, learnable_clip=False, clip_init=1.0)
        return quantizer.fake_quantize(weight)

    def quantize(self, index: int, block: nn.Module) -> None:
        """Make block ``index`` a calibrating quantized block (in place), from the statistics collected for it."""
        if self.layer.gptq is None:
            block_moments = self.moments.pop(index) if self.moments is not None else None
            quantize_block(block, self.layer, self.generator, block_moments, layer_schemes=self.schemes_of(index))
            return
        assert self.moments is not None
        # GPTQ: stage by stage in forward order (q/k/v, o, gate/up, down), so that with
        # extensions.gptq.true_sequential each stage's Hessian is measured behind the stages already quantized
        for names, hessians in self.moments.stages(index, block):
            diagonals = {name: torch.diagonal(m) for name, m in hessians.items()}  # the clip search's E[x_j^2]
            quantize_block(block, self.layer, self.generator, diagonals if self.layer.needs_input_moments else None, hessians,
                           names=names, layer_schemes=self.schemes_of(index))

    def structure(self, index: int, block: nn.Module) -> None:
        """The quantized layout of a block without touching the run's random state (resume loads the values;
        so neither the clip search, GPTQ nor the correction's SVD start is computed)."""
        correction = None if self.layer.correction is None else dataclasses.replace(self.layer.correction, init="zero")
        layout = dataclasses.replace(self.layer, clip_search=None, gptq=None, correction=correction)
        quantize_block(block, layout, torch.Generator(), layer_schemes=self.schemes_of(index))

    def rtn_reference(self, index: int, block: nn.Module) -> nn.Module:
        """A round-to-nearest copy of full-precision block ``index`` (the per-block RTN error in the report)."""
        return rtn_block(block, self.layer.scheme, self.untrained_act, self.schemes_of(index))

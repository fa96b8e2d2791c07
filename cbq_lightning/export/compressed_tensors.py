"""compressed-tensors ``pack-quantized`` export: the format transformers and vLLM read for int weights.

Per quantized linear ``NAME`` the checkpoint holds (compressed-tensors 0.20 layout):

* ``NAME.weight_packed`` int32 ``[out, ceil(in*b/32)]``: the codes packed along ``in``
  (:mod:`~cbq_lightning.export.packing`);
* ``NAME.weight_scale`` ``[out, in/g]`` (``[out, 1]`` per channel) in the checkpoint's dtype;
* ``NAME.weight_shape`` int64 ``[out, in]``;
* asymmetric only: ``NAME.weight_zero_point`` int32 ``[ceil(out*b/32), in/g]``, packed along ``out``.

The format dequantizes ``W = (q - zp) * scale`` with *signed* codes ``q in [-2^(b-1), 2^(b-1)-1]`` and a
signed zero-point, and packs ``q + 2^(b-1)``. Our codes ``u`` and zero-points ``z`` are unsigned with
``W = (u - z) * scale``, so ``q = u - 2^(b-1)`` and ``zp = z - 2^(b-1)``: the packed fields are exactly
``u`` and ``z``, and a symmetric run's ``z = 2^(b-1)`` is the format's implied ``zp = 0`` (no zero-point
is written). Our symmetric scale ``absmax / ((2^b - 1) / 2)`` is also the format's own.

Embedding (opt-in, ``export.quantize_embedding``): the input embedding ``[vocab, hidden]`` can join the
weight group (``targets: [Linear, Embedding]``), stored on the same grid as the linears (bits, group size,
symmetry) by round-to-nearest. Small models are dominated by it (SmolLM2-135M: 21 % of the parameters, and
``lm_head`` is tied to it), so it decides whether the export is much smaller than fp16 at all. It has to
be the same grid: transformers 5.x's dequantizing loader decompresses every dense module with one config
group's scheme, so an embedding in a group of its own would be read with the linears' bit-width.
transformers loads it dequantized (``CompressedTensorsConfig(dequantize=True)``, see
:mod:`~cbq_lightning.export.reload`); vLLM quantizes only linear layers and does not load it, which is why
it is off by default.

Activations: only dynamic per-token symmetric quantization has a description in the format
(``input_activations: {strategy: token, dynamic: true, symmetric: true}``). It computes each token's
scale from ``max|x|`` at run time and has no place for a learned clipping ratio, so a run's learned
activation clipping is not carried over (:func:`activation_warnings` says so).

Mixtures of experts: each expert's linears are stored packed under the checkpoint's per-expert names
(``mlp.experts.<e>.gate_proj``..., Mixtral ``block_sparse_moe.experts.<e>.w1``...), which transformers 5's
loader decompresses expert by expert and stacks into its fused 3-D weights. That loader (5.25,
``CompressedTensorsDequantize``) hands each expert's ``weight_packed``, ``weight_scale`` and ``weight_shape``
to compressed-tensors but never its ``weight_zero_point``, so asymmetric experts fail to load ("Asymmetric
quant requires zero-point values"). An asymmetric run's experts are therefore written in a config group of
their own (:data:`EXPERTS_TARGET`, the group transformers picks for experts), *symmetric* with one bit more:
``q = u - z`` lies in ``[-(2^b - 1), 2^b - 1]``, which the signed ``b+1``-bit range holds, and ``q * scale`` is
exactly the run's weight. The price is one bit per expert weight (W4: 5 bits; W3: 4), stated in the export's
warnings; 8-bit asymmetric experts (9 bits) cannot be stored and are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from cbq_lightning.errors import ConfigError
from cbq_lightning.export.packing import pack_codes
from cbq_lightning.export.quantized_run import ExportScheme, QuantizedLayer, QuantizedRun
from cbq_lightning.quant.weight_quantizer import WeightQuantizer

NAME = "compressed-tensors"
#: the compressed-tensors release whose layout (dense bit packing, 3-bit included) this writer follows
LAYOUT_VERSION = "0.20.0"
FORMAT = "pack-quantized"
#: the only activation quantizer the format can describe
EXPORTABLE_ACT_MODE = "dynamic_sym"
#: the config-group target of a quantized input embedding (the module's class name)
EMBEDDING_TARGET = "Embedding"
#: the config-group target of an asymmetric run's experts: each expert's linears (``...experts.3.down_proj``) and
#: a serving engine's fused experts module (``...mlp.experts``). transformers picks the group of experts by a
#: ``re:`` target that mentions "experts"; compressed-tensors matches a regex before a class name.
EXPERTS_TARGET = r"re:.*\.experts(\.\d+\.[^.]+)?$"
#: the widest codes the format packs
_MAX_BITS = 8


def check_scheme(scheme: ExportScheme) -> None:
    """Refuse schemes the format cannot describe (raised before a quantize run starts, too)."""
    if scheme.a_bits is not None and scheme.act_mode != EXPORTABLE_ACT_MODE:
        raise ConfigError(
            f"quant.act_mode={scheme.act_mode!r} cannot be exported to compressed-tensors: the format (and vLLM) "
            f"only describes dynamic per-token symmetric activations; quantize with quant.act_mode="
            f"{EXPORTABLE_ACT_MODE}, or keep the fake-quant checkpoint (export.format: null)."
        )


def _weight_args(scheme: ExportScheme) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs`` of the weights: integers, per channel or per group, static."""
    return {
        "num_bits": scheme.w_bits,
        "type": "int",
        "symmetric": scheme.sym,
        "strategy": "group" if scheme.group_size else "channel",
        "group_size": scheme.group_size,
        "dynamic": False,
    }


def _activation_args(scheme: ExportScheme) -> dict[str, Any] | None:
    """Those of the input activations (symmetric, per token, dynamic), or None for a weight-only scheme."""
    if scheme.a_bits is None:
        return None
    return {"num_bits": scheme.a_bits, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
            "dynamic": True}


def quantization_config(scheme: ExportScheme, ignore: list[str], embedding: bool = False,
                        experts: bool = False) -> dict:
    """The ``quantization_config`` block of ``config.json`` (keys transformers and vLLM validate).

    ``embedding``: the input embedding is quantized too (:func:`embedding_layer`) and joins the group.
    ``experts``: a mixture of experts, stored per expert (``mlp.experts.<e>.<projection>``, the names vLLM
    reads); transformers 5 holds experts as fused 3-D weights, which only its dequantize-at-load path builds
    from per-expert packed tensors. An asymmetric run's experts get a symmetric group of their own
    (:func:`widened_expert_bits`, see the module docstring).
    """
    weights, activations = _weight_args(scheme), _activation_args(scheme)
    groups = {
        # the group's own "format" matters: without it transformers infers int-quantized for W4A8
        "group_0": {
            "targets": ["Linear", EMBEDDING_TARGET] if embedding else ["Linear"],
            "weights": weights,
            "input_activations": activations,
            "output_activations": None,
            "format": FORMAT,
        }
    }
    if experts and not scheme.sym:
        groups["group_1"] = {
            **groups["group_0"],
            "targets": [EXPERTS_TARGET],
            "weights": {**weights, "num_bits": widened_expert_bits(scheme), "symmetric": True},
        }
    # transformers' compressed (default) loading path cannot hold a packed zero-point, build a quantized
    # embedding or fused experts, so a plain from_pretrained(OUT) would stop with a size-mismatch report;
    # "dequantize" makes it take its dequantize-at-load path by itself. vLLM and compressed-tensors ignore the key.
    loader_hint = {"dequantize": True} if (not scheme.sym or embedding or experts) else {}
    return {
        **loader_hint,
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "version": LAYOUT_VERSION,
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def check_embedding(scheme: ExportScheme, hidden_size: int | None = None) -> None:
    """Refuse a quantized embedding the format cannot describe (see the module docstring); ``hidden_size``
    unknown (before a quantize run has loaded the model) skips the group-size check."""
    if scheme.a_bits is not None:
        raise ConfigError(
            "export.quantize_embedding is for weight-only schemes: the weight group's activation quantizer "
            f"(A{scheme.a_bits}) would apply to the embedding's token ids. Export without quantize_embedding."
        )
    if scheme.group_size and hidden_size is not None and hidden_size % scheme.group_size:
        raise ConfigError(
            f"export.quantize_embedding: the group size {scheme.group_size} does not divide the embedding's "
            f"{hidden_size} features; export without quantize_embedding."
        )


def embedding_layer(name: str, weight: torch.Tensor, scheme: ExportScheme) -> QuantizedLayer:
    """The input embedding ``[vocab, hidden]`` quantized for export on the linears' grid (bits, group size,
    symmetry: one group serves both, see the module docstring) by round-to-nearest of min/max ranges.

    Plain RTN rather than anything learned: the embedding is a lookup table, each row is used alone and
    never passed through the window's reconstruction. With a tied ``lm_head`` the output projection reads
    the same rows, which the export's perplexity then includes.
    """
    check_embedding(scheme, int(weight.shape[1]))
    quantizer = WeightQuantizer(
        weight.float(), scheme.w_bits, group_size=scheme.group_size, sym=scheme.sym, learnable_clip=False, clip_init=1.0
    )
    with torch.no_grad():
        scale, zero = quantizer.scale_zero(weight)
        codes = quantizer.codes(weight, scale, zero, rounding=None)
    return QuantizedLayer(
        name=name,
        codes=codes.reshape(weight.shape).to(torch.uint8),
        scales=scale.reshape(weight.shape[0], -1),
        zeros=zero.reshape(weight.shape[0], -1).to(torch.uint8),
        bits=scheme.w_bits,
        group_size=scheme.group_size or int(weight.shape[1]),
        act_clip=None,
    )


def widened_expert_bits(scheme: ExportScheme) -> int:
    """Bits of an asymmetric run's experts stored symmetric (``w_bits + 1``; see the module docstring), or a
    ConfigError where that exceeds what the format packs."""
    bits = scheme.w_bits + 1
    if bits > _MAX_BITS:
        raise ConfigError(
            f"the experts of an asymmetric {scheme.w_bits}-bit mixture of experts would need {bits}-bit symmetric "
            "codes in compressed-tensors (transformers loads fused experts without zero-points), more than the "
            f"format's {_MAX_BITS}: quantize with quant.sym: true, or with fewer bits."
        )
    return bits


def is_expert(name: str) -> bool:
    """Whether the linear ``name`` (module or checkpoint name) is one expert's projection: the modules the
    experts' config group (:data:`EXPERTS_TARGET`) covers, decided by that same pattern."""
    return re.fullmatch(EXPERTS_TARGET.removeprefix("re:"), name) is not None


def pack_widened_layer(layer: QuantizedLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An asymmetric layer's tensors as symmetric ``bits + 1``-bit codes with the same scales and no zero-point:
    the signed code ``q = u - z`` is stored as ``q + 2^bits`` (the format's offset at ``bits + 1`` bits)."""
    zeros = layer.zeros.to(torch.int16).repeat_interleave(layer.group_size, dim=1)[:, : layer.in_features]
    signed = layer.codes.to(torch.int16) - zeros
    return {
        "weight_packed": pack_codes(signed + 2**layer.bits, layer.bits + 1, dim=1),
        "weight_scale": layer.scales.to(dtype).contiguous(),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }


def layer_packer(scheme: ExportScheme, dtype: torch.dtype, experts: bool) -> Callable[[QuantizedLayer], dict]:
    """The function packing each layer of a run: :func:`pack_layer`, or :func:`pack_widened_layer` for the
    experts of an asymmetric mixture of experts (the layers its symmetric experts group covers)."""
    widen = experts and not scheme.sym
    if widen:
        widened_expert_bits(scheme)  # refuse 9-bit codes before anything is packed

    def pack(layer: QuantizedLayer) -> dict[str, torch.Tensor]:
        if widen and is_expert(layer.name):
            return pack_widened_layer(layer, dtype)
        return pack_layer(layer, dtype, scheme.sym)

    return pack


def expert_warnings(scheme: ExportScheme, experts: bool) -> list[str]:
    """What the export changes about an asymmetric run's experts (empty otherwise)."""
    if not experts or scheme.sym:
        return []
    bits = widened_expert_bits(scheme)
    return [
        f"the experts are stored as symmetric {bits}-bit codes (the run's asymmetric {scheme.w_bits}-bit codes "
        f"minus their zero-points, exactly): transformers loads fused experts without zero-points. They take "
        f"one bit per weight more than the other linears."
    ]


def pack_layer(layer: QuantizedLayer, dtype: torch.dtype, sym: bool) -> dict[str, torch.Tensor]:
    """The tensors replacing ``NAME.weight``, keyed by their suffix."""
    tensors = {
        "weight_packed": pack_codes(layer.codes, layer.bits, dim=1),
        "weight_scale": layer.scales.to(dtype).contiguous(),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not sym:
        tensors["weight_zero_point"] = pack_codes(layer.zeros, layer.bits, dim=0)
    return tensors


def activation_warnings(run: QuantizedRun) -> list[str]:
    """What the exported activation description leaves out of the run (empty for weight-only runs)."""
    if run.scheme.a_bits is None:
        return []
    ratios = [ratio for layer in run.layers.values() if layer.act_clip is not None for ratio in layer.act_clip]
    clipped = [ratio for ratio in ratios if abs(ratio - 1.0) > 1e-6]
    if not clipped:
        return []
    return [
        f"{len(clipped)} of {len(ratios)} learned activation clipping ratios differ from 1 (range "
        f"{min(clipped):.4f}..{max(clipped):.4f}); compressed-tensors' dynamic per-token quantization has no "
        "clipping ratio, so the exported model quantizes each token with its full max|x| (vLLM: max|x| / "
        f"{2 ** (run.scheme.a_bits - 1) - 1}; transformers' CPU simulation: max|x| / "
        f"{(2 ** run.scheme.a_bits - 1) / 2}) and its outputs differ from the run's fake-quant model."
    ]

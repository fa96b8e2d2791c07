"""GPTQ v1 export (``quant_method: gptq``, ``checkpoint_format: gptq``): the layout AutoGPTQ, GPTQModel,
transformers (through optimum + gptqmodel) and vLLM's GPTQ / Marlin kernels read.

Per quantized linear ``NAME`` (``in``/``out`` features, ``G = in / group`` groups):

* ``NAME.qweight`` int32 ``[ceil(in*b/32), out]``: unsigned codes packed along ``in`` - the same words as
  compressed-tensors' ``weight_packed``, transposed;
* ``NAME.qzeros`` int32 ``[G, ceil(out*b/32)]``: zero-points **minus one** (the v1 convention the kernels
  undo with ``+1``), packed along ``out``;
* ``NAME.scales`` float16 ``[G, out]`` (the kernels' dtype);
* ``NAME.g_idx`` int32 ``[in]``: ``i // group`` (no act-order: ``desc_act: false``).

The kernels dequantize ``W = scales * (u - (qzeros + 1))``. Only symmetric weights are exported: their
zero-point is ``2^(b-1)`` (stored ``2^(b-1) - 1``), which is what GPTQ's own symmetric quantizer uses,
and our symmetric scale ``2 * absmax / (2^b - 1)`` is GPTQ's as well, so kernels that assume the
symmetric zero (Marlin's ``uint4b8``) compute exactly what the file says. Asymmetric zero-points can be
0, which v1's ``z - 1`` cannot store; those runs go to compressed-tensors.
"""

from __future__ import annotations

import torch

from cbq_lightning import __version__
from cbq_lightning.errors import ConfigError
from cbq_lightning.export.packing import pack_codes
from cbq_lightning.export.quantized_run import ExportScheme, QuantizedLayer, QuantizedRun

NAME = "gptq"
SUPPORTED_BITS = (2, 3, 4, 8)
#: the 3-bit kernels (and GPTQ's reference packer) work on whole 32-code units along both dimensions
_THREE_BIT_MULTIPLE = 32


def check_scheme(scheme: ExportScheme) -> None:
    """Refuse schemes GPTQ v1 cannot hold (raised before a quantize run starts, too)."""
    if not scheme.sym:
        raise ConfigError(
            "GPTQ v1 export needs symmetric weights (its zero-points are stored minus one, so an asymmetric "
            "zero-point of 0 cannot be written): export this run as compressed-tensors (--format / "
            "export.format), or quantize with quant.sym: true."
        )
    if scheme.w_bits not in SUPPORTED_BITS:
        raise ConfigError(
            f"GPTQ has no {scheme.w_bits}-bit kernels (bits {SUPPORTED_BITS}): export with --format "
            "compressed-tensors, or quantize at one of those widths."
        )
    if scheme.a_bits is not None:
        raise ConfigError(
            f"GPTQ checkpoints have no activation quantization, so the run's {scheme.a_bits}-bit activations "
            "would be silently dropped: export as compressed-tensors (--format / export.format; dynamic "
            "per-token activations), or quantize a weight-only scheme."
        )


def check_layers(run: QuantizedRun) -> None:
    """Shape limits of the kernels, which only the run's layers can tell."""
    if run.scheme.w_bits != 3:
        return
    for layer in run.layers.values():
        if layer.in_features % _THREE_BIT_MULTIPLE or layer.out_features % _THREE_BIT_MULTIPLE:
            raise ConfigError(
                f"3-bit GPTQ needs in_features and out_features divisible by {_THREE_BIT_MULTIPLE}; layer "
                f"{layer.name} is {layer.out_features} x {layer.in_features}: export as compressed-tensors."
            )


def quantization_config(scheme: ExportScheme) -> dict:
    """The ``quantization_config`` block of ``config.json`` (keys transformers' GPTQConfig and vLLM read)."""
    return {
        "quant_method": "gptq",
        "bits": scheme.w_bits,
        "group_size": scheme.group_size or -1,
        "desc_act": False,
        "sym": True,
        "true_sequential": True,
        "static_groups": False,
        "lm_head": False,
        "format": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"cbq-lightning:{__version__}"]},
    }


def pack_layer(layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    """The tensors replacing ``NAME.weight``, keyed by their suffix."""
    scales = layer.scales.t().to(torch.float16).contiguous()
    if not bool(torch.isfinite(scales).all()):
        raise ConfigError(f"layer {layer.name} has scales beyond float16's range; GPTQ stores float16 scales.")
    return {
        "qweight": pack_codes(layer.codes, layer.bits, dim=1).t().contiguous(),
        "qzeros": pack_codes(layer.zeros.to(torch.int64).t() - 1, layer.bits, dim=1),
        "scales": scales,
        "g_idx": (torch.arange(layer.in_features) // layer.group_size).to(torch.int32),
    }

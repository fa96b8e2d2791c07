"""GGUF export of a finished run (``cbq export --format gguf``, ``export.format: gguf``): one file llama.cpp loads.

What is written:

* every linear the run quantized, in its GGML block type (the run's ``quant.scheme``: ``Q4_0`` ... ``Q8_0`` for
  every layer, or per layer the type a llama.cpp mix such as ``Q4_K_M`` gives it), packed from the run's integer
  codes and float16 scales/minimums (:mod:`cbq_lightning.export.gguf_blocks`): the file dequantizes to exactly the
  run's fake-quantized weights, because the run calibrated on that grid (:mod:`cbq_lightning.quant.ggml_quantizer`),
  not re-quantized;
* with a mix, the embedding and the output head in the types the mix plans for them (:mod:`gguf_plan`), quantized
  the way ``llama-quantize`` does without an importance matrix (llama.cpp's reference quantizer for the legacy
  types, a searched clipping ratio for the K-quants): CBQ does not calibrate them;
* every other tensor from the fake-quant checkpoint: norms and biases in F32 (llama.cpp keeps 1-D tensors so), the
  embedding and an untied output of a single-type run in ``export.dtype`` (F16 by default, F32, BF16, or the
  checkpoint's own);
* under llama.cpp's names and layouts for the family (:mod:`cbq_lightning.export.gguf_layout`): q/k row order,
  Gemma's ``1 + w`` norms, no tied output;
* the metadata (:mod:`cbq_lightning.export.gguf_metadata`): copied from the source GGUF when the run's model came
  from one, else the hyperparameters and tokenizer written from the checkpoint the converter's way.

The file is written atomically; a summary (``<file>.cbq_export.json``) says what was stored, the types per tensor
and llama.cpp's fallbacks (a mix), and any warnings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbq_lightning.errors import ConfigError
from cbq_lightning.export.fake_quant import INTEGER_STATE
from cbq_lightning.export.gguf_blocks import pack_layer
from cbq_lightning.export.gguf_layout import (
    GgufLayout,
    TensorNamer,
    is_norm,
    layout_for,
    qk_heads,
    rope_row_order,
    write_hyperparameters,
)
from cbq_lightning.export.gguf_metadata import SourceGguf, copy_metadata, source_gguf, write_tokenizer
from cbq_lightning.export.gguf_plan import GgufPlan, plan_types
from cbq_lightning.export.quantized_run import ExportScheme, QuantizedRun, size_summary
from cbq_lightning.io import atomic_write_file, atomic_write_json
from cbq_lightning.models.families import checkpoint_name
from cbq_lightning.quant.ggml_quantizer import GGMLWeightQuantizer
from cbq_lightning.quant.ggml_types import LEGACY_TYPES, GGMLBlockType, ggml_type
from cbq_lightning.quant.weight_quantizer import ClipSearch

log = logging.getLogger("cbq_lightning")

NAME = "gguf"
SUFFIX = ".gguf"
_FP16_BYTES = 2
#: ``general.quantized_by``
_QUANTIZED_BY = "cbq-lightning"


def check_scheme(scheme: ExportScheme) -> None:
    """Refuse a run GGUF cannot store exactly (also before a quantize run starts)."""
    if scheme.a_bits is not None:
        raise ConfigError(
            f"a GGUF export of a run with {scheme.a_bits}-bit activations: llama.cpp runs the weights only (it "
            "quantizes activations its own way), so the calibrated activation quantizers would be lost; quantize "
            f"a weight-only GGML type ({', '.join(LEGACY_TYPES)}) or a llama.cpp mix (Q4_K_M ...)."
        )
    if scheme.gguf_type is None:
        group = f"G{scheme.group_size}" if scheme.group_size else ""
        raise ConfigError(
            f"a GGUF export stores llama.cpp's block types, and this run's scheme W{scheme.w_bits}A16{group} is not "
            f"one: quantize with quant.scheme {', '.join(LEGACY_TYPES)} or a llama.cpp mix such as Q4_K_M, Q3_K_M, "
            "Q2_K (calibrated on the format's exact grid)."
        )
    ggml_type(scheme.gguf_type)


def check_model_type(model_type: str | None) -> None:
    """Refuse a family without a known llama.cpp layout (also before a quantize run starts)."""
    layout_for(model_type)


def default_output(run_dir: Path, scheme: ExportScheme) -> Path:
    return run_dir / f"model-{scheme.gguf_mix or scheme.gguf_type}{SUFFIX}"


def export_gguf(run: QuantizedRun, output: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Write ``run`` to ``output`` (a ``.gguf`` file); returns the summary also written beside it."""
    import gguf

    check_scheme(run.scheme)
    config = run.model_config()
    model_type = config.get("model_type")
    layout = layout_for(model_type)
    if output.suffix != SUFFIX or output.is_dir():
        raise ConfigError(f"a GGUF export writes one file: give --output a path ending in {SUFFIX}, not {output}.")
    file_type = run.scheme.gguf_mix or ggml_type(run.scheme.gguf_type).name
    source = source_gguf(run.run_dir)
    warnings: list[str] = []
    if source is not None and source.architecture != layout.architecture:
        warnings.append(f"the source GGUF {source.path.name} is architecture {source.architecture!r}, the export "
                        f"{layout.architecture!r}: its metadata is not copied; written from the checkpoint instead.")
        source = None
    plan = _plan(run, config)
    tensors, sizes = _tensors(run, layout, config, dtype, plan)

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(str(path), layout.architecture)
        warnings.extend(_write_metadata(writer, run, layout, config, source))
        writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{file_type}"]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, (array, raw_dtype) in tensors.items():
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write_file(output, write)
    summary = _summary(run, output, layout, source, sizes, dtype, warnings, plan)
    atomic_write_json(summary_path(output), summary)
    for warning in warnings:
        log.warning("export: %s", warning)
    if plan is not None:
        plan.log()
    log.info("exported %s (gguf, %s) to %s: %.2f MiB, %.3f x the fp16 size (quantized linears %.3f x)",
             file_type, layout.architecture, output, summary["weights_bytes"] / 2**20, summary["ratio_to_fp16"],
             summary["quantized_linears"]["ratio_to_fp16"])
    return summary


def summary_path(output: Path) -> Path:
    """Where the summary of the GGUF ``output`` is written: ``model-Q4_0.gguf`` -> ``model-Q4_0.cbq_export.json``."""
    return output.with_suffix(".cbq_export.json")


def _write_metadata(writer: Any, run: QuantizedRun, layout: GgufLayout, config: dict, source: SourceGguf | None) -> list[str]:
    writer.add_quantized_by(_QUANTIZED_BY)
    if source is not None:
        copy_metadata(writer, source)
        return []
    writer.add_name(run.run_dir.resolve().name)
    vocab_size = int(config["vocab_size"])
    write_hyperparameters(writer, layout, config, vocab_size)
    return write_tokenizer(writer, run.model_dir, vocab_size)


def _plan(run: QuantizedRun, config: dict) -> GgufPlan | None:
    """A mix's types for the checkpoint's weights (the same rules the run calibrated with), or None."""
    if run.scheme.gguf_mix is None:
        return None
    return plan_types(run.scheme.gguf_mix, config, run.checkpoint_shapes())


def _tensors(
    run: QuantizedRun, layout: GgufLayout, config: dict, dtype: torch.dtype, plan: GgufPlan | None
) -> tuple[dict[str, tuple[np.ndarray, Any]], dict[str, int]]:
    """``{gguf name: (array, raw GGML type or None)}`` in the checkpoint's order, and byte counts."""
    import gguf

    namer = TensorNamer(layout, int(config["num_hidden_layers"]))
    quantized = {f"{checkpoint_name(config.get('model_type'), name)}.weight": layer for name, layer in run.layers.items()}
    tied = bool(config.get("tie_word_embeddings"))
    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    sizes = {"fp16_bytes": 0, "linears_fp16_bytes": 0, "linears_packed_bytes": 0}
    seen = set()
    for key, tensor in run.checkpoint_tensors():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp computes a tied output from token_embd
        if key.rpartition(".")[2] in INTEGER_STATE:
            continue  # integer state of a quantized layer (older checkpoints kept a K-quant's): not a model tensor
        seen.add(key)
        name = namer(key)
        sizes["fp16_bytes"] += tensor.numel() * _FP16_BYTES
        layer = quantized.get(key)
        if layer is not None:
            block_type = _layer_type(layer, run, plan, key)
            array = pack_layer(block_type, layer.codes, layer.scales, layer.mins, layer.super_scales, layer.super_mins,
                               layer.name)
            raw: Any = gguf.GGMLQuantizationType[block_type.name]
            sizes["linears_fp16_bytes"] += tensor.numel() * _FP16_BYTES
            sizes["linears_packed_bytes"] += array.nbytes
        elif plan is not None and key in plan.types:
            block_type = ggml_type(plan.stored(key))
            array, raw = _round_to_nearest(tensor, block_type), gguf.GGMLQuantizationType[block_type.name]
        else:
            array, raw = _plain(tensor, name, layout, dtype)
        heads = qk_heads(name, config) if layout.permute_qk else None
        if heads is not None:
            array = np.ascontiguousarray(array[rope_row_order(array.shape[0], heads)])
        tensors[name] = (array, raw)
    missing = sorted(set(quantized) - seen)
    if missing:
        raise ConfigError(f"the fake-quant checkpoint lacks the weights of {missing[:3]}: it is not this run's.")
    return tensors, sizes


def _layer_type(layer: Any, run: QuantizedRun, plan: GgufPlan | None, key: str) -> GGMLBlockType:
    """The GGML type a quantized linear is stored in: the one it was calibrated on, which must be the mix's."""
    name = layer.ggml_type or run.scheme.gguf_type
    if plan is not None and plan.stored(key) != name:
        raise ConfigError(
            f"{layer.name} was calibrated on {name}, and {plan.mix} stores {plan.stored(key)} for it: the run's mix "
            "rules differ from this version's; rerun cbq quantize with this version."
        )
    return ggml_type(name)


#: rows quantized at a time outside the run (a 128k-token embedding would otherwise be fake-quantized in one piece)
_RTN_ROWS = 4096


def _round_to_nearest(tensor: torch.Tensor, block_type: GGMLBlockType) -> np.ndarray:
    """A weight CBQ did not calibrate (a mix's embedding or output head) in ``block_type``, as ``llama-quantize``
    stores it without an importance matrix: llama.cpp's own reference quantizer for the legacy types (the ``gguf``
    package's port), and for the K-quants each sub-block's clipping ratio searched for the least squared error
    (llama.cpp's reference searches too) on the two-level grid."""
    import gguf

    values = tensor.detach().to(torch.float32).cpu()
    if not block_type.is_k_quant:
        return gguf.quants.quantize(np.ascontiguousarray(values.numpy()), gguf.GGMLQuantizationType[block_type.name])
    search = ClipSearch(min_ratio=0.7, steps=16, norm=2.0, activation_aware=False)
    rows = []
    for chunk in values.split(_RTN_ROWS):
        quantizer = GGMLWeightQuantizer(chunk, block_type, learnable_clip=True, clip_init=0.999)
        with torch.no_grad():
            quantizer.search_clip(chunk, search)
            scale, zero, minimum = quantizer.grid(chunk)
            codes = quantizer.codes(chunk, scale, zero, None, minimum=minimum).reshape(chunk.shape)
            supers = quantizer.super_scales(chunk)
        assert supers is not None
        rows.append(pack_layer(block_type, codes, scale.squeeze(-1), None if minimum is None else minimum.squeeze(-1),
                               supers[0], supers[1]))
    return np.concatenate(rows, axis=0)


def _plain(tensor: torch.Tensor, name: str, layout: GgufLayout, dtype: torch.dtype) -> tuple[np.ndarray, Any]:
    """A tensor the run left in floating point: 1-D ones (norms, biases) in F32, with the family's norm offset;
    the others in ``dtype``."""
    import gguf

    values = tensor.detach().to(torch.float32).cpu().numpy()
    if values.ndim <= 1:
        if layout.norm_offset and is_norm(name):
            values = values + np.float32(layout.norm_offset)
        return np.ascontiguousarray(values, dtype=np.float32), None
    if dtype == torch.float32:
        return np.ascontiguousarray(values), None
    if dtype == torch.float16:
        return np.ascontiguousarray(values.astype(np.float16)), None
    return gguf.quants.quantize(np.ascontiguousarray(values), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _summary(
    run: QuantizedRun, output: Path, layout: GgufLayout, source: SourceGguf | None, sizes: dict[str, int],
    dtype: torch.dtype, warnings: list[str], plan: GgufPlan | None,
) -> dict[str, Any]:
    return {
        "format": NAME,
        "output": str(output),
        **size_summary(run, output.stat().st_size, sizes, dtype),
        "gguf_type": run.scheme.gguf_mix or run.scheme.gguf_type,
        # a llama.cpp mix: the stored types and the tensors that fell back as llama.cpp does (None: one type)
        "gguf_types": None if plan is None else plan.summary(),
        "architecture": layout.architecture,
        "metadata_from": str(source.path) if source is not None else "checkpoint",
        "warnings": warnings,
    }


def read_summary(output: Path) -> dict[str, Any]:
    """The summary written beside a GGUF export."""
    return json.loads(summary_path(output).read_text(encoding="utf-8"))

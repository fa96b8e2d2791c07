"""Packed export of a finished run: ``cbq export`` and the ``export:`` section of ``cbq quantize``.

Writes a Hugging Face checkpoint directory that stock loaders run: ``config.json`` with the format's
``quantization_config``, one ``model.safetensors`` where every quantized linear's ``weight`` is replaced
by the format's packed tensors and every other tensor is the fake-quant checkpoint's (in ``dtype``),
the tokenizer and generation files, and ``cbq_export.json`` (format, scheme, sizes against fp16,
warnings). The directory is written atomically. ``gguf`` writes one llama.cpp file instead
(:mod:`cbq_lightning.export.gguf_export`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.export import compressed_tensors, gguf_export, gptq
from cbq_lightning.export.fake_quant import SIDECAR
from cbq_lightning.export.quantized_run import (
    ExportScheme,
    QuantizedLayer,
    QuantizedRun,
    open_run,
    size_summary,
)
from cbq_lightning.io import atomic_directory, write_safetensors
from cbq_lightning.models.families import checkpoint_name, has_experts

log = logging.getLogger("cbq_lightning")

ExportFormat = Literal["compressed-tensors", "gptq", "gguf"]
ExportDtype = Literal["float16", "bfloat16", "float32", "auto"]
FORMATS: tuple[str, ...] = (compressed_tensors.NAME, gptq.NAME, gguf_export.NAME)
REPORT = "cbq_export.json"
WEIGHTS = "model.safetensors"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: files of the fake-quant checkpoint that the export writes anew instead of copying
_REWRITTEN = {"config.json", SIDECAR, "model.safetensors.index.json"}
_FP16_BYTES = 2


@dataclass
class ExportConfig:
    """Packed export of the quantized model (the fake-quant ``model/`` checkpoint is always written too).

    Attributes:
        format: ``null`` = no packed export; ``compressed-tensors`` (``pack-quantized``: symmetric or
            asymmetric weights, W4A8/W4A4 with dynamic per-token activations; transformers and vLLM) or
            ``gptq`` (GPTQ v1, symmetric weight-only runs: ``quant.sym: true``), or ``gguf`` (one llama.cpp file;
            runs of a GGML type: ``quant.scheme`` ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1`` or ``Q8_0``).
        output: directory to write; ``null`` = ``<run>/packed-<format>``. For ``gguf`` the file to write
            (``*.gguf``); ``null`` = ``<run>/model-<type>.gguf``.
        dtype: dtype of compressed-tensors' scales and of every tensor left unquantized (embeddings,
            norms, ``lm_head``): ``float16`` (compact, what serving runs; GPTQ's scales are float16 in any
            case), ``bfloat16``, ``float32``, or ``auto`` = the fake-quant checkpoint's own dtype (exact).
            GGUF keeps norms and biases in float32 whatever this says (llama.cpp's convention).
        quantize_embedding: compressed-tensors, weight-only runs: also store the input embedding (and so a
            tied ``lm_head``) on the linears' grid, round-to-nearest. Shrinks small models whose embedding
            dominates (SmolLM2-135M at W4 per channel: 0.41 -> 0.25 x fp16), at a perplexity cost where
            ``lm_head`` is tied to it (SmolLM2, RTN run: 30.56 -> 45.40). transformers loads it (dequantized);
            vLLM does not load quantized embeddings, so leave it off (the default: embedding in ``dtype``)
            for an export to serve.
    """

    format: ExportFormat | None = None
    output: str | None = None
    dtype: ExportDtype = "float16"
    quantize_embedding: bool = False

    def check(self, scheme: ExportScheme) -> None:
        """Refuse a format that cannot hold ``scheme``, before any work (also before a quantize run)."""
        if self.format is None:
            return
        if self.format not in FORMATS:
            raise ConfigError(f"export.format={self.format!r} is unknown: use one of {', '.join(FORMATS)} or null.")
        if self.dtype not in (*_DTYPES, "auto"):
            raise ConfigError(f"export.dtype={self.dtype!r} is unknown: use one of {', '.join(_DTYPES)} or auto.")
        if self.quantize_embedding:
            if self.format != compressed_tensors.NAME:
                raise ConfigError(
                    f"export.quantize_embedding needs export.format: {compressed_tensors.NAME}: the {self.format} "
                    "format has no quantized embedding; drop quantize_embedding or switch the format."
                )
            compressed_tensors.check_embedding(scheme)
        if scheme.gguf_type is not None and self.format != gguf_export.NAME:
            raise ConfigError(
                f"this run is calibrated on llama.cpp's {scheme.gguf_mix or scheme.gguf_type} grid (float16 scales "
                f"per block), which export.format={self.format!r} cannot store exactly: export with format "
                f"{gguf_export.NAME}."
            )
        _format_module(self.format).check_scheme(scheme)

    @property
    def depends_on_model_type(self) -> bool:
        """Whether the format supports only some model families (GGUF: those with a known llama.cpp layout)."""
        return self.format == gguf_export.NAME

    def check_model_type(self, model_type: str | None) -> None:
        """Refuse a model family the format has no layout for (only GGUF has such a list), before any work."""
        if self.format == gguf_export.NAME:
            gguf_export.check_model_type(model_type)

    def output_dir(self, run_dir: Path) -> Path:
        return Path(self.output).expanduser() if self.output else run_dir / f"packed-{self.format}"


def _format_module(name: str) -> Any:
    return {compressed_tensors.NAME: compressed_tensors, gptq.NAME: gptq, gguf_export.NAME: gguf_export}[name]


def check_holds_run(fmt: str, run: str, *, correction: bool, online_rotation: bool, mixed_bits: bool) -> None:
    """Refuse what no packed format can hold, whatever the scheme: the one owner of these rules, called on a
    configuration before any calibration (:func:`cbq_lightning.config.validate`, ``run`` = "this run") and on a
    finished run before anything is written (:func:`export_run`, ``run`` = its folder).

    Why each: stock kernels compute ``Q(W) Q(x)`` only (no low-rank correction ``U V^T x``), stock loaders do not
    run an online rotation before ``down_proj``, and a packed config describes one weight scheme for all layers.
    """
    if correction:
        raise ConfigError(
            f"export.format={fmt!r} cannot hold the low-rank correction of {run} (extensions.correction.rank / rank_fraction): "
            "its stock kernels compute Q(W) Q(x) only. Serve the fake-quant checkpoint (`cbq evaluate --model RUN` "
            "applies the correction), or quantize without the correction for a packed export."
        )
    if online_rotation:
        raise ConfigError(
            f"export.format={fmt!r} cannot hold the online rotation of {run} (extensions.rotation.online_down): stock loaders "
            "do not run it before down_proj. Quantize with extensions.rotation.online_down false for a stock-loadable export "
            "(the folded rotations are plain weights), or serve the fake-quant checkpoint (`cbq evaluate` applies it)."
        )
    if mixed_bits:
        raise ConfigError(
            f"export.format={fmt!r} describes one weight scheme for all layers; {run} mixes bit-widths "
            "(extensions.mixed.budget / extensions.layer_bits). Keep export.format null: the fake-quant checkpoint and "
            "quant_state.safetensors (per-layer bits) hold the result."
        )


def export_run(run_dir: str | Path, config: ExportConfig) -> dict[str, Any]:
    """Write ``run_dir``'s quantized model in ``config.format``; returns the summary in ``cbq_export.json``."""
    if config.format is None:
        raise ConfigError(f"export.format is not set: choose one of {', '.join(FORMATS)}.")
    run = open_run(run_dir)
    config.check(run.scheme)
    check_holds_run(
        config.format, str(run_dir),
        correction=any(layer.correction_rank for layer in run.layers.values()),
        online_rotation=bool((run.sidecar.get("rotation") or {}).get("online")),
        # per-layer bit-widths (mixed precision); a llama.cpp mix's types are the format's own
        mixed_bits=len({layer.bits for layer in run.layers.values() if layer.ggml_type is None}) > 1,
    )
    model_config = run.model_config()
    dtype = _DTYPES[_source_dtype(model_config) if config.dtype == "auto" else config.dtype]
    if config.format == gguf_export.NAME:
        output = Path(config.output).expanduser() if config.output else gguf_export.default_output(run.run_dir, run.scheme)
        return gguf_export.export_gguf(run, output, dtype)
    output = config.output_dir(run.run_dir)
    if output.resolve() in (run.run_dir.resolve(), run.model_dir.resolve()):
        raise ConfigError(f"export output {output} would replace the run's own outputs: choose another directory.")
    linears, embedding = _module_names(run.model_dir)
    unquantized = _unquantized_linears(run, linears)
    warnings: list[str] = []
    extra: dict[str, QuantizedLayer] = {}
    if config.quantize_embedding:
        extra[embedding] = compressed_tensors.embedding_layer(
            embedding, run.checkpoint_tensor(f"{embedding}.weight"), run.scheme
        )
        warnings.append(
            f"{embedding} is quantized (export.quantize_embedding): transformers loads the export dequantized; "
            "vLLM does not load quantized embeddings (export without quantize_embedding to serve it)."
        )
    quantization, pack, format_warnings = _format_config(run, config, model_config, unquantized, dtype)
    warnings += format_warnings

    saved_name = functools.partial(checkpoint_name, model_config.get("model_type"))
    tensors, sizes = _packed_tensors(run, pack, dtype, extra, saved_name)
    with atomic_directory(output) as tmp:
        write_safetensors(tmp / WEIGHTS, tensors, {"format": "pt"})
        _write_config(tmp, model_config, quantization, dtype)
        _copy_support_files(run.model_dir, tmp)
        summary = _summary(run, config, tmp, sizes, dtype, warnings)
        (tmp / REPORT).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for warning in warnings:
        log.warning("export: %s", warning)
    log.info(
        "exported %s (%s) to %s: %.2f MiB of weights, %.3f x the fp16 size (quantized linears %.3f x), directory %.2f MiB",
        run.scheme_metadata.get("name", ""), config.format, output, summary["weights_bytes"] / 2**20,
        summary["ratio_to_fp16"], summary["quantized_linears"]["ratio_to_fp16"], summary["directory_bytes"] / 2**20,
    )
    return {**summary, "output": str(output)}


def _format_config(
    run: QuantizedRun, config: ExportConfig, model_config: dict, unquantized: list[str], dtype: torch.dtype,
) -> tuple[dict[str, Any], Callable[..., Any], list[str]]:
    """The packed format's ``quantization_config``, its layer packer and its warnings (compressed-tensors or GPTQ v1).

    Why GPTQ refuses mixtures of experts: its v1 loaders build per-expert linears that transformers 5 no longer has.
    """
    experts = has_experts(model_config.get("model_type"))
    if config.format == compressed_tensors.NAME:
        quantization = compressed_tensors.quantization_config(
            run.scheme, ignore=unquantized, embedding=config.quantize_embedding, experts=experts,
        )
        warnings = compressed_tensors.activation_warnings(run) + compressed_tensors.expert_warnings(run.scheme, experts)
        return quantization, compressed_tensors.layer_packer(run.scheme, dtype, experts), warnings
    if experts:
        raise ConfigError(
            f"{run.run_dir} is a mixture of experts ({model_config.get('model_type')}): GPTQ v1 loaders build "
            "per-expert linears that transformers 5 no longer has (its experts are fused 3-D weights); export "
            "as compressed-tensors, whose loader converts per-expert weights into the fused layout."
        )
    gptq.check_layers(run)
    _check_gptq_covers_blocks(run, unquantized)
    return gptq.quantization_config(run.scheme), gptq.pack_layer, []


def _source_dtype(model_config: dict) -> str:
    name = model_config.get("dtype") or model_config.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ConfigError(f"the checkpoint's dtype {name!r} has no export equivalent: set export.dtype explicitly.")
    return name


def _module_names(model_dir: Path) -> tuple[list[str], str]:
    """Every ``nn.Linear`` of the model and the input embedding's name, from its config on the meta device
    (no weights read); mixture-of-experts experts under their per-expert checkpoint names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cbq_lightning.models.adapter import DecoderAdapter

    hf_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        DecoderAdapter(model)  # a mixture of experts' fused experts as the per-expert linears the run quantized
    embedding = model.get_input_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears, names[id(embedding)]


def _unquantized_linears(run: QuantizedRun, linears: list[str]) -> list[str]:
    """Linears the run left in floating point (``lm_head``): compressed-tensors' ``ignore`` list."""
    missing = sorted(set(run.layers) - set(linears))
    if missing:
        raise ConfigError(f"quant_state layers {missing[:3]} are not linears of the model in {run.model_dir}.")
    return [name for name in linears if name not in run.layers]


def _check_gptq_covers_blocks(run: QuantizedRun, unquantized: list[str]) -> None:
    """transformers' GPTQ loader replaces every linear inside the blocks, so each must have packed weights."""
    match = re.match(r"^(.*?\.)\d+\.", next(iter(run.layers)))
    prefix = match.group(1) if match else None
    inside = [name for name in unquantized if prefix and name.startswith(prefix)]
    if inside:
        raise ConfigError(
            f"GPTQ loaders quantize every linear in the blocks, but {inside[:3]} were not quantized: "
            "export as compressed-tensors (its ignore list keeps them dense)."
        )


def _packed_tensors(
    run: QuantizedRun, pack: Callable[[QuantizedLayer], dict[str, torch.Tensor]], dtype: torch.dtype,
    extra: dict[str, QuantizedLayer], saved_name: Callable[[str], str],
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The export's tensors: packed layers (the run's linears, then ``extra``: a quantized embedding) plus
    the checkpoint's other tensors in ``dtype``; and byte counts. ``saved_name`` maps a module name to the
    checkpoint's name for it (see :func:`~cbq_lightning.models.families.checkpoint_name`)."""
    tensors: dict[str, torch.Tensor] = {}
    sizes = {"fp16_bytes": 0, "linears_fp16_bytes": 0, "linears_packed_bytes": 0, "extra_packed_bytes": 0}
    replaced = {f"{saved_name(name)}.weight" for name in run.layers}
    dropped = {f"{saved_name(name)}.weight" for name in extra}
    seen: set[str] = set()
    for key, tensor in run.checkpoint_tensors():
        seen.add(key)
        if tensor.is_floating_point():
            sizes["fp16_bytes"] += tensor.numel() * _FP16_BYTES
        if key in replaced:
            sizes["linears_fp16_bytes"] += tensor.numel() * _FP16_BYTES
            continue
        if key in dropped:
            continue
        tensors[key] = tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor.contiguous()
    absent = (replaced | dropped) - seen
    if absent:
        raise ConfigError(f"the fake-quant checkpoint lacks the weights of {sorted(absent)[:3]}: it is not this run's.")
    for layers, counter in ((run.layers, "linears_packed_bytes"), (extra, "extra_packed_bytes")):
        for name, layer in layers.items():
            for suffix, tensor in pack(layer).items():
                tensors[f"{saved_name(name)}.{suffix}"] = tensor
                sizes[counter] += tensor.numel() * tensor.element_size()
    return tensors, sizes


def _write_config(directory: Path, model_config: dict, quantization: dict, dtype: torch.dtype) -> None:
    config = {key: value for key, value in model_config.items() if key != "torch_dtype"}
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _copy_support_files(model_dir: Path, directory: Path) -> None:
    """Tokenizer, generation config, chat template ...: everything but weights and rewritten files."""
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in _REWRITTEN:
            shutil.copy2(path, directory / path.name)


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _summary(
    run: QuantizedRun, config: ExportConfig, directory: Path, sizes: dict[str, int], dtype: torch.dtype,
    warnings: list[str],
) -> dict[str, Any]:
    return {
        "format": config.format,
        **size_summary(run, (directory / WEIGHTS).stat().st_size, sizes, dtype),
        "directory_bytes": _directory_bytes(directory),
        "quantized_embedding": {"packed_bytes": sizes["extra_packed_bytes"]} if config.quantize_embedding else None,
        "warnings": warnings,
    }

"""GPTQ (Frantar et al., 2023) as a peer, run by GPTQModel's own pipeline.

Why GPTQModel and not llm-compressor: llm-compressor 0.14 pins ``transformers<=5.17`` and
``compressed-tensors==0.19``, so installing it would replace this project's transformers (5.23 here) and
break the compressed-tensors >= 0.20 export; GPTQModel 7.6 runs on torch 2.13 and transformers 5.23 and is
already the package this project reloads GPTQ exports with. (7.7 requires torch >= 2.14.1.)

Why save and reload: GPTQModel quantizes a model it loads itself from a checkpoint directory, so the
model our loader produced (the same object CBQ would quantize, e.g. the dequantized SmolLM2 GGUF) is saved
to a temporary directory and handed over from there - the weights are identical. After GPTQ the model
holds packed GPTQ linears; each is dequantized with the package's own ``dequantize_weight`` into a plain
``nn.Linear``, so our evaluator runs it like any other model and the grid can be checked.

Settings: bits / group size / symmetry from the scheme; everything else is GPTQModel's default
(``damp_percent`` 0.05, true-sequential, float16 scales, and for groups its group-aware activation
reordering ``act_group_aware`` with ``desc_act`` off). GPTQModel's group-aware reordering needs groups, so
per-channel schemes run with GPTQ's original activation order instead (``desc_act=True``,
``act_group_aware=False``), which is what group-aware reordering generalises. The tuned variant (``gptq-tuned``)
adds :data:`TUNED_OPTIONS`: activation order for every scheme and the MSE grid for scales. Two settings that do not
change the result are set for this machine: ``offload_to_disk=False`` (the model fits in memory) and, on
machines with fewer than 4 cores, ``GPTQMODEL_CPU_WORKERS=2`` (GPTQModel 7.6's default of one CPU worker
on 2 cores is below the two its own model-loader pool requests, and it stops with an error).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.peers.settings import (
    PER_CHANNEL,
    PeerOutcome,
    PeerSettings,
    installed_version,
    preserved_global_state,
)

DISTRIBUTION = "gptqmodel"
#: the tuned variant's options: GPTQ at its best as its authors and GPTQModel document it, on top of the
#: defaults' true-sequential order: activation order (columns by descending Hessian diagonal, the
#: original act-order, for groups too: GPTQModel then stores a ``g_idx``), and the scale/zero-point of each
#: row or group chosen by a grid search that shrinks the min-max range and keeps the candidate of least
#: ``|q - w|^2.4`` over 80 ranges from 100 % down to 21 % of it (GPTQ's ``--mse`` option, GPTQModel's grid).
TUNED_OPTIONS: dict[str, Any] = {"desc_act": True, "act_group_aware": False, "true_sequential": True, "mse": 2.4}
#: GPTQModel's supported group sizes (``QuantizeConfig`` refuses any other)
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
#: 7.7 requires torch >= 2.14.1 (pip would replace torch); the adapter is tested with 7.6
MAX_VERSION = (7, 7)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def unavailable_reason(settings: PeerSettings) -> str | None:
    """Why GPTQ cannot run ``settings`` here, or None. Cheap: the package is not imported."""
    version = installed_version(DISTRIBUTION)
    if version is None:
        return f"{DISTRIBUTION} not installed (pip install -e '.[peers]')"
    if _version_tuple(version) >= MAX_VERSION:
        return f"{DISTRIBUTION} {version} is untested here (needs torch>=2.14.1); install {DISTRIBUTION}<7.7"
    if not 2 <= settings.bits <= 8:
        return f"GPTQModel quantizes 2-8 bits, not {settings.bits}"
    if settings.group_size not in GROUP_SIZES:
        return f"GPTQModel has no group size {settings.group_size} (one of {', '.join(map(str, GROUP_SIZES))})"
    return None


def _configure_cpu_workers() -> None:
    """Give GPTQModel at least the two CPU workers its model-loader pool asks for (see module doc)."""
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and (os.cpu_count() or 1) < 4:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace every packed GPTQ linear of ``model`` by an ``nn.Linear`` holding its dequantized weight.

    Returns each replaced module's ``g_idx`` (the group of every input column; a permutation of the
    groups under activation order).
    """
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    groups: dict[str, torch.Tensor] = {}
    packed = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseQuantLinear)]
    for name, module in packed:
        if module.qzero_format() == 1:
            # GPTQModel leaves its freshly packed linears in the v1 layout (zero-points stored minus one, what
            # v1 checkpoints hold), while dequantize_weight reads the zero-points as stored (v2): without this
            # every weight comes out one quantization step too high (SmolLM2 W4: PPL 4.6e8 instead of ~30).
            convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
        weight = module.dequantize_weight().T  # [in, out] -> [out, in]
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        linear.weight = nn.Parameter(weight.detach().to("cpu", dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to("cpu", dtype), requires_grad=False)
        groups[name] = module.g_idx.detach().to("cpu", torch.long).clone()
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
    return groups


def _keep_logs_in(directory: Path) -> None:
    """GPTQModel writes a per-layer log file under ``./logs`` of whatever directory the user ran from; the
    peer's logs belong to its temporary checkpoint, not to the user's working tree."""
    from gptqmodel.looper import loop_processor

    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = directory


def quantize(
    model: nn.Module, tokenizer: Any, ids: torch.Tensor, settings: PeerSettings, device: str = "cpu",
    tuned: bool = False,
) -> PeerOutcome:
    """GPTQ of ``model`` on the calibration rows ``ids`` ``[N, T]``; returns the fake-quantized model.

    ``model`` itself is not changed: GPTQModel quantizes its own copy, loaded from a saved checkpoint.
    ``tuned`` adds :data:`TUNED_OPTIONS` (activation order, MSE grid) to GPTQModel's defaults.
    """
    _configure_cpu_workers()
    from gptqmodel import GPTQModel, QuantizeConfig

    dtype = next(model.parameters()).dtype
    if tuned:
        options = dict(TUNED_OPTIONS)
    else:
        options = {"desc_act": True, "act_group_aware": False} if settings.group_size == PER_CHANNEL else {}
    config = QuantizeConfig(bits=settings.bits, group_size=settings.group_size, sym=settings.sym,
                            offload_to_disk=False, **options)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    with tempfile.TemporaryDirectory(prefix="cbq-peer-gptq-") as checkpoint, preserved_global_state(), \
            torch._dynamo.config.patch(disable=True):  # no torch.compile (a C++ toolchain, minutes on CPU)
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        _keep_logs_in(Path(checkpoint) / "logs")
        started = time.perf_counter()
        wrapped = GPTQModel.load(checkpoint, config, device=device, dtype=dtype)
        wrapped.quantize(calibration)
        quantized = wrapped.model
        groups = dequantize_linears(quantized, dtype)
        quantize_s = time.perf_counter() - started
    if hasattr(quantized.config, "quantization_config"):
        del quantized.config.quantization_config
    quantized.requires_grad_(False).eval()
    effective = {
        **settings.__dict__,
        "desc_act": config.desc_act,
        "act_group_aware": config.act_group_aware,
        "damp_percent": config.damp_percent,
        "true_sequential": config.true_sequential,
        "mse": config.mse,
        "scales": "float16",
        "samples": int(ids.shape[0]),
        "seqlen": int(ids.shape[1]),
    }
    return PeerOutcome(model=quantized, column_groups=groups, settings=effective,
                       version=installed_version(DISTRIBUTION) or "", quantize_s=quantize_s)

"""The settings a recipe leaves to the machine (``auto``), made concrete before a run starts.

Why: one recipe per scheme serves a GPU and a CPU. ``model.dtype: auto`` and ``trainer.precision: auto`` become
bfloat16 weights with bf16 autocast (fp32 trainable parameters) on a GPU, float32 on CPU. They are resolved once,
at the start of ``cbq quantize``, so ``config.yaml``, the resume check and ``report.json`` all name what ran.
"""

from __future__ import annotations

import dataclasses

from cbq_lightning.config import QuantizeConfig
from cbq_lightning.distributed import uses_cuda
from cbq_lightning.models.loading import auto_weight_dtype


def auto_precision(cuda: bool) -> str:
    """What ``trainer.precision: auto`` means: bf16 autocast where the weights are bfloat16, fp16 autocast on a GPU
    without bfloat16, full float32 on CPU."""
    return {"bfloat16": "bf16-mixed", "float16": "16-mixed", "float32": "32-true"}[auto_weight_dtype(cuda)]


def resolve_machine_settings(config: QuantizeConfig) -> QuantizeConfig:
    """``config`` with ``model.dtype`` and ``trainer.precision`` made concrete for this machine (others unchanged)."""
    cuda = uses_cuda(config.trainer.accelerator)
    model, trainer = config.model, config.trainer
    if model.dtype == "auto":
        model = dataclasses.replace(model, dtype=auto_weight_dtype(cuda))
    if str(trainer.precision) == "auto":
        trainer = dataclasses.replace(trainer, precision=auto_precision(cuda))
    return dataclasses.replace(config, model=model, trainer=trainer)

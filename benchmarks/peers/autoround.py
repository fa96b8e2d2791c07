"""AutoRound (Cheng et al., SignRound) as a peer, run in-process on the loaded model object.

AutoRound takes an ``nn.Module`` and a list of token tensors directly, so it quantizes the very model our
loader produced, on the very calibration rows CBQ used; after ``quantize()`` the model's linears hold
fake-quantized weights (``scale * (q - zero)``, float16 scales), which our evaluator runs as they are.

Settings: bits / group size / symmetry from the scheme, the calibration rows' count and length as
``nsamples`` / ``seqlen``, the recipe's seed; everything else is AutoRound's default (SignRound with
min-max tuning, learning rate ``1 / iters``, batch 8, lm_head left in full precision) except ``iters``,
which the light variant lowers from AutoRound's 200 to its 50 to fit a CPU budget - the row states it - and
``amp=False``: on a CPU with bf16 support (AVX-512 BF16 / AMX) AutoRound would otherwise cast the whole model to
bfloat16, so the peer would be tuned and scored in another precision than CBQ (float32) and its row would
depend on which machine ran it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from benchmarks.peers.settings import (
    PeerOutcome,
    PeerSettings,
    contiguous_groups,
    installed_version,
    preserved_global_state,
)
from cbq_lightning.models.adapter import DecoderAdapter

DISTRIBUTION = "auto-round"
#: AutoRound's own default iterations per block (its recipe "auto-round")
DEFAULT_ITERS = 200
#: AutoRound's "light" recipe (its ``--iters 50`` preset): a quarter of the tuning, for a CPU budget
LIGHT_ITERS = 50


def unavailable_reason(settings: PeerSettings) -> str | None:
    """Why AutoRound cannot run ``settings`` here, or None. Cheap: the package is not imported."""
    if installed_version(DISTRIBUTION) is None:
        return f"{DISTRIBUTION} not installed (pip install -e '.[peers]')"
    if not 2 <= settings.bits <= 8:
        return f"AutoRound's integer weights are 2-8 bits, not {settings.bits}"
    return None


def quantize(
    model: nn.Module, tokenizer: Any, ids: torch.Tensor, settings: PeerSettings, iters: int = DEFAULT_ITERS,
    seed: int = 0, device: str = "cpu", amp: bool = False,
) -> PeerOutcome:
    """AutoRound of ``model`` (in place) on the calibration rows ``ids`` ``[N, T]``, ``iters`` per block.

    ``amp``: AutoRound's own mixed precision, its default; off for the quality rows (module docstring), on where
    only its speed on a GPU is measured (``benchmarks/speed.py``), as a user would run it there."""
    from auto_round import AutoRound

    options: dict[str, Any] = {"iters": iters}
    started = time.perf_counter()
    with preserved_global_state():  # AutoRound seeds the global generators with `seed`
        rounder = AutoRound(
            model, tokenizer=tokenizer, bits=settings.bits, group_size=settings.group_size, sym=settings.sym,
            dataset=[row.unsqueeze(0) for row in ids], nsamples=int(ids.shape[0]), seqlen=int(ids.shape[1]),
            device_map=device, seed=seed, amp=amp, **options,
        )
        quantized, _ = rounder.quantize()
    quantize_s = time.perf_counter() - started
    quantized.requires_grad_(False).eval()
    tuned = rounder.quantize_config
    calibration = rounder.calibration_context
    effective = {
        **settings.__dict__,
        "iters": tuned.iters,
        "lr": tuned.lr,
        "minmax_tuning": tuned.enable_minmax_tuning,
        "batch_size": calibration.batch_size,
        "amp": amp,
        "scales": str(getattr(rounder, "_scale_dtype", "")).removeprefix("torch."),
        "samples": int(ids.shape[0]),
        "seqlen": int(ids.shape[1]),
        "seed": seed,
    }
    in_blocks = {id(module) for block in DecoderAdapter(quantized).blocks for module in block.modules()}
    groups = {
        name: contiguous_groups(module.in_features, settings.group_size)
        for name, module in quantized.named_modules()
        if isinstance(module, nn.Linear) and id(module) in in_blocks
    }
    return PeerOutcome(model=quantized, column_groups=groups, settings=effective,
                       version=installed_version(DISTRIBUTION) or "", quantize_s=quantize_s)

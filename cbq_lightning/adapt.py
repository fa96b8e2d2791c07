"""One recipe per scheme for every supported family: the recipe's extensions fitted to the model at hand.

Why a module of its own: the runner decides what runs; this is the single place that says which extension a model
cannot take (a rotation without an exact layout for its family, a LoRA rank wider than a layer) and what runs
instead, so the default recipes never refuse a model the method itself supports.
"""

from __future__ import annotations

import logging
from typing import Any

from cbq_lightning.models.adapter import DecoderAdapter
from cbq_lightning.quant.convert import narrow_layers
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.rotation.fold import RotationConfig, rotation_unavailable

log = logging.getLogger("cbq_lightning")


def adapt_to_model(
    rotation: RotationConfig | None, rounding: RoundingConfig, adapter: DecoderAdapter,
) -> tuple[RotationConfig | None, dict[str, Any]]:
    """The recipe's extensions fitted to this model: the rotation to fold (None where the family has no exact
    layout) and ``{part: what changed and why}`` for the log and ``report.json``.

    Why: one recipe per scheme serves every supported family. An extension that cannot apply to a model (a
    rotation that does not fold exactly, a LoRA rank wider than a layer) is left out or narrowed for that model
    with one log line, instead of refusing a model the method itself supports.
    """
    adapted: dict[str, Any] = {}
    reason = rotation_unavailable(adapter) if rotation is not None else None
    if reason is not None:
        log.warning("rotation skipped: %s; this run quantizes the unrotated model", reason)
        adapted["rotation"] = {"action": "skipped", "reason": reason}
        rotation = None
    narrow = narrow_layers(adapter.blocks, rounding)
    if narrow:
        log.warning("rounding.rank=%d is not below the smaller dimension of %d layers: they use half of it (%s)",
                    rounding.rank, len(narrow), ", ".join(sorted({str(rank) for rank in narrow.values()})))
        adapted["rounding.rank"] = {"action": "narrowed", "requested": rounding.rank, "layers": narrow}
    return rotation, adapted

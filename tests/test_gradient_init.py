"""``extensions.rounding_init: gradient`` in a real run: which factors each window re-chooses, and that it trains."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from cbq_lightning.quant.convert import quant_linears
from cbq_lightning.quant.rounding import LoRARounding
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, fast_flags, load_recipe


class RecordFactors(L.Callback):
    """Per window: each LoRA-Rounding's ``A2`` when the first step starts (after the module's ``on_train_start``
    aligned it) and when the fit ends, keyed by ``(block, layer name)``."""

    def __init__(self) -> None:
        self.first_step: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
        self.end: dict[int, dict[tuple[int, str], torch.Tensor]] = {}

    def _factors(self, module) -> dict[tuple[int, str], torch.Tensor]:
        return {(block, name): layer.rounding.a2.detach().clone()
                for block, block_module in zip(module.window.blocks, module.blocks, strict=True)
                for name, layer in quant_linears(block_module) if isinstance(layer.rounding, LoRARounding)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.global_step == 0:
            self.first_step[pl_module.window.index] = self._factors(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.end[pl_module.window.index] = self._factors(pl_module)


def _orthogonal_at_start_scale(a2: torch.Tensor, init_std: float) -> bool:
    scale = init_std * math.sqrt(a2.shape[1])
    return torch.allclose(a2 @ a2.T, torch.eye(a2.shape[0]) * scale**2, rtol=1e-4, atol=1e-5)


def test_entering_blocks_are_aligned_and_the_overlap_block_keeps_its_trained_factors(tmp_path: Path) -> None:
    """Windows (0,1), (1,2), (2,3): in each, the block entering for the first time starts with ``A2`` of
    orthogonal rows at the random start's scale (the aligned choice; a Gaussian ``A2`` is not orthogonal),
    while the block carried over from the previous window starts where that window left it."""
    recorder = RecordFactors()
    flags = (*fast_flags(), "--extensions.rounding_init", "gradient", "--extensions.rounding_init_batches", "2", "--rounding.rank", "4")
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *flags), [recorder]).report
    init_std = 0.1
    for window in report["windows"]:
        index, blocks = window["index"], window["blocks"]
        entering = blocks if index == 0 else blocks[1:]
        for (block, name), a2 in recorder.first_step[index].items():
            if block in entering:
                assert _orthogonal_at_start_scale(a2, init_std), (index, block, name)
            else:
                assert torch.equal(a2, recorder.end[index - 1][(block, name)]), (index, block, name)
        assert window["train_loss_last"] < window["train_loss_first"], index


def test_random_factors_are_left_alone_by_default(tmp_path: Path) -> None:
    """The default (``extensions.rounding_init: random``) does not touch the Gaussian start: its rows are not orthogonal."""
    recorder = RecordFactors()
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *fast_flags(1)), [recorder])
    assert not any(_orthogonal_at_start_scale(a2, 0.1) for a2 in recorder.first_step[0].values())

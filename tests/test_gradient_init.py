"""``rounding.init: gradient`` in a real run: which factors each window re-chooses, and that it trains."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from cbq_lightning.quant.convert import quant_linears
from cbq_lightning.quant.rounding import LoRARounding
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, fast_flags, load_recipe

Key = tuple[int, str]


class RecordFactors(L.Callback):
    """Per window: each LoRA-Rounding's ``A2`` (and, with ``decisions``, its hardened decisions) when the first
    step starts (after the module's ``on_train_start`` aligned it) and when the fit ends, keyed by
    ``(block, layer name)``."""

    def __init__(self, decisions: bool = False) -> None:
        self.decisions = decisions
        self.first_step: dict[int, dict[Key, torch.Tensor]] = {}
        self.end: dict[int, dict[Key, torch.Tensor]] = {}
        self.first_decisions: dict[int, dict[Key, torch.Tensor]] = {}
        self.end_decisions: dict[int, dict[Key, torch.Tensor]] = {}

    def _roundings(self, module) -> dict[Key, LoRARounding]:
        return {(block, name): layer.rounding
                for block, block_module in zip(module.window.blocks, module.blocks, strict=True)
                for name, layer in quant_linears(block_module) if isinstance(layer.rounding, LoRARounding)}

    def _record(self, module, factors: dict, decisions: dict) -> None:
        roundings = self._roundings(module)
        factors[module.window.index] = {key: r.a2.detach().clone() for key, r in roundings.items()}
        if self.decisions:
            decisions[module.window.index] = {key: r.hard() for key, r in roundings.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.global_step == 0:
            self._record(pl_module, self.first_step, self.first_decisions)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(pl_module, self.end, self.end_decisions)


def _orthogonal_at_start_scale(a2: torch.Tensor, init_std: float) -> bool:
    scale = init_std * math.sqrt(a2.shape[1])
    return torch.allclose(a2 @ a2.T, torch.eye(a2.shape[0]) * scale**2, rtol=1e-4, atol=1e-5)


def test_entering_blocks_are_aligned_and_the_overlap_block_keeps_its_trained_factors(tmp_path: Path) -> None:
    """Windows (0,1), (1,2), (2,3): in each, the block entering for the first time starts with ``A2`` of
    orthogonal rows at the random start's scale (the aligned choice; a Gaussian ``A2`` is not orthogonal),
    while the block carried over from the previous window starts where that window left it."""
    recorder = RecordFactors()
    flags = (*fast_flags(), "--rounding.init", "gradient", "--rounding.init_batches", "2", "--rounding.rank", "4")
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


def test_merge_on_revisit_realigns_the_overlap_block_with_the_same_decisions(tmp_path: Path) -> None:
    """``rounding.revisit: merge``: every block of every window starts with an aligned ``A2`` (orthogonal rows at
    the start scale), the carried block included, and the carried block's hardened decisions at its second
    window's first step are those its first window ended with (the merge moves no logit)."""
    recorder = RecordFactors(decisions=True)
    flags = (*fast_flags(), "--rounding.init", "gradient", "--rounding.init_batches", "2", "--rounding.rank", "4",
             "--rounding.revisit", "merge")
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *flags), [recorder]).report
    for window in report["windows"]:
        index, blocks = window["index"], window["blocks"]
        for key, a2 in recorder.first_step[index].items():
            assert _orthogonal_at_start_scale(a2, 0.1), (index, key)
        if index > 0:
            carried = [key for key in recorder.first_step[index] if key[0] == blocks[0]]
            assert carried
            for key in carried:
                assert torch.equal(recorder.first_decisions[index][key], recorder.end_decisions[index - 1][key]), key
        assert window["train_loss_last"] < window["train_loss_first"], index


class RecordMerges(L.Callback):
    """Per step of window 0: each LoRA-Rounding's hardened decisions before the module's ``on_train_batch_start``
    (a callback's hook runs first) and, after the forward, whether ``A1`` is zero and ``A2`` orthogonal."""

    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}
        self.a1_zero: dict[int, bool] = {}
        self.a2_aligned: dict[int, bool] = {}

    @staticmethod
    def _roundings(module) -> list[LoRARounding]:
        return [layer.rounding for _, layer in quant_linears(module.blocks) if isinstance(layer.rounding, LoRARounding)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.window.index == 0:
            self.before[pl_module.global_step] = [r.hard() for r in self._roundings(pl_module)]

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if pl_module.window.index == 0:
            roundings, step = self._roundings(pl_module), pl_module.global_step
            self.after[step] = [r.hard() for r in roundings]
            self.a1_zero[step] = all(not r.a1.any() for r in roundings)
            self.a2_aligned[step] = all(_orthogonal_at_start_scale(r.a2.detach(), 0.1) for r in roundings)


def test_merge_every_restarts_aligned_factors_without_moving_a_decision(tmp_path: Path) -> None:
    """``rounding.merge_every: 2``: at steps 2, 4, ... every factor product is merged into ``V0`` (``A1`` zero
    again, ``A2`` re-aligned: orthogonal at the start scale) and no hardened decision moves with it; between
    merges ``A1`` trains; the fit's loss still falls."""
    recorder = RecordMerges()
    flags = (*fast_flags(), "--rounding.init", "gradient", "--rounding.init_batches", "1", "--rounding.rank", "4",
             "--rounding.merge_every", "2")
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *flags), [recorder]).report
    steps = sorted(recorder.after)
    assert len(steps) >= 5
    for step in steps:
        merged = step % 2 == 0
        assert recorder.a1_zero[step] == merged, step
        if merged:
            assert recorder.a2_aligned[step], step
            assert all(torch.equal(b, a) for b, a in zip(recorder.before[step], recorder.after[step], strict=True)), step
    assert all(w["train_loss_last"] < w["train_loss_first"] for w in report["windows"])


def test_snapshot_restores_merged_offsets(tmp_path: Path) -> None:
    """Keep-best and the divergence retry restore a :class:`TrainableSnapshot`; with merges during the fit ``V0``
    changes, so the snapshot holds it too (else a restored ``A1`` would sit on a different ``V0``)."""
    from cbq_lightning.guard import TrainableSnapshot

    window, layer = torch.nn.Module(), torch.nn.Module()  # buffer name "q_proj.rounding.v0", as in a block
    window.q_proj = layer
    layer.rounding = LoRARounding(torch.full((4, 6), 0.3), rank=2, generator=torch.Generator().manual_seed(0))
    snapshot = TrainableSnapshot(window)
    before = layer.rounding.logits().detach().clone()
    with torch.no_grad():
        layer.rounding.a1.fill_(0.5)
    layer.rounding.merge_product()
    assert not torch.equal(layer.rounding.logits().detach(), before)
    snapshot.restore(window)
    assert torch.equal(layer.rounding.logits().detach(), before)


def test_random_factors_are_left_alone_by_default(tmp_path: Path) -> None:
    """The default (``rounding.init: random``) does not touch the Gaussian start: its rows are not orthogonal."""
    recorder = RecordFactors()
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *fast_flags(1)), [recorder])
    assert not any(_orthogonal_at_start_scale(a2, 0.1) for a2 in recorder.first_step[0].values())

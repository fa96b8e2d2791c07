"""The cross-block state computes the full-precision path once (docs/results.md, "Speed"): every window's targets
and caches are bit-identical to the pass-per-window computation, with S + K teacher block forwards per window
(S on the full-precision path, K for ``Y_h``) instead of 3K + S."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from cbq_lightning.cache import TensorStore
from cbq_lightning.crossblock import CrossBlockState
from cbq_lightning.models.adapter import DecoderAdapter, block_output, run_blocks_batched
from cbq_lightning.quant.convert import quantize_block
from cbq_lightning.quant.qlinear import LayerQuantConfig
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.windows import WindowConfig, window_schedule


def _quantizer(index: int, block: nn.Module) -> None:
    quantize_block(block, LayerQuantConfig(QuantScheme(w_bits=3), RoundingConfig(rank=2), learnable_clip=True,
                                           clip_init=0.99), generator=torch.Generator().manual_seed(index))


class _Counted(nn.Module):
    """A teacher that counts its forward calls (per batch) into a shared counter under its block index."""

    def __init__(self, block: nn.Module, index: int, calls: Counter) -> None:
        super().__init__()
        self.block, self.index, self.calls = block, index, calls

    def forward(self, *args, **kwargs):
        self.calls[self.index] += 1
        return self.block(*args, **kwargs)


def _walk(model: nn.Module, size: int, overlap: int, store: TensorStore | None = None,
          target_dtype: torch.dtype | None = None):
    """Walk every window of a (size, overlap) schedule without training; per window the cached targets and the
    caches after it, the expected values computed pass by pass from the original blocks, and the teacher calls."""
    adapter = DecoderAdapter(model)
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = adapter.capture_block_inputs(ids)
    originals = [copy.deepcopy(block) for block in adapter.blocks]
    calls: Counter = Counter()
    state = CrossBlockState(adapter.blocks, hidden, kwargs, _quantizer, batch_size=4, target_dtype=target_dtype,
                            **({"store": store} if store is not None else {}))
    snapshot = state._snapshot_teacher

    def counted_snapshot(index: int) -> None:
        snapshot(index)
        state.teachers[index] = _Counted(state.teachers[index], index, calls)

    state._snapshot_teacher = counted_snapshot
    records = []
    for window in window_schedule(len(adapter.blocks), WindowConfig(size, overlap)):
        x_fp, x_q = state.x_fp, state.x_q
        before = sum(calls.values())
        state.enter(window, "cpu")
        blocks = [originals[i] for i in window.blocks]
        per_block = kwargs.for_blocks(window.blocks)
        expected_fp = run_blocks_batched(blocks, x_fp, per_block, "cpu", 4, out_dtype=target_dtype)
        expected_h = run_blocks_batched(blocks, x_q, per_block, "cpu", 4, out_dtype=target_dtype)
        y_fp, y_h = state.y_fp.clone(), state.y_h.clone()
        calls_enter = sum(calls.values()) - before
        state.leave(window, "cpu")
        depth = window.finalized[-1] + 1
        expected_x_fp = run_blocks_batched(originals[:depth], hidden, kwargs.for_blocks(range(depth)), "cpu", 4)
        records.append({"window": window, "y_fp": (y_fp, expected_fp), "y_h": (y_h, expected_h),
                        "x_fp": (state.x_fp.clone(), expected_x_fp), "teacher_calls": calls_enter,
                        "leave_calls": sum(calls.values()) - before - calls_enter})
    return records, state


@pytest.mark.parametrize("size,overlap", [(2, 1), (3, 1), (2, 0)])
def test_targets_and_caches_equal_the_pass_per_window_computation(tiny_model: nn.Module, size: int,
                                                                  overlap: int) -> None:
    records, state = _walk(copy.deepcopy(tiny_model), size, overlap)
    for record in records:
        for name in ("y_fp", "y_h", "x_fp"):
            got, expected = record[name]
            assert torch.equal(got, expected), (record["window"], name)
    assert state._fp_states == {}  # nothing kept past the last window


def test_each_window_pushes_the_full_precision_path_through_only_its_new_blocks(tiny_model: nn.Module) -> None:
    """4 blocks, K=2, O=1: window 0 runs its 2 teachers once (Y_h is Y_fp); the later ones 1 block for Y_fp and 2
    for Y_h, per batch of 4 of the 6 samples (2 batches); advancing X_fp runs no teacher at all."""
    records, _ = _walk(copy.deepcopy(tiny_model), 2, 1)
    batches = 2
    assert [r["teacher_calls"] for r in records] == [2 * batches, 3 * batches, 3 * batches]
    assert [r["leave_calls"] for r in records] == [0, 0, 0]


def test_disk_store_and_bfloat16_targets_keep_the_values(tiny_model: nn.Module, tmp_path) -> None:
    store = TensorStore(tmp_path / "cache")
    records, _ = _walk(copy.deepcopy(tiny_model), 2, 1, store=store, target_dtype=torch.bfloat16)
    for record in records:
        for name in ("y_fp", "y_h", "x_fp"):
            got, expected = record[name]
            assert torch.equal(got, expected), (record["window"], name)
    assert records[0]["y_fp"][0].dtype == torch.bfloat16
    store.cleanup()


def test_bfloat16_blocks_and_caches_with_float32_targets_keep_the_values(tiny_model: nn.Module) -> None:
    """The GPU layout: bf16 weights and caches, float32 targets (``advanced.cache.target_dtype``'s default)."""
    records, _ = _walk(copy.deepcopy(tiny_model).to(torch.bfloat16), 2, 1, target_dtype=torch.float32)
    for record in records:
        for name in ("y_fp", "y_h", "x_fp"):
            got, expected = record[name]
            assert torch.equal(got, expected), (record["window"], name)
    assert records[0]["y_fp"][0].dtype == torch.float32 and records[0]["x_fp"][0].dtype == torch.bfloat16
    assert [r["teacher_calls"] for r in records] == [4, 6, 6]  # kept states: the same count as in float32


class _Float64Out(nn.Module):
    """A block whose output is float64 while the caches are float32 (as bf16 blocks over float32 caches)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
        return block_output(self.block(hidden.float(), **kwargs)).double()


def test_blocks_computing_in_another_dtype_fall_back_to_a_pass_per_window(tiny_model: nn.Module) -> None:
    """A kept state would differ from going on inside the pass when the blocks' outputs are not in the caches' dtype,
    so then every window computes its targets from X_fp as before, with the same values."""
    adapter = DecoderAdapter(copy.deepcopy(tiny_model))
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = adapter.capture_block_inputs(ids)
    originals = [_Float64Out(copy.deepcopy(block)) for block in adapter.blocks]
    state = CrossBlockState(adapter.blocks, hidden, kwargs, _quantizer, batch_size=4)
    snapshot = state._snapshot_teacher

    def float64_snapshot(index: int) -> None:
        snapshot(index)
        state.teachers[index] = _Float64Out(state.teachers[index])

    state._snapshot_teacher = float64_snapshot
    for window in window_schedule(len(adapter.blocks), WindowConfig(2, 1))[:2]:
        x_fp = state.x_fp
        state.enter(window, "cpu")
        expected = run_blocks_batched([originals[i] for i in window.blocks], x_fp, kwargs.for_blocks(window.blocks),
                                      "cpu", 4)
        assert torch.equal(state.y_fp, expected)
        assert not state._keep_fp_states and state._fp_states == {}
        state.leave(window, "cpu")

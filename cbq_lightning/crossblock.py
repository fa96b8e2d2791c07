"""State that walks down the model with the sliding windows (docs/method.md §3).

It owns the two input caches (``X_fp``: hidden states of the full-precision model, ``X_q``: hidden
states produced by the already-quantized blocks), the frozen full-precision *teacher* copy of every block
that is in or before the current window, and the teacher targets of the current window. The Lightning
callback (:mod:`callbacks.cross_block`) calls :meth:`CrossBlockState.enter` before a window's fit and
:meth:`CrossBlockState.leave` after it; the RTN baseline calls the same two methods without training.

Teachers are copied when a block first enters a window - before any preprocessing or quantization - so
targets always come from the *original* full-precision blocks, and at most K copies are alive at once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cbq_lightning.cache import TensorStore
from cbq_lightning.distributed import all_reduce_
from cbq_lightning.models.adapter import BlockKwargs, run_blocks_batched
from cbq_lightning.models.moe import count_routed_tokens
from cbq_lightning.quant.convert import finalize_block
from cbq_lightning.windows import Window

#: ``preprocess(block_index, block, block_inputs, block_kwargs) -> stats``: runs on a block entering its
#: first window, before its linears are quantized (CFP hooks in here); may modify the block in place.
#: A preprocessor with a ``max_samples`` attribute reads only that many leading sequences of its inputs.
Preprocessor = Callable[[int, nn.Module, torch.Tensor, dict[str, Any]], dict[str, float]]


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||output - reference||^2 / ||reference||^2``: scale-free, comparable across blocks.

    Under DDP both sums run over every rank's shard, so all ranks report the same value.
    """
    reference = reference.float()
    sums = torch.stack([(output.float() - reference).pow(2).sum(), reference.pow(2).sum()]).double()
    error, power = all_reduce_(sums).tolist()
    return error / max(power, 1e-30)


@dataclass
class BlockError:
    """Output error after one block of the quantized model against the full-precision model."""

    block: int
    quantized: float
    rtn: float | None = None


@dataclass
class CrossBlockState:
    """Caches, teachers and targets of the cross-block calibration.

    Args:
        blocks: the model's transformer blocks (quantized in place as they enter windows).
        inputs: ``X`` at block 0, ``[N, T, H]`` on CPU (the start of both caches).
        block_kwargs: keyword arguments each block is called with (CPU tensors).
        quantize: ``quantize(block_index, block)`` replaces the block's linears by quantized ones.
        rtn_reference: ``rtn_reference(index, fp_block)`` returns an RTN copy of block ``index``, to track the
            RTN error per block alongside CBQ's; ``None`` switches that monitoring off.
        batch_size: sequences per forward when computing targets and advancing caches.
        preprocessors: run on each block entering its first window (see :data:`Preprocessor`).
        store: where the caches are allocated (RAM, or memory-mapped files).
        target_dtype: dtype of the cached teacher targets (None: the caches' dtype).
    """

    blocks: nn.ModuleList
    inputs: torch.Tensor
    block_kwargs: BlockKwargs
    quantize: Callable[[int, nn.Module], None]
    rtn_reference: Callable[[int, nn.Module], nn.Module] | None = None
    batch_size: int = 8
    preprocessors: list[Preprocessor] = field(default_factory=list)
    store: TensorStore = field(default_factory=TensorStore)
    target_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.x_fp = self.inputs
        self.x_q = self.inputs
        self.x_rtn = self.inputs if self.rtn_reference is not None else None
        self.y_fp: torch.Tensor | None = None
        self.y_h: torch.Tensor | None = None
        self.teachers: dict[int, nn.Module] = {}
        self.block_errors: list[BlockError] = []
        self.preprocess_stats: dict[int, dict[str, float]] = {}
        #: mixture of experts: tokens each finalised block's router sent to each expert on the calibration inputs
        self.routed_tokens: dict[int, list[int]] = {}
        self._entered: set[int] = set()
        #: index of the window whose targets are cached (a retried fit reuses them)
        self._targets_for: int | None = None

    # --- before a fit --------------------------------------------------------------------------------
    def enter(self, window: Window, device: torch.device | str, cache_targets: bool = True) -> list[int]:
        """Snapshot teachers of new blocks, preprocess and quantize them, cache the window's targets.

        ``cache_targets=False`` skips the teacher forward passes (the RTN baseline trains nothing).
        Returns the blocks that entered (their preprocessing statistics are in :attr:`preprocess_stats`).
        """
        entering = [index for index in window.blocks if index not in self._entered]
        for index in window.blocks:
            if index in self._entered:
                continue  # overlap block: keeps its learned parameters as the warm start
            block = self.blocks[index]
            self._snapshot_teacher(index)
            if self.preprocessors:
                inputs = self._quantized_path_inputs(window, index, device)
                stats: dict[str, float] = {}
                for preprocess in self.preprocessors:
                    stats.update(preprocess(index, block, inputs, self.block_kwargs[index]))
                self.preprocess_stats[index] = stats
                if inputs is not self.x_q:
                    self.store.release(inputs)
            self.quantize(index, block)
            self._entered.add(index)
        if not cache_targets or self._targets_for == window.index:
            return entering
        teachers = [self.teachers[index].to(device) for index in window.blocks]
        self.y_fp = self._run(teachers, window.blocks, self.x_fp, device, "y_fp", self.target_dtype)
        self.y_h = self._run(teachers, window.blocks, self.x_q, device, "y_h", self.target_dtype)
        for teacher in teachers:
            teacher.to("cpu")
        self._targets_for = window.index
        return entering

    def _quantized_path_inputs(self, window: Window, index: int, device: torch.device | str) -> torch.Tensor:
        """Inputs of block ``index`` on the quantized path: ``X_q`` through the window's earlier blocks.

        Only as many sequences as the preprocessors read are pushed through the earlier blocks.
        """
        indices = [b for b in window.blocks if b < index]
        if not indices:
            return self.x_q
        earlier = [self.blocks[b].to(device) for b in indices]
        return self._run(earlier, indices, self.x_q[: self._preprocess_rows()], device, "x_pre")

    def _preprocess_rows(self) -> int:
        """The most calibration sequences any preprocessor reads (one without a ``max_samples``: all)."""
        limits = [getattr(preprocess, "max_samples", None) for preprocess in self.preprocessors]
        if any(limit is None for limit in limits):
            return self.x_q.shape[0]
        return max(limits)

    def _run(
        self, blocks: list[nn.Module], indices: Sequence[int], hidden: torch.Tensor, device: torch.device | str,
        name: str, dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``blocks(hidden)`` (the model's blocks ``indices``, or their teachers) batch by batch into a new cache
        allocated by the store."""
        out = self.store.allocate(name, tuple(hidden.shape), dtype or hidden.dtype)
        kwargs = self.block_kwargs.for_blocks(indices)
        return run_blocks_batched(blocks, hidden, kwargs, device, self.batch_size, out=out)

    # --- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of this state between two windows: both caches (RTN's too when it is
        monitored), the per-block errors and the preprocessing statistics so far.

        Teachers and targets are not in it: between two windows no targets are cached, and an overlap block's
        teacher is its full-precision weights, which :meth:`reenter` copies again before the block is rebuilt.
        """
        caches = {"x_fp": self.x_fp, "x_q": self.x_q, **({"x_rtn": self.x_rtn} if self.x_rtn is not None else {})}
        return {
            **caches,
            "block_errors": [asdict(error) for error in self.block_errors],
            "preprocess_stats": {str(index): stats for index, stats in self.preprocess_stats.items()},
            "routed_tokens": {str(index): counts for index, counts in self.routed_tokens.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The inverse of :meth:`state_dict` (keys beyond its own are ignored, so a whole checkpoint can be
        passed); the entered blocks come back one by one through :meth:`reenter`."""
        self.x_fp, self.x_q = state["x_fp"], state["x_q"]
        if self.rtn_reference is not None:
            self.x_rtn = state.get("x_rtn")
        self.block_errors = [BlockError(**error) for error in state["block_errors"]]
        self.preprocess_stats = {int(index): stats for index, stats in state["preprocess_stats"].items()}
        self.routed_tokens = {int(index): counts for index, counts in state.get("routed_tokens", {}).items()}

    def reenter(
        self, index: int, layout: Callable[[int, nn.Module], None], saved: Mapping[str, torch.Tensor], finalized: bool
    ) -> None:
        """Put block ``index`` back as an interrupted run left it: ``layout(index, block)`` gives it the quantized
        structure (CFP's edits are in ``saved``), then ``saved`` fills it. A block still in a window (an overlap
        block, not ``finalized``) first gets its teacher back: its weights are still the full-precision ones."""
        block = self.blocks[index]
        if finalized:
            layout(index, block)
            finalize_block(block)
        else:
            self._snapshot_teacher(index)
            layout(index, block)
        block.load_state_dict(saved, strict=True)
        self._entered.add(index)

    def _snapshot_teacher(self, index: int) -> None:
        """A frozen full-precision copy of block ``index`` on the CPU, before anything changes the block."""
        self.teachers[index] = copy.deepcopy(self.blocks[index]).requires_grad_(False).eval().to("cpu")

    # --- after a fit ---------------------------------------------------------------------------------
    @torch.no_grad()
    def leave(self, window: Window, device: torch.device | str) -> list[BlockError]:
        """Finalise the window's leaving blocks and push both caches through them."""
        errors = []
        for index in window.finalized:
            block = self.blocks[index].to(device)
            finalize_block(block)
            teacher = self.teachers.pop(index).to(device)
            with count_routed_tokens(block) as routed:  # what the quantized block's router does (MoE only)
                self.x_q = self._replace(self.x_q, self._run([block], [index], self.x_q, device, "x_q"))
            if routed:
                self.routed_tokens[index] = routed
            self.x_fp = self._replace(self.x_fp, self._run([teacher], [index], self.x_fp, device, "x_fp"))
            error = BlockError(block=index, quantized=relative_error(self.x_q, self.x_fp))
            if self.rtn_reference is not None:
                baseline = self.rtn_reference(index, teacher)
                self.x_rtn = self._replace(self.x_rtn, self._run([baseline], [index], self.x_rtn, device, "x_rtn"))
                error.rtn = relative_error(self.x_rtn, self.x_fp)
                del baseline
            block.to("cpu")
            del teacher
            errors.append(error)
        self.block_errors.extend(errors)
        self.store.release(self.y_fp)
        self.store.release(self.y_h)
        self.y_fp = self.y_h = None
        self._targets_for = None
        return errors

    def _replace(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``new`` takes the place of cache ``old``, whose storage is released if the store owns it."""
        self.store.release(old)
        return new

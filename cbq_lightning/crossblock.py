"""State that walks down the model with the sliding windows (docs/method.md §3).

It owns the two input caches (``X_fp``: hidden states of the full-precision model, ``X_q``: hidden
states produced by the already-quantized blocks), the frozen full-precision *teacher* copy of every block
that is in or before the current window, and the teacher targets of the current window. The Lightning
callback (:mod:`callbacks.cross_block`) calls :meth:`CrossBlockState.enter` before a window's fit and
:meth:`CrossBlockState.leave` after it; the RTN baseline calls the same two methods without training.

Teachers are copied when a block first enters a window - before any preprocessing or quantization - so
targets always come from the *original* full-precision blocks, and at most K copies are alive at once.

Why the full-precision path is computed once: ``X_fp`` and ``Y_fp`` are hidden states of the unchanging
full-precision model, so with overlapping windows each is the same value at the same depth whichever window
asks. The pass that caches a window's ``Y_fp`` keeps the hidden states after the blocks the window will
finalise (the next ``X_fp``) and its own output (where the next window's ``Y_fp`` pass starts), so advancing
``X_fp`` costs nothing and each window pushes the full-precision path through only the blocks it adds. In the
first window ``X_q`` is ``X_fp``, so ``Y_h`` is ``Y_fp``. Per window of K blocks advancing by S, the teacher and
cache work is then S (full-precision path) + K (``Y_h``) + S (``X_q``) block forwards instead of 3K + S, with
bit-identical values (the same blocks on the same batches; see :meth:`CrossBlockState._fp_targets`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cbq_lightning.cache import TensorStore
from cbq_lightning.distributed import all_reduce_
from cbq_lightning.models.adapter import BlockKwargs, kwargs_list_to, run_block, run_blocks_batched
from cbq_lightning.models.moe import count_routed_tokens
from cbq_lightning.quant.convert import finalize_block, reset_block_to_round_to_nearest
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
        #: full-precision hidden states at the input of block ``b`` (``b`` = number of blocks behind them),
        #: kept by the pass that caches ``Y_fp`` for what the next windows read (see :meth:`_fp_targets`)
        self._fp_states: dict[int, torch.Tensor] = {}
        #: False once a pass showed the blocks compute in another dtype than the caches (nothing can be kept)
        self._keep_fp_states = True

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
        first_on_fp_path = self.x_q is self.x_fp  # nothing quantized has run yet: Y_h would repeat Y_fp
        with self._teachers_on(window.blocks, device) as teachers:
            self.y_fp = self._fp_targets(window, device)
            self.y_h = self.y_fp if first_on_fp_path else self._run(teachers, window.blocks, self.x_q, device, "y_h",
                                                                     self.target_dtype)
        self._targets_for = window.index
        return entering

    def _fp_targets(self, window: Window, device: torch.device | str) -> torch.Tensor:
        """``Y_fp``: the teachers of the window's blocks from the deepest full-precision state already computed
        (the previous window's output), keeping the states that this window's leave and the next window read."""
        first, end = window.blocks[0], window.blocks[-1] + 1
        if not self._keep_fp_states:
            with self._teachers_on(window.blocks, device) as teachers:
                return self._run(teachers, window.blocks, self.x_fp, device, "y_fp", self.target_dtype)
        start = max((depth for depth in self._fp_states if first < depth <= end), default=first)
        if start == end:
            output = self._fp_states[end]
        else:
            hidden = self._fp_states[start] if start > first else self.x_fp
            indices = list(range(start, end))
            # the inputs of the next window and of every block this window finalises, and its output
            wanted = {index + 1 for index in window.finalized} | {end}
            depths = sorted(depth for depth in wanted if depth > start)
            with self._teachers_on(indices, device) as teachers:
                states = self._run_keeping(teachers, indices, hidden, device, depths)
            if states is None:  # the blocks do not compute in the caches' dtype: the one pass per window
                self._keep_fp_states = False
                return self._fp_targets(window, device)
            for depth in [depth for depth in self._fp_states if depth < first]:
                self._release_unless_live(self._fp_states.pop(depth))
            self._fp_states.update(states)
            output = states[end]
        if self.target_dtype is None or self.target_dtype == output.dtype:
            return output
        targets = self.store.allocate("y_fp", tuple(output.shape), self.target_dtype)
        targets.copy_(output)  # the same cast a pass writing into a cache of the targets' dtype makes
        return targets

    @contextmanager
    def _teachers_on(self, indices: Sequence[int], device: torch.device | str) -> Iterator[list[nn.Module]]:
        """The teachers of blocks ``indices`` on ``device`` for the passes inside, then back where they were (so a
        nested use does not move them back and forth: the window's entry copies its teachers over once)."""
        teachers = [self.teachers[index] for index in indices]
        homes = [next(teacher.parameters(), torch.empty(0)).device for teacher in teachers]
        try:
            yield [teacher.to(device) for teacher in teachers]
        finally:
            for teacher, home in zip(teachers, homes, strict=True):
                teacher.to(home)

    @torch.no_grad()
    def _run_keeping(
        self, blocks: list[nn.Module], indices: Sequence[int], hidden: torch.Tensor, device: torch.device | str,
        depths: Sequence[int],
    ) -> dict[int, torch.Tensor] | None:
        """``blocks(hidden)`` batch by batch, keeping the hidden state at each depth in ``depths`` (after block
        ``depth - 1``) in a new cache of ``hidden``'s dtype: ``{depth: cache}``.

        None where a block's output has another dtype than the caches: a later pass restarting from a kept state
        equals going on inside this pass only when storing the state changes nothing, so nothing is kept then.
        """
        out = {depth: self.store.allocate(f"x_fp{depth}", tuple(hidden.shape), hidden.dtype) for depth in depths}
        per_block = kwargs_list_to(self.block_kwargs.for_blocks(indices), device)
        for start in range(0, hidden.shape[0], self.batch_size):
            x = hidden[start : start + self.batch_size].to(device)
            for index, block, kwargs in zip(indices, blocks, per_block, strict=True):
                x = run_block(block, x, kwargs)
                if index + 1 in out:
                    if x.dtype != hidden.dtype:
                        for cache in out.values():
                            self.store.release(cache)
                        return None
                    out[index + 1][start : start + x.shape[0]] = x.to("cpu")
        return out

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
        self._drop_fp_states()
        self.x_fp, self.x_q = state["x_fp"], state["x_q"]
        if self.rtn_reference is not None:
            self.x_rtn = state.get("x_rtn")
        self.block_errors = [BlockError(**error) for error in state["block_errors"]]
        self.preprocess_stats = {int(index): stats for index, stats in state["preprocess_stats"].items()}
        self.routed_tokens = {int(index): counts for index, counts in state.get("routed_tokens", {}).items()}

    def reenter(
        self, index: int, layout: Callable[[int, nn.Module], None], saved: Mapping[str, torch.Tensor], finalized: bool,
        reset: bool = False,
    ) -> None:
        """Put block ``index`` back as an interrupted run left it: ``layout(index, block)`` gives it the quantized
        structure (CFP's edits are in ``saved``), then ``saved`` fills it. A block still in a window (an overlap
        block, not ``finalized``) first gets its teacher back: its weights are still the full-precision ones;
        ``reset``: the divergence guard had put it back at round-to-nearest (no learned state to fill)."""
        block = self.blocks[index]
        if finalized:
            layout(index, block)
            finalize_block(block)
        else:
            self._snapshot_teacher(index)
            layout(index, block)
            if reset:
                reset_block_to_round_to_nearest(block)
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
            teacher = self.teachers.pop(index)
            if self.rtn_reference is not None or index + 1 not in self._fp_states:
                teacher.to(device)  # it computes here; a kept X_fp needs no teacher, so it is not copied over
            with count_routed_tokens(block) as routed:  # what the quantized block's router does (MoE only)
                self.x_q = self._replace(self.x_q, self._run([block], [index], self.x_q, device, "x_q"))
            if routed:
                self.routed_tokens[index] = routed
            self.x_fp = self._advance_fp(index, teacher, device)
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
        for target in {id(t): t for t in (self.y_fp, self.y_h) if t is not None}.values():
            self._release_unless_live(target)
        self.y_fp = self.y_h = None
        self._targets_for = None
        if window.blocks[-1] == len(self.blocks) - 1:  # the last window: nothing deeper will read them
            self._drop_fp_states()
        return errors

    def _advance_fp(self, index: int, teacher: nn.Module, device: torch.device | str) -> torch.Tensor:
        """``X_fp`` after block ``index``: kept by the pass that cached ``Y_fp``, or computed (the RTN walk caches no
        targets; a resumed run's first window starts without kept states)."""
        state = self._fp_states.pop(index + 1, None)
        if state is None:
            state = self._run([teacher], [index], self.x_fp, device, "x_fp")
        return self._replace(self.x_fp, state)

    def _drop_fp_states(self) -> None:
        """Forget the kept full-precision states (the walk ended, or a resume replaced the caches)."""
        states = list(self._fp_states.values())
        self._fp_states.clear()
        for state in states:
            self._release_unless_live(state)

    def _release_unless_live(self, tensor: torch.Tensor) -> None:
        """Release a cache nothing reads any more: not a kept full-precision state and not an input cache."""
        live = (*self._fp_states.values(), self.x_fp, self.x_q, self.inputs)
        if not any(tensor is cache for cache in live if cache is not None):
            self.store.release(tensor)

    def _replace(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``new`` takes the place of cache ``old``, whose storage is released if the store owns it."""
        self.store.release(old)
        return new

"""``WindowCheckpoint``: after each finished window, saves what a resumed run needs to go on from the next one.

A window is the unit of work a run never loses: once :class:`CrossBlockCallback` has finished a window (finalised
its leaving blocks and recorded it, whether the window trained or the divergence guard put it back at
round-to-nearest), it calls :meth:`WindowCheckpoint.save`, registered as its listener, which writes the finalised
blocks, both input caches, the overlap blocks' calibrating state, the random state and the records so far
(:class:`cbq_lightning.checkpoint.WindowCheckpointer` writes them atomically); a resumed run reads them back
through :meth:`WindowCheckpoint.restore`, so one object owns both directions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from callbacks.cross_block import CrossBlockCallback
from cbq_lightning.cfp import CoarseToFinePreprocessor
from cbq_lightning.checkpoint import ResumePoint, WindowCheckpointer, restore_rng
from cbq_lightning.crossblock import CrossBlockState
from cbq_lightning.windows import Window


class WindowCheckpoint:
    """Saves the run's state after each window: ``records.add_listener(checkpoint.save)``.

    Args:
        checkpointer: where and how the files are written (one checkpoint per rank under DDP).
        state: the cross-block state (blocks, caches and history).
        records: the callback that owns the window records (and calls :meth:`save` once a window's is written).
        cfp: the preprocessor, whose outlier channels the report lists for every block.
        generator: the random generator of the LoRA-Rounding initialisation, restored on resume.
        fp_results: the full-precision perplexities, kept so that a resumed run does not measure them again.
    """

    def __init__(
        self,
        checkpointer: WindowCheckpointer,
        state: CrossBlockState,
        records: CrossBlockCallback,
        cfp: CoarseToFinePreprocessor,
        generator: torch.Generator,
        fp_results: list[dict[str, Any]] | None,
    ) -> None:
        self.checkpointer = checkpointer
        self.state = state
        self.records = records
        self.cfp = cfp
        self.generator = generator
        self.fp_results = fp_results

    def save(self, window: Window, step_offset: int) -> None:
        """Write the state after ``window``: its finalised blocks, then the moving state that replaces the
        previous window's."""
        for index in window.finalized:
            self.checkpointer.save_block(index, self.state.blocks[index])
        state = self.state.state_dict()
        caches = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
        history = {name: value for name, value in state.items() if not isinstance(value, torch.Tensor)}
        meta = {
            **self.records.state_dict(),
            "step_offset": step_offset,
            **history,
            **self.cfp.state_dict(),
            "fp_results": self.fp_results,
        }
        overlap = {index: self.state.blocks[index] for index in window.blocks if index not in window.finalized}
        self.checkpointer.save_state(window.index, caches, overlap, self.generator, meta)


    def restore(self, point: ResumePoint, schedule: list[Window], structure: Callable[..., Any]) -> int:
        """Give the state, CFP, the records and the random generator back what an interrupted run had after
        window ``point.last_window`` (what :meth:`save` wrote); returns the TensorBoard step to continue from.

        Every block that had entered a window is rebuilt from its saved state with ``structure`` (the block
        quantizer's layout without calibration): finalised blocks from their own files, overlap blocks (still
        calibrating) from the moving state, each after getting its teacher back; those of a last window that the
        divergence guard put back at round-to-nearest are rebuilt in that form.
        """
        finished = [w for w in schedule if w.index <= point.last_window]
        finalized = {b for w in finished for b in w.finalized}
        records = point.meta.get("windows") or [{}]
        fell_back = set(finished[-1].blocks) if finished and records[-1].get("fallback") == "rtn" else set()
        directory = self.checkpointer.directory
        for index in sorted({b for w in finished for b in w.blocks}):
            saved = point.block_state(directory, index) if index in finalized else point.overlap_state(index)
            self.state.reenter(index, structure, saved, finalized=index in finalized, reset=index in fell_back)
        self.state.load_state_dict({**point.meta, **point.tensors})
        self.cfp.load_state_dict(point.meta)
        self.records.load_state_dict(point.meta)
        restore_rng(point, self.generator)
        return int(point.meta["step_offset"])

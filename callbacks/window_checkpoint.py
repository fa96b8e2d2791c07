"""``WindowCheckpoint``: after each finished window, saves what a resumed run needs to go on from the next one.

A window is the unit of work a run never loses: once its fit ends (and :class:`CrossBlockCallback` has
finalised its leaving blocks and recorded it), this callback writes the finalised blocks, both input caches,
the overlap blocks' calibrating state, the random state and the records so far
(:class:`cbq_lightning.checkpoint.WindowCheckpointer` writes them atomically); a resumed run reads them back
through :meth:`WindowCheckpoint.restore`, so one object owns both directions. A window the divergence guard
finalises at round-to-nearest has no successful fit, so the runner calls :meth:`WindowCheckpoint.save` for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from callbacks.cross_block import CrossBlockCallback
from cbq_lightning.cfp import CoarseToFinePreprocessor
from cbq_lightning.checkpoint import ResumePoint, WindowCheckpointer, restore_rng
from cbq_lightning.crossblock import CrossBlockState
from cbq_lightning.windows import Window


class WindowCheckpoint(L.Callback):
    """Saves the run's state after each window; give it after ``records`` in the Trainer's callbacks.

    Args:
        checkpointer: where and how the files are written (one checkpoint per rank under DDP).
        state: the cross-block state (blocks, caches and history).
        records: the callback that owns the window records; its ``on_fit_end`` must already have run.
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

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the TensorBoard step the next window starts from: this window's offset plus the steps it took
        self.save(pl_module.window, pl_module.step_offset + trainer.global_step)

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
        calibrating) from the moving state, each after getting its teacher back.
        """
        finished = [w for w in schedule if w.index <= point.last_window]
        finalized = {b for w in finished for b in w.finalized}
        directory = self.checkpointer.directory
        for index in sorted({b for w in finished for b in w.blocks}):
            saved = point.block_state(directory, index) if index in finalized else point.overlap_state(index)
            self.state.reenter(index, structure, saved, finalized=index in finalized)
        self.state.load_state_dict({**point.meta, **point.tensors})
        self.cfp.load_state_dict(point.meta)
        self.records.load_state_dict(point.meta)
        restore_rng(point, self.generator)
        return int(point.meta["step_offset"])

"""A polite stop: SIGTERM ends a run at the next safe point, with its finished windows saved.

Why: schedulers (SLURM, Kubernetes, a user's ``kill``) send SIGTERM and wait a little before SIGKILL. Dying
there would be safe already (every finished window's checkpoint is written atomically), but the user would
see a traceback or nothing. Instead, :class:`GracefulStop` notes the signal; inside a window's fit Lightning's
own SIGTERM handling (which runs beside ours) ends the fit at the next optimiser step, and between windows the
window loop checks :attr:`GracefulStop.requested` before starting the next one. Either way the run raises
:class:`~cbq_lightning.errors.RunStopped`, which the CLI prints as one line (exit 143, the shell's code for
SIGTERM), and rerunning the same command resumes after the last finished window.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger(__name__)


class GracefulStop:
    """While active (a ``with`` block in the main thread), SIGTERM sets :attr:`requested` instead of killing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("SIGTERM received: stopping at the next safe point (finished windows are saved)")
        self.requested = True

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]
            self._installed = False

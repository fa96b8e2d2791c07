"""A polite stop: SIGTERM ends a run at the next safe point, with its finished windows saved.

Why: schedulers (SLURM, Kubernetes, a user's ``kill``) send SIGTERM and wait a little before SIGKILL. Dying
there would be safe already (every finished window's checkpoint is written atomically), but the user would
see a traceback or nothing. Instead, :class:`GracefulStop` takes the signal. While the windows are trained
(:meth:`GracefulStop.deferred`) it only notes it: inside a window's fit Lightning's own SIGTERM handling (which
runs beside ours) ends the fit at the next optimiser step, and between windows the window loop checks
:attr:`GracefulStop.requested` before starting the next one. Everywhere else (loading, the full-precision
reference, evaluation: minutes with no step boundary to wait for) it stops at once, since every file the run
writes is written atomically and nothing there is resumable work. Either way the run raises
:class:`~cbq_lightning.errors.RunStopped`, which the CLI prints as one line (exit 143, the shell's code for
SIGTERM), and rerunning the same command resumes after the last finished window.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

from cbq_lightning.errors import RunStopped

log = logging.getLogger(__name__)


#: the one line a run stopped outside the windows' training ends with
STOPPED_OUTSIDE_TRAINING = ("SIGTERM: stopped outside the windows' training; every finished window is saved. Rerun "
                            "the same command to resume.")


class GracefulStop:
    """While active (a ``with`` block in the main thread), SIGTERM raises :class:`RunStopped` at once, or, inside
    :meth:`deferred`, sets :attr:`requested` for the window loop to act on at its next safe point."""

    def __init__(self) -> None:
        self.requested = False
        self._deferring = False
        self._previous: object = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if not self._deferring:
            self.requested = True
            raise RunStopped(STOPPED_OUTSIDE_TRAINING)
        if not self.requested:
            log.warning("SIGTERM received: stopping at the next safe point (finished windows are saved)")
        self.requested = True

    @contextmanager
    def deferred(self) -> Iterator[GracefulStop]:
        """The windows' (and the end-to-end phase's) fits: a SIGTERM is noted, and acted on by the loop at a step
        or window boundary; one noted but not acted on by the end of the block stops the run there."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False
        if self.requested:
            raise RunStopped(STOPPED_OUTSIDE_TRAINING)

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

"""One run per output folder: a lock that a second run reports, and that a killed run's rerun takes over.

Why: two runs started on the same ``output_dir`` would both write checkpoints and outputs there, and the folder
would end up holding whichever wrote last, with neither run noticing. :class:`OutputLock` takes an exclusive
OS file lock (``flock``) on ``OUTPUT_DIR/.cbq.lock`` before the run reads anything; a second run finds it held
and stops with one line naming the holder, having changed nothing.

The lock is the kernel's, not the file's existence: the kernel drops it when its process ends, however it ends
(SIGKILL, the OOM killer, a crashed node's NFS lease running out). A killed run leaves the file behind, but
nothing holds it, so the rerun that resumes the run simply locks it again. Judging a leftover file by its
recorded pid instead would misjudge a pid the system has since given to another process, could not see a
process on another host, and two reruns could both decide to take a stale file over; the kernel lock has none
of these races. The file still records the holder (pid, host, start time, command), for the message a second
run prints. A finished run, a failed one and one stopped by SIGTERM remove the file as they leave.

Only rank 0 of a DDP run locks: the other ranks are the same run, launched by it into the same folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cbq_lightning.errors import OutputError, OutputInUse

if TYPE_CHECKING:
    from cbq_lightning.config import QuantizeConfig

try:
    import fcntl
except ImportError:  # Windows: no flock; the run goes on unlocked (see OutputLock.acquire)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: the lock's file name inside the output folder (removed when the run ends, left behind by a killed run)
LOCK_FILE = ".cbq.lock"
#: flock failures that mean "this filesystem has no locks", not "someone holds it"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def prepare_output_dir(output_dir: Path) -> bool:
    """Make ``output_dir`` (and its parents); True when this call created it.

    Raises:
        OutputError: the path is an existing file, or the folder cannot be made (read-only, forbidden, a parent
            that is a file); one line naming the path and the fix.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output_dir={output_dir} is an existing file, not a folder: choose another --output_dir "
                          "(or move the file away); nothing was written.")
    if output_dir.is_dir():
        return False
    try:
        output_dir.mkdir(parents=True)
    except FileExistsError:  # made meanwhile by someone else (a folder), or a parent that is a file
        if output_dir.is_dir():
            return False
        raise OutputError(f"output_dir={output_dir} cannot be made: a part of its path is a file; choose another "
                          "--output_dir.") from None
    except OSError as error:
        raise OutputError(f"output_dir={output_dir} cannot be made ({error.strerror or error}): make its parent "
                          "folder writable or choose another --output_dir.") from None
    return True


def _holder_record() -> dict[str, Any]:
    """Who holds the lock, as the second run's message shows it."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": " ".join(sys.argv)}


def _read_holder(descriptor: int) -> dict[str, Any] | None:
    """The record in an open lock file; None when it is empty or half-written (its holder is just starting)."""
    try:
        data = os.pread(descriptor, 65536, 0)
        record = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _in_use(output_dir: Path, holder: dict[str, Any] | None) -> OutputInUse:
    if holder is None:
        who = "another cbq run"
    else:
        who = (f"another cbq run (pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
               f"{holder.get('command')})")
    return OutputInUse(f"output_dir={output_dir} is in use by {who}: wait for it to finish, stop it, or choose "
                       f"another --output_dir; nothing in {output_dir} was changed.")


class OutputLock:
    """``with OutputLock(dir):`` holds ``dir``'s lock for the block (see the module docstring).

    ``enabled=False`` (another DDP rank of the same run) makes it a no-op.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.enabled = enabled
        self._descriptor: int | None = None
        self._created_dir = False

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def acquire(self) -> None:
        """Make the folder and take its lock, or raise :class:`OutputInUse` having changed nothing.

        Raises:
            OutputError: the folder cannot be made (``output_dir`` is a file ...).
            OutputInUse: another live run holds the lock.
        """
        if not self.enabled:
            return
        self._created_dir = prepare_output_dir(self.output_dir)
        if fcntl is None:
            log.warning("no file locks on this platform: a second run on %s would not be noticed", self.output_dir)
            return
        try:
            self._descriptor = self._take()
        except BaseException:
            self._remove_created_dir()
            raise

    def _take(self) -> int | None:
        """The locked lock file's descriptor, its holder record written (None: the filesystem has no locks)."""
        for _ in range(10):  # retried only when a finishing holder removes the file between our open and lock
            descriptor = self._open()
            if not self._lock(descriptor):
                return None  # warned: the run goes on unlocked
            if self._still_the_file(descriptor):
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, json.dumps(_holder_record()).encode("utf-8"), 0)
                return descriptor
            os.close(descriptor)
        raise OutputError(f"cannot lock {self.path}: it keeps being replaced; is another run starting and ending "
                          "there in a loop? Choose another --output_dir.")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"cannot write {self.path} ({error.strerror or error}): make {self.output_dir} "
                              "writable or choose another --output_dir.") from None

    def _lock(self, descriptor: int) -> bool:
        """Lock the open file: True when locked, False when the filesystem has no locks; raises when held."""
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise _in_use(self.output_dir, holder) from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in _NO_LOCKS:
                raise
            log.warning("%s cannot be locked (%s): a second run on this folder would not be noticed",
                        self.path, error.strerror)
            return False
        return True

    def _still_the_file(self, descriptor: int) -> bool:
        """Whether the path still names the file we locked (a holder removes it when it finishes)."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(descriptor)
        return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)

    def release(self) -> None:
        """Remove the lock file, then let the lock go (in this order: a run that opens the file in between finds
        it removed and opens a new one); an empty folder this lock created goes too."""
        if self._descriptor is not None:
            try:
                if self._still_the_file(self._descriptor):
                    self.path.unlink()
            except OSError as error:  # the run's outcome matters more than a leftover lock file
                log.warning("could not remove %s: %s", self.path, error)
            os.close(self._descriptor)
            self._descriptor = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        """A folder made for a run that wrote nothing into it (it failed early) is not left behind."""
        if self._created_dir:
            try:
                self.output_dir.rmdir()  # only succeeds on an empty folder
            except OSError:
                pass
            self._created_dir = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def quantize_lock(config: QuantizeConfig) -> OutputLock:
    """The lock of a ``cbq quantize`` run on ``config.output_dir``: held by rank 0; the other DDP ranks, launched
    by rank 0 into the same folder, run under its lock."""
    return OutputLock(config.output_dir, enabled=config.placement().is_main)

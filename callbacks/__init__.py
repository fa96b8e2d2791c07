"""Lightning callbacks of cbq-lightning (top-level package, as the design card asks)."""

from callbacks.cross_block import CrossBlockCallback
from callbacks.progress import WindowProgressBar
from callbacks.window_checkpoint import WindowCheckpoint

__all__ = ["CrossBlockCallback", "WindowCheckpoint", "WindowProgressBar"]

"""Lightning callbacks of cbq-lightning (top-level package, as the design card asks)."""

from callbacks.cross_block import CrossBlockCallback
from callbacks.progress import WindowProgressBar

__all__ = ["CrossBlockCallback", "WindowProgressBar"]

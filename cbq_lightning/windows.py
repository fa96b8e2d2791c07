"""The sliding-window schedule: which blocks each window trains and which it finalises."""

from __future__ import annotations

from dataclasses import dataclass

from cbq_lightning.errors import ConfigError


@dataclass
class WindowConfig:
    """Sliding window of ``size`` consecutive blocks, consecutive windows sharing ``overlap`` blocks.

    ``size=1, overlap=0`` is plain block-wise reconstruction; ``size >= num_blocks`` trains all at once.
    """

    size: int = 2
    overlap: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"window.size={self.size} must be >= 1 (number of blocks trained together).")
        if not 0 <= self.overlap < self.size:
            raise ConfigError(
                f"window.overlap={self.overlap} must satisfy 0 <= overlap < size={self.size} "
                "(otherwise the window never advances)."
            )


@dataclass(frozen=True)
class Window:
    """One window: ``blocks`` are trained together, ``finalized`` are hardened after its fit."""

    index: int
    blocks: tuple[int, ...]
    finalized: tuple[int, ...]
    #: the window that reaches the model's last block (finalises everything it holds)
    is_last: bool = False

    def __str__(self) -> str:
        return f"window {self.index} (blocks {self.blocks[0]}-{self.blocks[-1]})"


def window_schedule(num_blocks: int, config: WindowConfig) -> list[Window]:
    """Windows ``[0, K), [K-O, 2K-O), ...`` until the last block; each block is finalised exactly once.

    A window finalises its first ``K - O`` blocks (the overlap is warm-started in the next window); the
    last window, which may be shorter than K, finalises all of its blocks.
    """
    if num_blocks < 1:
        raise ConfigError("the model has no transformer blocks to quantize.")
    size = min(config.size, num_blocks)
    stride = size - min(config.overlap, size - 1)
    windows: list[Window] = []
    start = 0
    while True:
        end = min(start + size, num_blocks)
        blocks = tuple(range(start, end))
        last = end == num_blocks
        finalized = blocks if last else blocks[:stride]
        windows.append(Window(index=len(windows), blocks=blocks, finalized=finalized, is_last=last))
        if last:
            return windows
        start += stride

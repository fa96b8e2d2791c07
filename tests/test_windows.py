"""Sliding-window schedule (docs/method.md §3)."""

from __future__ import annotations

import pytest

from cbq_lightning.errors import ConfigError
from cbq_lightning.windows import Window, WindowConfig, window_schedule


def schedule(num_blocks: int, size: int, overlap: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(w.blocks, w.finalized) for w in window_schedule(num_blocks, WindowConfig(size, overlap))]


@pytest.mark.parametrize(
    ("num_blocks", "size", "overlap", "expected"),
    [
        # default K=2, O=1: windows (0,1), (1,2), (2,3); each finalises its first block, the last both
        (4, 2, 1, [((0, 1), (0,)), ((1, 2), (1,)), ((2, 3), (2, 3))]),
        # K=3, O=1: stride 2
        (5, 3, 1, [((0, 1, 2), (0, 1)), ((2, 3, 4), (2, 3, 4))]),
        # last window shorter than K
        (4, 3, 1, [((0, 1, 2), (0, 1)), ((2, 3), (2, 3))]),
        (5, 4, 1, [((0, 1, 2, 3), (0, 1, 2)), ((3, 4), (3, 4))]),
        (4, 3, 2, [((0, 1, 2), (0,)), ((1, 2, 3), (1, 2, 3))]),
        # block-wise reconstruction
        (3, 1, 0, [((0,), (0,)), ((1,), (1,)), ((2,), (2,))]),
        # no overlap, K=2
        (5, 2, 0, [((0, 1), (0, 1)), ((2, 3), (2, 3)), ((4,), (4,))]),
        # K = L: one window finalising everything
        (4, 4, 1, [((0, 1, 2, 3), (0, 1, 2, 3))]),
        # K > L clamps to L
        (4, 6, 2, [((0, 1, 2, 3), (0, 1, 2, 3))]),
        (4, 6, 5, [((0, 1, 2, 3), (0, 1, 2, 3))]),
        (1, 2, 1, [((0,), (0,))]),
    ],
)
def test_window_schedule(num_blocks, size, overlap, expected):
    assert schedule(num_blocks, size, overlap) == expected


def test_window_fields():
    windows = window_schedule(4, WindowConfig(2, 1))
    assert [w.index for w in windows] == [0, 1, 2]
    assert [w.is_last for w in windows] == [False, False, True]
    assert windows[1] == Window(index=1, blocks=(1, 2), finalized=(1,))
    assert str(windows[2]) == "window 2 (blocks 2-3)"


def test_is_last_without_overlap():
    # L=4, K=2, O=0: windows (0,1), (2,3); L=3, K=1, O=0: (0), (1), (2)
    assert [w.is_last for w in window_schedule(4, WindowConfig(2, 0))] == [False, True]
    assert [w.is_last for w in window_schedule(3, WindowConfig(1, 0))] == [False, False, True]


def test_the_default_windows_slide_over_every_block_twice():
    """CBQ's windows (docs/method.md §3) without any setting: each block but the first and the last is
    trained in two consecutive windows, and the second visit starts from what the first learned (the block opens
    the next window unfinalised)."""
    windows = window_schedule(6, WindowConfig())
    visits = [sum(b in w.blocks for w in windows) for b in range(6)]
    assert visits == [1, 2, 2, 2, 2, 1]
    for first, second in zip(windows, windows[1:], strict=False):
        carried = [b for b in first.blocks if b not in first.finalized]
        assert carried and second.blocks[: len(carried)] == tuple(carried)


@pytest.mark.parametrize("num_blocks", range(1, 9))
@pytest.mark.parametrize("size", range(1, 6))
def test_every_block_finalised_once_in_order(num_blocks, size):
    for overlap in range(size):
        windows = window_schedule(num_blocks, WindowConfig(size, overlap))
        finalized = [b for w in windows for b in w.finalized]
        assert finalized == list(range(num_blocks))
        assert windows[0].blocks[0] == 0
        assert windows[-1].blocks[-1] == num_blocks - 1
        assert [w.index for w in windows] == list(range(len(windows)))
        assert windows[-1].is_last
        assert [w.is_last for w in windows] == [False] * (len(windows) - 1) + [True]
        for w in windows:
            # contiguous, at most K blocks, finalising a non-empty prefix
            assert w.blocks == tuple(range(w.blocks[0], w.blocks[-1] + 1))
            assert 1 <= len(w.blocks) <= min(size, num_blocks)
            assert len(w.finalized) >= 1
            assert w.finalized == w.blocks[: len(w.finalized)]
        assert windows[-1].finalized == windows[-1].blocks
        for prev, nxt in zip(windows, windows[1:], strict=False):
            # non-last windows are full and finalise K - O blocks (O clamped below L)
            assert len(prev.blocks) == min(size, num_blocks)
            assert len(prev.finalized) == min(size, num_blocks) - min(overlap, min(size, num_blocks) - 1)
            # the unfinalised overlap is warm-started: it opens the next window
            kept = prev.blocks[len(prev.finalized) :]
            assert nxt.blocks[: len(kept)] == kept
            assert nxt.blocks[0] == prev.finalized[-1] + 1


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (-1, 0), (2, 2), (2, 3), (3, -1), (1, 1)])
def test_invalid_window_config_raises(size, overlap):
    with pytest.raises(ConfigError, match=r"window\.(size|overlap)"):
        WindowConfig(size=size, overlap=overlap)


def test_no_blocks_raises():
    with pytest.raises(ConfigError, match="no transformer blocks"):
        window_schedule(0, WindowConfig())

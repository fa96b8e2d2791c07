"""Where a result came from: the code's commit, the package versions, the device, the peak memory.

Why a module of its own: the run's report, the benchmarks' records and the GGUF benchmark all stamp their results
with the same provenance, and a result copied away from its run must still say which code and machine made it.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def peak_rss_gib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**3 if sys.platform == "darwin" else 1024**2)


def versions() -> dict[str, str]:
    import lightning
    import transformers

    from cbq_lightning import __version__

    return {
        "cbq_lightning": __version__,
        "git": source_commit(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def source_commit(paths: Sequence[str] = ("cbq_lightning", "configs")) -> str | None:
    """The git commit of the code that ran (``-dirty`` when ``paths``, by default the package and the recipes,
    had changes not committed), or None for an installed copy outside a checkout. Why: the package version does not change
    between commits, and a result copied away from its run (a benchmark record, an imported run) should still
    say which code made it."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *paths],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


"""Atomic safetensors writes are deterministic: the same tensors and metadata give the same bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cbq_lightning.io import atomic_write_safetensors, safetensors_bytes
from tests.conftest import REPO

#: writes a file with several metadata keys; safetensors itself orders them by a per-process hash
_WRITER = """
import sys, torch
from cbq_lightning.io import atomic_write_safetensors
tensors = {"b.codes": torch.arange(12, dtype=torch.uint8).reshape(3, 4), "a.scale": torch.linspace(0, 1, 5)}
metadata = {"format": "f", "version": "1", "scheme": "{}", "extra": "x", "another": "y"}
atomic_write_safetensors(__import__("pathlib").Path(sys.argv[1]), tensors, metadata)
"""


def test_the_same_state_is_the_same_file_in_every_process(tmp_path: Path) -> None:
    paths = [tmp_path / f"run{i}.safetensors" for i in range(4)]
    for path in paths:  # separate processes: each draws its own hash keys
        subprocess.run([sys.executable, "-c", _WRITER, str(path)], check=True, cwd=REPO)
    first = paths[0].read_bytes()
    assert all(path.read_bytes() == first for path in paths[1:])


def test_the_file_reads_back_with_stock_safetensors(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(3, 5), "codes": torch.randint(0, 8, (4, 4), dtype=torch.uint8)}
    metadata = {"version": "1", "format": "cbq-quant-state"}
    path = tmp_path / "state.safetensors"
    atomic_write_safetensors(path, tensors, metadata)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == metadata
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_length % 8 == 0  # tensor data stays 8-byte aligned
    assert b'"__metadata__":{"format":"cbq-quant-state","version":"1"}' in safetensors_bytes(tensors, metadata)

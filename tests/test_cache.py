"""Cache storage: memory-mapped disk caches give the very same result as RAM caches; bf16 targets work."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from cbq_lightning.cache import CacheConfig, TensorStore
from cbq_lightning.errors import ConfigError
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, fast_flags, load_recipe

FAST = fast_flags()


def test_disk_store_maps_files_and_releases_them(tmp_path: Path) -> None:
    store = TensorStore(tmp_path / "cache")
    tensor = store.allocate("x_q", (3, 4, 5), torch.bfloat16)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].stat().st_size == 3 * 4 * 5 * 2
    tensor[1] = 2.5
    assert float(tensor[1, 0, 0]) == 2.5 and tensor.shape == (3, 4, 5)
    store.release(tensor)
    assert not files[0].exists()
    store.allocate("y", (2,), torch.float32)
    store.cleanup()
    assert not (tmp_path / "cache").exists()


def test_ram_store() -> None:
    store = TensorStore()
    assert not store.on_disk and store.allocate("x", (2, 3), torch.float32).shape == (2, 3)


class Inspect(L.Callback):
    """Records the cache state a window trains on."""

    def __init__(self) -> None:
        self.target_dtypes: list[torch.dtype] = []
        self.files: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        state = trainer.train_dataloader.dataset.state
        self.target_dtypes.append(state.y_fp.dtype)
        directory = state.store.directory
        self.files.append(len(list(directory.iterdir())) if directory is not None else 0)


def test_disk_caches_reproduce_ram_caches_bit_for_bit(tmp_path: Path) -> None:
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "ram"), *FAST))
    inspect = Inspect()
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "disk"), *FAST, "--advanced.cache.location", "disk"),
                 [inspect])
    assert all(count >= 2 for count in inspect.files), inspect.files  # at least Y_fp and Y_h are files
    assert not (tmp_path / "disk" / "cache").exists(), "disk caches are removed after calibration"
    ram = load_file(str(tmp_path / "ram" / "quant_state.safetensors"))
    disk = load_file(str(tmp_path / "disk" / "quant_state.safetensors"))
    assert ram.keys() == disk.keys() and all(torch.equal(ram[k], disk[k]) for k in ram)


def test_bfloat16_targets(tmp_path: Path) -> None:
    inspect = Inspect()
    report = run_quantize(
        load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), *FAST, "--advanced.cache.target_dtype", "bfloat16"), [inspect]
    ).report
    assert inspect.target_dtypes == [torch.bfloat16] * 3
    assert all(w["loss_last"] is not None for w in report["windows"])


def test_cache_config_validation() -> None:
    with pytest.raises(ConfigError, match="advanced.cache.location"):
        CacheConfig(location="gpu")
    with pytest.raises(ConfigError, match="advanced.cache.target_dtype"):
        CacheConfig(target_dtype="float16")

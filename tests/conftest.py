"""Shared fixtures: a tiny model and one CBQ run of the tiny recipe, made once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from cbq_lightning.cli import main, parse_quantize_config
from cbq_lightning.config import QuantizeConfig
from cbq_lightning.data.text import DATA_DIR_ENV
from cbq_lightning.evaluation.fp_cache import CACHE_DIR_ENV
from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_llama, byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "configs" / "tiny.yaml"
#: the offline WikiText-2 mirror beside the checkout (CI's layout); runs that give no data_dir read it through
#: CBQ_DATA_DIR, the variable a user sets for their own mirror (the package itself has no default folder)
SHARED_DATA = REPO.parent / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault(DATA_DIR_ENV, str(SHARED_DATA))
#: the full-precision reference cache (cbq_lightning.evaluation.fp_cache) of this test session only: runs in the
#: session share it (as a user's runs do), and nothing is read from or left in the user's ~/.cache
os.environ[CACHE_DIR_ENV] = tempfile.mkdtemp(prefix="cbq-test-cache-")


def fast_flags(epochs: int = 2) -> tuple[str, ...]:
    """Overrides that make a tiny-recipe run quick for engine tests: ``epochs`` per window, no progress bar,
    no evaluation (the tests that need one add it back)."""
    return ("--train.epochs", str(epochs), "--advanced.trainer.enable_progress_bar", "false", "--eval.datasets", "[]")


def load_recipe(path: Path, *overrides: str) -> QuantizeConfig:
    """A recipe parsed and instantiated exactly as ``cbq quantize --config PATH ...`` does."""
    return parse_quantize_config(["--config", str(path), *overrides])


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    return build_tiny_llama(TinyModelConfig(), vocab_size=len(byte_tokenizer()), seed=0)


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output directory of ``cbq quantize --config configs/tiny.yaml`` (CBQ, W3 per-channel)."""
    out = tmp_path_factory.mktemp("cli_run")
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out),
                 "--advanced.trainer.enable_progress_bar", "false"])
    assert code == 0
    return out

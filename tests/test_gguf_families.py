"""GGUF files of each family as llama.cpp writes them (:mod:`tests.gguf_fixtures`).

cbq-lightning loads the ones transformers' GGUF reader reads, as the right model type and with the source model's
logits, and quantizes them with the real CLI; it refuses the rest (a vision tower, a projector file, Mixtral
under ``llama``, architectures transformers cannot read) in one line that names the fix. A Gemma 3 text GGUF,
which llama.cpp labels ``gemma3`` like the multimodal model, is accepted as ``gemma3_text``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cbq_lightning.cli import main
from cbq_lightning.errors import ModelSourceError
from cbq_lightning.models.loading import ModelConfig, _check_gguf_support, load_model, load_tokenizer
from tests import gguf_fixtures
from tests.conftest import TINY_RECIPE
from tests.gguf_fixtures import (
    GGUF_FAMILIES,
    READABLE_FAMILIES,
    UNREADABLE_FAMILIES,
    write_raw_gguf,
    write_tiny_gguf,
)

pytest.importorskip("gguf")

TEXT = "The theory of relativity was published in 1905; its tests continue."


def _load(path: Path) -> tuple[object, torch.nn.Module]:
    config = ModelConfig(name_or_path=str(path), dtype="float32")
    tokenizer = load_tokenizer(config)
    return tokenizer, load_model(config, vocab_size=len(tokenizer))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --- the families transformers reads ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", READABLE_FAMILIES)
def test_tiny_gguf_loads_as_its_model_type_with_the_source_logits(tmp_path: Path, model_type: str) -> None:
    path, source = write_tiny_gguf(model_type, tmp_path / f"{model_type}.gguf")
    assert _check_gguf_support(path) == model_type
    tokenizer, model = _load(path)
    assert model.config.model_type == model_type
    assert type(model) is type(source)
    assert len(tokenizer) == source.config.vocab_size  # every id the tokenizer gives has an embedding row
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == TEXT
    torch.testing.assert_close(_logits(model, ids), _logits(source, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model_type", "convention"), [("llama", "permute_qk"), ("gemma3_text", "norm_offset")])
def test_the_logits_check_sees_a_convention_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_type: str, convention: str
) -> None:
    """Written without llama.cpp's q/k row order or Gemma's ``1 + w`` norms, the file loads to another model: the
    comparison above would catch a fixture (or a reader) that got a convention wrong."""
    family = GGUF_FAMILIES[model_type]
    wrong = dataclasses.replace(family, **{convention: type(getattr(family, convention))()})
    monkeypatch.setitem(gguf_fixtures.GGUF_FAMILIES, model_type, wrong)
    path, source = write_tiny_gguf(model_type, tmp_path / f"{model_type}.gguf")
    _, model = _load(path)
    ids = torch.arange(2, 30).unsqueeze(0)
    assert not torch.allclose(_logits(model, ids), _logits(source, ids), rtol=1e-3, atol=1e-3)


# --- files refused, in one line naming the fix ---------------------------------------------------------------


def _refusal(path: Path) -> str:
    with pytest.raises(ModelSourceError) as info:
        _check_gguf_support(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    return message


def test_gemma3_with_a_vision_tower_is_refused(tmp_path: Path) -> None:
    path, _ = write_tiny_gguf("gemma3_text", tmp_path / "gemma3-mm.gguf", with_vision_tower=True)
    message = _refusal(path)
    assert "vision" in message and "'gemma3'" in message and "--mmproj" in message


def test_a_projector_file_is_refused(tmp_path: Path) -> None:
    path = write_raw_gguf(tmp_path / "mmproj-gemma3.gguf", "clip",
                          {"v.blk.0.attn_q.weight": np.zeros((8, 8), dtype=np.float32)},
                          {"clip.has_vision_encoder": True})
    assert "multimodal projector" in _refusal(path)


def test_a_mixture_of_experts_under_llama_is_refused(tmp_path: Path) -> None:
    path = write_raw_gguf(tmp_path / "mixtral.gguf", "llama",
                          {"blk.0.ffn_gate_exps.weight": np.zeros((4, 16, 8), dtype=np.float32)},
                          {"llama.expert_count": 4})
    message = _refusal(path)
    assert "mixtral" in message and "without its experts" in message


@pytest.mark.parametrize("model_type", UNREADABLE_FAMILIES)
def test_families_transformers_cannot_read_from_gguf_are_refused(tmp_path: Path, model_type: str) -> None:
    path, _ = write_tiny_gguf(model_type, tmp_path / f"{model_type}.gguf")
    message = _refusal(path)
    assert "cannot read from a GGUF" in message and f"model type {model_type}" in message
    # the reason holds: transformers itself refuses the file (when it learns to read it, make the family readable)
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="not supported"):
        AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)


def test_the_cli_refuses_a_multimodal_gemma3_in_one_line(tmp_path: Path) -> None:
    path, _ = write_tiny_gguf("gemma3_text", tmp_path / "gemma3-mm.gguf", with_vision_tower=True)
    result = subprocess.run(
        [sys.executable, "-m", "cbq_lightning.cli", "quantize", "--config", str(TINY_RECIPE),
         "--model.name_or_path", str(path), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("cbq: error:")]
    assert len(errors) == 1 and "--mmproj" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# --- the CLI end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", READABLE_FAMILIES)
def test_cli_quantizes_each_familys_tiny_gguf(tmp_path: Path, model_type: str) -> None:
    path, _ = write_tiny_gguf(model_type, tmp_path / f"{model_type}.gguf")
    out = tmp_path / "run"
    code = main(["quantize", "--config", str(TINY_RECIPE), "--model.name_or_path", str(path), "--model.dtype",
                 "float32", "--output_dir", str(out), "--data.num_samples", "4", "--train.epochs", "1",
                 "--eval.max_windows", "2", "--advanced.trainer.enable_progress_bar", "false"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["model_type"] == model_type
    assert report["model"]["num_blocks"] == GGUF_FAMILIES[model_type].shape.num_layers
    # the quantized model is saved as an ordinary checkpoint of the same type (GGUF-loaded models cannot be)
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == model_type

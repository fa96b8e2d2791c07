"""Every recipe in configs/ parses, instantiates and passes the boundary validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbq_lightning.config import validate
from tests.conftest import REPO, load_recipe

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_validates(recipe: Path) -> None:
    config = load_recipe(recipe)
    if not Path(config.data.source).exists():
        # paper recipes point at ../shared/data, present in CI but not on every machine
        config.data.source = "shipped"
    scheme = validate(config)
    assert 2 <= scheme.w_bits <= 8

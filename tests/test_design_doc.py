"""docs/design.md describes the tree as it is: every module of the package and of callbacks/ is named there."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_design_doc_names_every_module() -> None:
    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    named = set(re.findall(r"[\w]+\.py", text))
    modules = {path.name for package in ("cbq_lightning", "callbacks") for path in (REPO / package).rglob("*.py")}
    missing = sorted(modules - named - {"__init__.py"})
    assert not missing, f"docs/design.md does not describe: {missing}"

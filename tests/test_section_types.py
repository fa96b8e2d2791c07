"""The optional sections check the types of their own keys (jsonargparse does not inside an ``X | None``)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Literal

import pytest

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.gptq import GPTQInit
from cbq_lightning.quant.weight_quantizer import ClipSearch
from cbq_lightning.section_types import changed_fields, check_field_types


@dataclass
class Example:
    ratio: float = 0.5
    steps: int = 3
    on: bool = True
    mode: Literal["a", "b"] = "a"
    rank: int | None = None
    widths: list[int] = field(default_factory=lambda: [2, 3])


@pytest.mark.parametrize("values", [{}, {"ratio": 1}, {"rank": 4}, {"widths": []}, {"mode": "b"}])
def test_values_of_the_annotated_types_pass(values: dict) -> None:
    check_field_types(Example(**values), "section")


@pytest.mark.parametrize(("values", "message"), [
    ({"ratio": None}, "section.ratio=None must be a finite number."),
    ({"ratio": float("nan")}, "section.ratio=nan must be a finite number."),
    ({"ratio": True}, "section.ratio=True must be a finite number."),
    ({"steps": 2.5}, "section.steps=2.5 must be a whole number."),
    ({"steps": False}, "section.steps=False must be a whole number."),
    ({"on": 1}, "section.on=1 must be true or false."),
    ({"mode": "c"}, "section.mode='c' must be one of 'a', 'b'."),
    ({"rank": "4"}, "section.rank='4' must be a whole number or null."),
    ({"widths": [2, "x"]}, "section.widths=[2, 'x'] must be a list of a whole number."),
])
def test_a_wrong_type_is_one_line_naming_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_field_types(Example(**values), "section")
    assert str(error.value) == message


def test_the_sections_check_their_types_before_their_ranges() -> None:
    """``--extensions.gptq.damp null`` reached ``0 < None`` (a TypeError, a traceback through the parser)."""
    with pytest.raises(ConfigError, match=r"extensions\.gptq\.damp=None must be a finite number"):
        GPTQInit(damp=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"extensions\.clip_search\.min_ratio=None must be a finite number"):
        ClipSearch(min_ratio=None)  # type: ignore[arg-type]


def test_changed_fields_names_what_differs_from_the_defaults() -> None:
    """Plain defaults, a default factory, and a required key (no default: always counted as set)."""
    @dataclass
    class Section:
        required: int
        plain: float = 1.0
        listed: list[int] = field(default_factory=lambda: [2])

    assert changed_fields(Section(required=3)) == [("required", 3, MISSING)]
    assert changed_fields(Section(required=3, plain=2.0, listed=[2]), ("plain", "listed")) == [("plain", 2.0, 1.0)]
    assert changed_fields(Section(required=3, listed=[4]), ("listed",)) == [("listed", [4], [2])]

"""The quality benchmark's bookkeeping: rows from run results, and the combined markdown table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(ppl: float, wall: float = 600.0) -> dict:
    return {"report": {"eval": [{"dataset": "wikitext2", "ppl": ppl}], "calibration_time_s": wall / 2,
                       "peak_rss_gib": 2.5}, "wall_s": wall}


def test_row_gap_closed_and_cfp_ablation(quality) -> None:
    fp = {"results": [{"ppl": 20.0}]}
    row = quality._row("W4A4", fp, _run(220.0), _run(70.0), _run(120.0))
    assert row["gap_closed"] == pytest.approx((220 - 70) / (220 - 20))
    assert row["cbq_no_cfp"] == 120.0 and row["cbq_over_rtn"] == pytest.approx(70 / 220)
    assert row["cbq_over_fp"] == pytest.approx(3.5)
    assert quality._row("W4A16", fp, _run(30.0), _run(25.0))["cbq_no_cfp"] is None


def test_schemes_with_activations_get_the_ablation(quality) -> None:
    assert quality._quantizes_activations("W4A4") and quality._quantizes_activations("W4A8")
    assert not quality._quantizes_activations("W3A16G64")


def test_combined_table_takes_the_latest_record_of_every_scheme(quality, tmp_path: Path) -> None:
    fp = {"results": [{"ppl": 20.0}]}
    rows = {"W4A16": quality._row("W4A16", fp, _run(37.0), _run(28.0)),
            "W4A4": quality._row("W4A4", fp, _run(900.0), _run(300.0), _run(450.0))}
    for scheme, row in rows.items():
        record = {"row": row, "invocation": f"python benchmarks/quality.py --schemes {scheme}", "git_commit": "abc",
                  "device": "cpu", "date": "2026-11-22", "versions": {"torch": "2", "transformers": "5", "lightning": "2"}}
        (tmp_path / f"quality_{scheme.lower()}.json").write_text(json.dumps(record))
    table = quality._combined_table(tmp_path, "")
    lines = table.splitlines()
    assert lines[0].startswith("| scheme | FP | RTN | CBQ w/o CFP | CBQ |")
    assert lines[2].startswith("| W4A16 | 20.00 | 37.00 | - | 28.00 | 53 % |")
    assert lines[3].startswith("| W4A4 | 20.00 | 900.00 | 450.00 | 300.00 | 68 % | 0.33 | 15.00 |")
    assert "--schemes W4A4" in table

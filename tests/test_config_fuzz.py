"""Random invalid values for every configuration key: a correct run or a one-line error, never a traceback.

Property-based (hypothesis, derandomized so CI is reproducible): a key of the resolved tiny recipe and a
value meant to break it (wrong type, out of range, non-finite, empty, malformed list, unknown choice) go to
the real ``cbq quantize`` entry point on a minimal tiny run. Allowed outcomes: exit 0 with a report, or exit 2
with exactly one ``cbq: error:`` line (the argument parser's refusals too: no usage dump). Anything else,
an uncaught exception above all, fails with the key and value that caused it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbq_lightning.cli import main
from cbq_lightning.recipe_file import leaves
from tests.conftest import TINY_RECIPE, load_recipe

#: the smallest run that still trains, quantizes, saves and evaluates (the fuzzed flag comes after these)
MINIMAL = ["--data.num_samples", "4", "--data.seqlen", "32", "--train.epochs", "1", "--train.batch_size", "2",
           "--eval.max_windows", "1", "--eval.seqlen", "64", "--advanced.monitor.rtn_reference", "false",
           "--advanced.trainer.enable_progress_bar", "false", "--eval.fp_reference", "false"]
#: keys whose valid values reach outside this machine or change what the run is (tested elsewhere)
NOT_FUZZED = {
    "output_dir",  # the run's folder is the test's
    "trainer.devices", "advanced.trainer.num_nodes", "trainer.strategy", "trainer.accelerator",  # test_ddp, test_gpu
    "advanced.model.revision", "advanced.model.trust_remote_code",  # only meaningful for hub ids: no hub here
}


#: the optional extension sections switched on, so that the keys inside them are fuzzed too (a flag such as
#: ``--extensions.gptq.damp X`` switches its section on with that value)
SECTIONS_ON = ["--extensions.gptq", "{}", "--extensions.clip_search", "{}", "--extensions.continuous.clamp", "smooth",
               "--extensions.correction.rank", "2", "--extensions.mixed.budget", "3"]
SECTIONS = ("extensions.gptq.", "extensions.clip_search.", "extensions.continuous.", "extensions.correction.",
            "extensions.mixed.")
KEYS = [(key, value) for key, value in leaves(dataclasses.asdict(load_recipe(TINY_RECIPE)))
        if key not in NOT_FUZZED]
KEYS += [(key, value) for key, value in leaves(dataclasses.asdict(load_recipe(TINY_RECIPE, *SECTIONS_ON)))
         if key.startswith(SECTIONS)]


#: counts whose large *valid* values mean hours of correct work (2**40 epochs or layers is not an error, just
#: endless): fuzzed below 9
LOOP_COUNTS = ("epochs", "retries", "num_samples", "max_windows", "steps", "batch_size", "size", "overlap",
               "num_layers", "samples", "tokens")


def _bad_values(key: str, default: Any) -> st.SearchStrategy[str]:
    """Values of the wrong kind for ``default``'s type, or at the edges of its range."""
    anything = st.sampled_from(["", "abc", "[[", "{", "null", "-1", "0", "1e309", "nan", "-inf", "[1, 2]", "true"])
    if key.rsplit(".", 1)[-1] in ("epochs", "epochs_2bit", "max_windows", "num_samples"):
        anything = st.sampled_from(["", "abc", "[[", "null", "-1", "0", "nan", "[1, 2]", "true"])
    if isinstance(default, bool):
        return st.one_of(anything, st.sampled_from(["maybe", "2"]))
    if isinstance(default, int):
        high = 8 if any(part in key.rsplit(".", 1)[-1] for part in LOOP_COUNTS) else 2**40
        return st.one_of(anything, st.integers(-(2**40), high).map(str), st.sampled_from(["1.5", "-0"]))
    if isinstance(default, float):
        return st.one_of(anything, st.floats(allow_nan=True, allow_infinity=True).map(repr),
                         st.sampled_from(["-1e-30", "1e30", "0.0"]))
    if isinstance(default, list):
        return st.one_of(anything, st.sampled_from(["[nope]", "[1]", "[\"\"]"]))
    return st.one_of(anything, st.text(max_size=12).filter(lambda s: "\0" not in s), st.sampled_from(["../..", "/"]))


@st.composite
def key_and_value(draw: st.DrawFn) -> tuple[str, str]:
    key, default = draw(st.sampled_from(KEYS))
    return key, draw(_bad_values(key, default))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=key_and_value())
def test_a_bad_value_is_a_clean_error_or_a_correct_run(case: tuple[str, str], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    key, value = case
    out = tmp_path / f"run-{abs(hash(case))}"
    argv = ["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), *MINIMAL, f"--{key}", value]
    code = main(argv)  # a refused value is one line and exit 2 too: SystemExit (a usage dump) fails the test
    err = capsys.readouterr().err
    assert code in (0, 2), f"--{key} {value!r}: exit {code}\n{err[-2000:]}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("cbq: error:")]
        assert len(lines) == 1 and "usage:" not in err, f"--{key} {value!r}: {err[-2000:]}"
    else:
        assert (out / "report.json").is_file(), f"--{key} {value!r}: exit 0 without a report"
        report = (out / "report.json").read_text()
        assert "NaN" not in report or key.startswith(("eval.", "advanced.monitor.")), f"--{key} {value!r}: NaN in report"


def test_every_key_is_fuzzed_or_said_why_not() -> None:
    keys = {key for key, _ in leaves(dataclasses.asdict(load_recipe(TINY_RECIPE)))}
    inside = {key for key, _ in leaves(dataclasses.asdict(load_recipe(TINY_RECIPE, *SECTIONS_ON)))
              if key.startswith(SECTIONS)}
    assert NOT_FUZZED <= keys, NOT_FUZZED - keys
    sections = {key for key in keys if f"{key}." in {s for s in SECTIONS}}
    assert sections == {s[:-1] for s in SECTIONS}, "an optional section is not null in the tiny recipe"
    assert {key for key, _ in KEYS} == (keys - NOT_FUZZED) | inside and len(KEYS) > 80

"""Bad input, round two (issue #48): each mistake is one ``cbq: error:`` line, exit 2, before any heavy work.

Everything goes through the real CLI (``cbq_lightning.cli.main``, in-process, so an uncaught exception fails the
test with its traceback): an ``--output_dir`` that is a file, a recipe that is not YAML, a model whose weights
hold NaN, an unknown choice for a flag, every other kind of parse error of every subcommand, and two runs on
one output folder. Each test checks the exit status, that stderr holds exactly one error line naming the flag
or file (and no usage dump), and that what was already in the output folder is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbq_lightning.cli import main
from cbq_lightning.errors import OutputInUse
from cbq_lightning.lock import LOCK_FILE, OutputLock
from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_llama, byte_tokenizer
from tests.conftest import REPO, TINY_RECIPE

#: a tiny RTN run in about a second: the runs here only need to start, or to finish quickly
RTN = ["--method", "rtn", "--advanced.trainer.enable_progress_bar", "false", "--eval.max_windows", "1",
       "--advanced.monitor.rtn_reference", "false"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _earlier_outputs(folder: Path) -> dict[str, str]:
    """A folder holding an earlier run's files (stand-ins: only their bytes matter here)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("method: cbq\n")
    (folder / "report.json").write_text('{"earlier": true}\n')
    (folder / "checkpoints" / "block_0000.safetensors").write_bytes(b"\x00" * 64)
    return _digest(folder)


def _one_error_line(code: int, err: str) -> str:
    """The single ``cbq: error:`` line of a refused command (exit 2, no traceback, no usage dump)."""
    assert code == 2, f"exit {code}: {err[-3000:]}"
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("cbq: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """A command the parser refuses: stderr is that one line and nothing else."""
    code = main(argv)
    captured = capsys.readouterr()
    line = _one_error_line(code, captured.err)
    assert captured.err.strip() == line, captured.err
    return line


# --- 1. an output_dir that is a file ------------------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a folder\n")
    line = _one_error_line(main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(afile), *RTN]),
                           capsys.readouterr().err)
    assert str(afile) in line and "is an existing file" in line and "--output_dir" in line
    assert afile.read_bytes() == b"not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_output_dir_under_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    line = _one_error_line(main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), *RTN]),
                           capsys.readouterr().err)
    assert str(out) in line and "--output_dir" in line


# --- 2. and every other parse error: one line naming the file or flag -----------------------------------------


def test_a_recipe_that_is_not_yaml_names_the_file_and_where_it_breaks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("quant: [unclosed\n")
    out = tmp_path / "out"
    before = _earlier_outputs(out)
    line = _parse_error(["quantize", "--config", str(recipe), "--output_dir", str(out)], capsys)
    assert str(recipe) in line and "not valid YAML" in line and "line 1, column 8" in line
    assert _digest(out) == before


def _write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


#: (argv, what the line must name); {dir} is the test's folder, the files are written by the test
PARSE_ERRORS = [
    (["quantize", "--config", "{dir}/missing.yaml"], ["missing.yaml", "no such file"]),
    (["quantize", "--config", "{dir}"], ["is a folder"]),
    (["quantize", "--config", "{dir}/list.yaml"], ["list.yaml", "not a mapping"]),
    (["quantize", "--config", "{dir}/empty.yaml"], ["empty.yaml", "is empty"]),
    (["quantize", "--config", "{dir}/unknown.yaml"], ["unknown.yaml", "quant.bitz", "not an option"]),
    (["quantize", "--config", "{dir}/wrong_type.yaml"], ["wrong_type.yaml", "train.epochs", "'abc'", "an integer"]),
    (["quantize", "--config", "{dir}/section.yaml"], ["section.yaml", "extensions.gptq.dampp", "not an option"]),
    (["quantize", "--config", str(TINY_RECIPE), "--train.epochs", "abc"], ["--train.epochs", "'abc'", "an integer"]),
    (["quantize", "--config", str(TINY_RECIPE), "--method", "xyz"], ["--method", "'xyz'", "one of cbq, rtn"]),
    (["quantize", "--config", str(TINY_RECIPE), "--resume", "maybe"], ["--resume", "true or false"]),
    (["quantize", "--config", str(TINY_RECIPE), "--extensions.gptq.damp", "abc"], ["--extensions.gptq.damp", "a number"]),
    (["quantize", "--config", str(TINY_RECIPE), "--extensions.gptq", "{damp: abc}"], ["extensions.gptq.damp", "--extensions.gptq"]),
    (["quantize", "--config", str(TINY_RECIPE), "--extensions.clip_search", "abc"], ["--extensions.clip_search", "or null"]),
    (["quantize", "--config", str(TINY_RECIPE), "--extensions.mixed.budget", "null"], ["extensions.mixed.budget", "mixed: null"]),
    (["quantize", "--config", str(TINY_RECIPE), "--quant.bitz", "3"], ["unknown option --quant.bitz"]),
    (["quantize", "--config", str(TINY_RECIPE), "--quant.gptq.damp", "0.02"],
     ["--quant.gptq.damp", "is now --extensions.gptq.damp", "research extensions"]),
    (["quantize", "--config", str(TINY_RECIPE), "--guard.retries", "3"],
     ["--guard.retries", "is now --advanced.guard.retries", "rarely sets"]),
    (["quantize", "--config", str(TINY_RECIPE), "--trainer.deterministic", "true"],
     ["--trainer.deterministic", "is now --advanced.trainer.deterministic"]),
    (["quantize", "--config", "{dir}/moved.yaml"], ["moved.yaml", "monitor.rtn_reference", "advanced.monitor.rtn_reference"]),
    (["quantize", "--config", "{dir}/moved_empty.yaml"], ["moved_empty.yaml", "quant.gptq", "is now extensions.gptq"]),
    (["quantize", "--config", str(TINY_RECIPE), "stray"], ["'stray'"]),
    (["quantize", "--config"], ["--config needs a value"]),
    (["evaluate", "--model", "m", "--max_windows", "x"], ["--max_windows", "'x'", "an integer or null"]),
    (["evaluate", "--model", "m", "--rotation.kind", "x"], ["--rotation.kind", "one of hadamard, random"]),
    (["evaluate"], ["cbq evaluate needs --model"]),
    (["export", "--format", "gptq"], ["cbq export needs --run"]),
    (["export", "--run", "X", "--config", "{dir}/export.yaml"], ["export.yaml", "format", "'onnx'"]),
    (["frob"], ["unknown command 'frob'", "quantize, evaluate, export"]),
    ([], ["no command given"]),
]


def _moved_leaves() -> list[tuple[str, str, object]]:
    """``(old, new, default)`` of every moved key that is a single setting today or an optional section (a section
    with fields is skipped); ``default`` is ``MISSING`` where ``new`` names no key of today's configuration."""
    import dataclasses

    from cbq_lightning.config import QuantizeConfig
    from cbq_lightning.moved_keys import MOVED_KEYS

    defaults = dataclasses.asdict(QuantizeConfig())
    leaves = []
    for old, new in MOVED_KEYS.items():
        value: object = defaults
        for part in new.split("."):
            value = value.get(part, dataclasses.MISSING) if isinstance(value, dict) else dataclasses.MISSING
        if not isinstance(value, dict):
            leaves.append((old, new, value))
    return leaves


@pytest.mark.parametrize(("old", "new", "default"), _moved_leaves(), ids=lambda value: str(value))
def test_every_moved_key_is_refused_by_its_old_flag_and_taken_by_its_new_one(old: str, new: str, default: object) -> None:
    """A moved key exists only under its new name: the old flag gets the one-line error naming the new flag."""
    import dataclasses
    import json

    from cbq_lightning.cli import parse_quantize_config
    from cbq_lightning.errors import ConfigError

    assert default is not dataclasses.MISSING, f"moved_keys names {new}, which today's configuration does not have"
    value = default if isinstance(default, str) else json.dumps(default)  # a YAML scalar: true, 0.01, null, text
    with pytest.raises(ConfigError, match=f"--{old} is now --{new}"):
        parse_quantize_config(["--config", str(TINY_RECIPE), f"--{old}", value])
    parse_quantize_config(["--config", str(TINY_RECIPE), f"--{new}", value])


@pytest.mark.parametrize(("argv", "names"), PARSE_ERRORS, ids=lambda value: " ".join(value)[-60:] or "nothing")
def test_every_parse_error_is_one_line(argv: list[str], names: list[str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, "list.yaml", "- a\n- b\n")
    _write(tmp_path, "empty.yaml", "")
    _write(tmp_path, "unknown.yaml", "quant:\n  bitz: 3\n")
    _write(tmp_path, "wrong_type.yaml", "train:\n  epochs: abc\n")
    _write(tmp_path, "section.yaml", "extensions:\n  gptq:\n    dampp: 1\n")
    _write(tmp_path, "moved.yaml", f"base: {TINY_RECIPE}\nmonitor:\n  rtn_reference: false\n")
    _write(tmp_path, "moved_empty.yaml", f"base: {TINY_RECIPE}\nquant:\n  gptq: {{}}\n")
    _write(tmp_path, "export.yaml", "format: onnx\n")
    line = _parse_error([word.replace("{dir}", str(tmp_path)) for word in argv], capsys)
    for name in names:
        assert name.replace("{dir}", str(tmp_path)) in line, line


# --- 4. an unknown choice for a flag ------------------------------------------------------------------------


def test_an_unknown_export_format_names_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    line = _parse_error(["export", "--run", "X", "--format", "onnx"], capsys)
    assert "--format 'onnx'" in line and "compressed-tensors, gptq" in line
    assert "Union" not in line and "NoneType" not in line


def test_help_and_print_config_are_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0 and "--format" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["quantize", "--config", str(TINY_RECIPE), "--print_config"])
    printed = capsys.readouterr().out
    assert done.value.code == 0 and "output_dir: runs/tiny-w3a16" in printed


# --- 3. a model whose weights hold NaN ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny LLaMA checkpoint (model + tokenizer) with one NaN in block 0's q_proj weight."""
    folder = tmp_path_factory.mktemp("nan_model")
    tokenizer = byte_tokenizer()
    model = build_tiny_llama(TinyModelConfig(), vocab_size=len(tokenizer), seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3, 5] = float("nan")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_model_with_nan_weights_is_refused_before_any_work(
    nan_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cbq_lightning.runner as runner

    def no_evaluation(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluated a model whose weights hold NaN")

    monkeypatch.setattr(runner, "_evaluate", no_evaluation)
    out = tmp_path / "out"
    before = _earlier_outputs(out)
    code = main(["quantize", "--config", str(TINY_RECIPE), "--model.name_or_path", str(nan_checkpoint),
                 "--output_dir", str(out), "--advanced.trainer.enable_progress_bar", "false"])
    line = _one_error_line(code, capsys.readouterr().err)
    assert "model.layers.0.self_attn.q_proj.weight" in line and "NaN" in line
    assert str(nan_checkpoint / "model.safetensors") in line
    assert "learning rate" not in line and "guard" not in line
    assert _digest(out) == before


def test_evaluating_a_model_with_nan_weights_is_one_line(nan_checkpoint: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--model", str(nan_checkpoint), "--data", "shipped", "--max_windows", "1"])
    line = _one_error_line(code, capsys.readouterr().err)
    assert "model.layers.0.self_attn.q_proj.weight" in line


# --- 5. two runs on one output folder -----------------------------------------------------------------------


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock (as a running ``cbq quantize`` does) until it is killed."""
    script = ("import sys, time; from cbq_lightning.lock import OutputLock\n"
              "with OutputLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_on_a_busy_folder_is_one_line_and_a_dead_holder_does_not_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        before = _digest(out)
        code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), *RTN])
        line = _one_error_line(code, capsys.readouterr().err)
        assert "is in use by another cbq run" in line and f"pid {holder.pid}" in line and str(out) in line
        assert _digest(out) == before, "the refused run changed the folder"
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as a killed run dies: no cleanup, the lock file stays
        holder.wait()
    assert (out / LOCK_FILE).is_file(), "the dead holder's lock file should still be there"
    assert main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), *RTN]) == 0
    assert (out / "report.json").is_file()
    assert not (out / LOCK_FILE).exists(), "a finished run removes its lock"


def test_a_live_lock_refuses_and_its_release_frees_the_folder(tmp_path: Path) -> None:
    first = OutputLock(tmp_path / "out")
    with first:
        assert (tmp_path / "out" / LOCK_FILE).is_file()
        with pytest.raises(OutputInUse, match=f"pid {os.getpid()}"):  # flock: a second open file conflicts
            OutputLock(tmp_path / "out").acquire()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    with OutputLock(tmp_path / "out"):  # free again
        pass


def test_a_failed_run_releases_its_lock_and_leaves_no_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "new"
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), *RTN,
                 "--model.name_or_path", str(tmp_path / "no-such-model")])
    _one_error_line(code, capsys.readouterr().err)
    assert not out.exists(), "a run that failed before writing anything leaves no folder (and no lock) behind"


def test_a_lock_whose_holder_finishes_while_we_open_it_is_taken_again(tmp_path: Path) -> None:
    """The release race: a holder removes the file between our open and our lock; we must lock the new file."""
    lock = OutputLock(tmp_path)
    stale = os.open(lock.path, os.O_RDWR | os.O_CREAT)
    lock.path.unlink()  # the file we opened is gone from the folder: locking it would lock nothing
    assert not lock._still_the_file(stale)  # noqa: SLF001 - the check acquire() relies on
    os.close(stale)
    with lock:
        assert lock.held and lock._still_the_file(lock._descriptor)  # noqa: SLF001


# --- recipes that build on others (``base:``): the broken file in the chain is the one named -------------------


def test_a_broken_base_recipe_is_named_with_the_recipe_that_uses_it(tmp_path: Path) -> None:
    from cbq_lightning.parse_errors import broken_config_file

    (tmp_path / "method.yaml").write_text("seed: [\n")
    recipe = _write(tmp_path, "model.yaml", "base: method.yaml\nseed: 1\n")
    line = broken_config_file([recipe])
    assert line is not None and str(tmp_path / "method.yaml") in line and f"the base of {recipe}" in line
    assert "not valid YAML" in line
    assert broken_config_file([_write(tmp_path, "fine.yaml", "seed: 1\n")]) is None


def test_a_bad_value_in_a_base_recipe_names_that_file(tmp_path: Path) -> None:
    from cbq_lightning.parse_errors import parse_error_line

    base = _write(tmp_path, "method.yaml", "train:\n  epochs: many\n")
    recipe = _write(tmp_path, "model.yaml", "base: method.yaml\nseed: 1\n")
    message = "Parser key \"train.epochs\":\n  Expected a <class 'int'>. Got value: many"
    line = parse_error_line(message, ["quantize", "--config", recipe])
    assert line.startswith(f"train.epochs 'many' in {base} is not valid: expected an integer"), line

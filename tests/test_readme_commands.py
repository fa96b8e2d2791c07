"""Every ``cbq`` command in the code blocks of the README and the user guides in ``docs/``, run as written.

Why: a user copies these lines first; a documentation edit or a code change that breaks one must fail CI, not
a user. Each command is taken from the documents themselves (code fences, ``\\`` continuations joined, ``&&`` chains
split, trailing ``# comments`` dropped) and run in one scratch folder in document order (the README, then ``docs/*.md`` by name) as far as their
folders require, so the outputs of one (``runs/smollm2-demo``) are the inputs of the next (``cbq export
--run runs/smollm2-demo``). Two commands run at a time, one intra-op thread each, where neither reads or writes a
folder the other writes (:func:`schedule`): the commands are each a new process whose start-up is mostly single-threaded
imports, and this test was the longest in CI at one at a time.

Only the model is substituted: recipes that name SmolLM2 or LLaMA, and commands that name a hub model
(``--model.name_or_path org/name``), run on the tiny random model (``cbq evaluate --model smollm2-135m`` becomes
``tiny-llama``; a hub model's run calibrates on 16 x 256 tokens and evaluates 8 windows), because CI does not install the 98 MB GGUF and has no hub; the recipes' LoRA ranks, wider than the
tiny model's 32-wide k/v projections, are narrowed there by the run itself (``adapted_to_model``). Output paths are
the README's, relative to the scratch folder. The offline WikiText-2 mirror (``../shared/data``, or one of the same
layout written from the package's shipped excerpt where it is absent) gets a ``train`` split, a copy of the
validation rows, for the recipes that calibrate on WikiText-2 train from the hub. The commands this machine cannot run are listed in
:data:`NOT_RUN` with the reason; an entry that no longer matches a README command fails the test too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SHARED_DATA

README = REPO / "README.md"
#: the README first (its commands make the runs the guides' commands read), then the guides by name
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]
#: a substring of a README command -> why CI cannot run it (no GPU, no hub, one machine)
NOT_RUN: dict[str, str] = {
    "meta-llama/Llama-2-7b-hf": "downloads LLaMA-2-7B from the hub (gated) and is meant for a GPU",
    "--trainer.devices 4": "needs four GPUs",
    "MASTER_ADDR=": "needs several machines",
    "--task_dir tasks": "needs the task files the README's example writes (tests/test_zero_shot.py runs the "
                        "same bridge on a local task)",
    "--tasks": "lm-eval downloads its task datasets from the hub",
    "c4]": "C4 comes from the hub (only WikiText-2 is mirrored offline)",
}
#: the model the substituted commands run on, and the README model names it stands in for
TINY = "tiny-llama"
README_MODELS = ("smollm2-135m",)
#: the budget of a command that names a hub model, unless it sets its own: its recipe's GPU budget (128 x 2048
#: calibration tokens, the whole test split: 632 windows of the tiny model) takes about 10 minutes of CI on the tiny
#: model for figures nobody reads; the path it runs is the same
HUB_MODEL_BUDGET = {"--data.num_samples": "16", "--data.seqlen": "256", "--eval.max_windows": "8"}
#: seconds per command (the slowest, a SmolLM2 recipe on the tiny model, takes ~40 s on 2 cores)
TIMEOUT_S = 600
#: commands run at once (CI has 2 cores)
PARALLEL = 2
#: flags whose value is a folder or file a command writes, and those whose value one reads
WRITE_FLAGS, READ_FLAGS = ("--output_dir", "--output"), ("--run", "--model")


def readme_commands(text: str) -> list[str]:
    """The ``cbq`` commands of the fenced code blocks of ``text``, in order."""
    commands: list[str] = []
    in_block = False
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = re.sub(r"\s+#\s.*$", "", line.rstrip())  # a trailing comment (two+ spaces or one, then '# ')
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical, pending = pending + line, ""
        for segment in logical.split("&&"):
            words = segment.split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments
                words = words[1:]
            if words and words[0] == "cbq":
                commands.append(" ".join(segment.split()))
    return commands


def _not_run_reason(command: str) -> str | None:
    return next((reason for needle, reason in NOT_RUN.items() if needle in command), None)


def _recipe_value(config: Path, *keys: str) -> object:
    """``keys`` (a section, then its key) as the recipe resolves it with the recipes it names under ``base:``: the
    last file of the chain that sets it wins; None where none does."""
    from cbq_lightning.recipe_file import recipe_chain

    value = None
    for path in recipe_chain(config):
        found: object = yaml.safe_load(path.read_text()) or {}
        for key in keys:
            found = found.get(key) if isinstance(found, dict) else None
        value = found if found is not None else value
    return value


def _uses_embedded_or_hub_model(config: Path) -> bool:
    """Whether the recipe (with its bases) loads a model other than the tiny one."""
    name = _recipe_value(config, "model", "name_or_path")
    return name is not None and name != TINY


def substituted(command: str, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """``command`` as argv for this interpreter and its environment assignments, the model swapped for the
    tiny one."""
    words = shlex.split(command)
    env: dict[str, str] = {}
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0] == "cbq", command
    argv = words[1:]
    if argv[0] == "quantize" and "--model.name_or_path" in argv:
        at = argv.index("--model.name_or_path") + 1
        if "/" in argv[at] and not (workdir / argv[at]).exists():  # a hub id
            argv[at] = TINY
            argv += [flag for key, value in HUB_MODEL_BUDGET.items() if key not in argv for flag in (key, value)]
    elif argv[0] == "quantize" and "--config" in argv:
        if _uses_embedded_or_hub_model(workdir / argv[argv.index("--config") + 1]):
            argv += ["--model.name_or_path", TINY]
    if argv[0] == "evaluate" and "--model" in argv:
        at = argv.index("--model") + 1
        if argv[at] in README_MODELS:
            argv[at] = TINY
    return [sys.executable, "-m", "cbq_lightning.cli", *argv], env


def _scratch(tmp_path: Path) -> Path:
    """A working folder laid out like a checkout: ``configs/`` and ``../shared/data`` beside it."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "configs").symlink_to(REPO / "configs")
    mirror = tmp_path / "shared" / "data" / "wikitext"
    if SHARED_DATA.is_dir():  # the real files, linked
        for source in sorted((SHARED_DATA / "wikitext").glob("*/*.jsonl")):
            (mirror / source.parent.name).mkdir(parents=True, exist_ok=True)
            (mirror / source.parent.name / source.name).symlink_to(source)
    else:  # CI without the mirror: the same layout, filled from the shipped excerpt
        from cbq_lightning.data.text import SHIPPED_SOURCE, load_text

        rows = [{"text": line} for line in load_text(SHIPPED_SOURCE, "validation").splitlines()]
        for folder in ("wikitext-2-raw-v1", "wikitext-2-v1"):
            for split in ("test", "validation"):
                path = mirror / folder / f"{split}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # the generic recipes calibrate on WikiText-2 train, which only the hub has: its validation rows stand in
    train = mirror / "wikitext-2-raw-v1" / "train.jsonl"
    if not train.exists():
        train.symlink_to(next(mirror.glob("*/validation.jsonl")).resolve())
    return workdir


def _flag_values(words: list[str], flags: tuple[str, ...]) -> set[str]:
    return {words[at + 1].rstrip("/") for at, word in enumerate(words[:-1]) if word in flags}


def paths_touched(command: str, workdir: Path) -> tuple[set[str], set[str]]:
    """The folders and files ``command`` writes and reads, relative to ``workdir``. A quantize run without
    ``--output_dir`` writes its recipe's ``output_dir``."""
    words = shlex.split(command)
    writes, reads = _flag_values(words, WRITE_FLAGS), _flag_values(words, READ_FLAGS)
    if "quantize" in words and "--config" in words and not writes:
        output_dir = _recipe_value(workdir / words[words.index("--config") + 1], "output_dir")
        writes |= {str(output_dir).rstrip("/")} if output_dir else set()
    return writes, reads


def schedule(commands: list[str], workdir: Path) -> list[set[int]]:
    """For each command, the earlier commands it must wait for: those that write a path it reads or writes
    (so a run's outputs exist before they are exported, and two runs into one folder keep their order)."""
    touched = [paths_touched(command, workdir) for command in commands]
    return [{earlier for earlier in range(later) if touched[earlier][0] & (touched[later][0] | touched[later][1])}
            for later in range(len(commands))]


def run_scheduled(jobs: list[tuple[str, list[str], dict[str, str]]], after: list[set[int]], workdir: Path
                  ) -> list[str]:
    """Run ``jobs`` (command, argv, environment), up to :data:`PARALLEL` at a time, each once the jobs it comes
    after have finished, earliest first; the failures as messages. A job after a failed one fails too."""
    logs = workdir.parent / "command-logs"  # files, not pipes: a full pipe would stall a chatty command
    logs.mkdir(exist_ok=True)
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    finished: dict[int, bool] = {}
    failures: list[str] = []
    while len(finished) < len(jobs):
        for index, (process, started) in list(running.items()):
            if process.poll() is None and time.monotonic() - started < TIMEOUT_S:
                continue
            if process.poll() is None:
                process.kill()
                process.wait()
            stderr = (logs / f"{index}.err").read_text(errors="replace")
            ok = process.returncode == 0 and "Traceback" not in stderr
            if not ok:
                failures.append(f"{jobs[index][0]}\n  exit {process.returncode}: {stderr.strip()[-1500:]}")
            finished[index] = ok
            del running[index]
        for index, (command, argv, env) in enumerate(jobs):
            if index in finished or index in running or len(running) >= PARALLEL:
                continue
            if not after[index] <= finished.keys():
                continue
            if not all(finished[earlier] for earlier in after[index]):
                failures.append(f"{command}\n  not run: a command it depends on failed")
                finished[index] = False
                continue
            with open(logs / f"{index}.out", "w") as out, open(logs / f"{index}.err", "w") as err:
                running[index] = (subprocess.Popen(argv, cwd=workdir, env=env, stdout=out, stderr=err),
                                  time.monotonic())
        time.sleep(0.2)
    return failures


def documented_commands() -> list[str]:
    """The ``cbq`` commands of every document in :data:`DOCUMENTS`, in order."""
    return [command for document in DOCUMENTS for command in readme_commands(document.read_text())]


def test_the_readme_has_the_commands_this_test_expects() -> None:
    assert any(c.startswith("cbq quantize --config configs/smollm2_demo.yaml")
               for c in readme_commands(README.read_text())), "the README's demo command is missing"
    commands = documented_commands()
    assert any(c.startswith("cbq quantize --config configs/smollm2_demo.yaml") for c in commands)
    assert any(c.startswith("cbq export") for c in commands) and any(c.startswith("cbq evaluate") for c in commands)
    for needle in NOT_RUN:  # a stale entry would hide nothing but mislead the reader
        assert any(needle in c for c in commands), f"NOT_RUN entry {needle!r} matches no documented command"


def test_readme_command_parsing() -> None:
    text = "\n".join([
        "prose cbq quantize --not-a-command", "```bash", "pip install x && cbq quantize --config a.yaml",
        "cbq quantize --config b.yaml --x 1   # a comment", "MASTER_ADDR=h PORT=1 cbq quantize --config c.yaml \\",
        "    --advanced.trainer.num_nodes 2", "python -m pytest", "```", "cbq evaluate --outside-a-block",
    ])
    assert readme_commands(text) == [
        "cbq quantize --config a.yaml", "cbq quantize --config b.yaml --x 1",
        "MASTER_ADDR=h PORT=1 cbq quantize --config c.yaml --advanced.trainer.num_nodes 2",
    ]
    assert substituted("A_B=1 cbq quantize --help", Path("."))[1] == {"A_B": "1"}


@pytest.mark.parametrize("recipe", ["configs/smollm2_w3a16g64.yaml", "configs/smollm2_demo.yaml"])
def test_a_recipe_that_inherits_the_embedded_model_runs_on_the_tiny_one(recipe: str) -> None:
    """The demo recipe names SmolLM2 only through its ``base:``; it is swapped for the tiny model all the same (CI
    has no GGUF), and a recipe already on the tiny model is left alone."""
    argv, _ = substituted(f"cbq quantize --config {recipe}", REPO)
    assert argv[-2:] == ["--model.name_or_path", TINY]
    argv, _ = substituted("cbq quantize --config configs/tiny.yaml", REPO)
    assert "--model.name_or_path" not in argv


def test_schedule_orders_commands_by_the_folders_they_share(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("output_dir: runs/a\n")
    commands = [
        "cbq quantize --config configs/a.yaml",                          # 0 writes runs/a
        "cbq quantize --config configs/a.yaml --output_dir runs/b/",     # 1 writes runs/b
        "cbq export --run runs/a --format gptq --output runs/a-gptq",    # 2 reads runs/a
        "cbq evaluate --model runs/a-gptq --max_windows 4",              # 3 reads runs/a-gptq
        "cbq evaluate --model smollm2-135m",                             # 4 reads nothing written here
        "cbq quantize --config configs/a.yaml --method rtn",             # 5 writes runs/a again
        "cbq quantize --help",                                           # 6
    ]
    assert schedule(commands, tmp_path) == [set(), set(), {0}, {2}, set(), {0}, set()]


def test_a_failed_command_fails_the_ones_after_it(tmp_path: Path) -> None:
    fail, succeed = [sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", "print('ok')"]
    jobs = [("first", fail, dict(os.environ)), ("second", succeed, dict(os.environ)),
            ("third", succeed, dict(os.environ))]
    workdir = tmp_path / "work"
    workdir.mkdir()
    failures = run_scheduled(jobs, [set(), {0}, set()], workdir)
    assert failures == ["first\n  exit 3: ", "second\n  not run: a command it depends on failed"]


def test_every_readme_command_runs_as_written(tmp_path: Path) -> None:
    workdir = _scratch(tmp_path)
    # one intra-op thread per command: two commands at a time with two OpenMP threads each on two cores spin
    # against each other (this test on an idle 2-core AMD EPYC: 319 s so,
    # 139 s one command at a time, 83 s two at a time with one thread each);
    # the offline mirror as a user points at one (README: data_dir or CBQ_DATA_DIR): the scratch folder's
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_COMPILE_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "CBQ_DATA_DIR": str(workdir.parent / "shared" / "data")}
    commands = [command for command in documented_commands() if _not_run_reason(command) is None]
    assert len(commands) >= 8, f"only {len(commands)} documented commands run: did the code blocks change shape?"
    jobs = []
    for command in commands:
        argv, assignments = substituted(command, workdir)
        jobs.append((command, argv, {**env, **assignments}))
    failures = run_scheduled(jobs, schedule(commands, workdir), workdir)
    if failures:
        pytest.fail("documented commands that fail as written:\n" + "\n".join(failures))


def test_readme_python_example_equals_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "From Python" block as written (a saved tiny checkpoint for the model path, a test budget), then
    ``cbq quantize`` with the same recipe, model, text and budget: the same integer state, tensor for tensor."""
    import torch
    from safetensors.torch import load_file

    from cbq_lightning.cli import main
    from cbq_lightning.data.text import DATA_DIR_ENV
    from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_llama, byte_tokenizer

    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8").split("## From Python", 1)[1],
                     re.S).group(1)
    tokenizer = byte_tokenizer()
    model_dir = tmp_path / "your-model"
    build_tiny_llama(TinyModelConfig(), vocab_size=len(tokenizer), seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    budget = {"data.num_samples": 4, "data.seqlen": 64, "train.epochs": 1, "advanced.trainer.enable_progress_bar": False,
              "eval.max_windows": 2, "eval.seqlen": 64}
    for written in ('"path/to/your-model"', 'recipe="configs/w4a16.yaml"', 'output_dir="runs/my-w4a16"'):
        assert written in code, f"the README example no longer says {written}: update this test with it"
    code = code.replace('"path/to/your-model"', repr(str(model_dir)))
    code = code.replace('recipe="configs/w4a16.yaml"', f"recipe={str(REPO / 'configs/w4a16.yaml')!r}")
    code = code.replace('output_dir="runs/my-w4a16"', f'output_dir="runs/my-w4a16", overrides={budget!r}')
    workdir = _scratch(tmp_path)  # the offline WikiText-2 mirror the recipe's evaluation reads, as for the commands
    corpus = next((REPO / "cbq_lightning" / "data" / "corpus").glob("*.txt"))  # the package's shipped excerpt
    (workdir / "calibration.txt").write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "shared" / "data"))
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    report = namespace["result"].report
    assert report["method"] == "cbq" and report["scheme"]["name"] == "W4A16" and report["eval"]
    flags = [f"--{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in budget.items()]
    assert main(["quantize", "--config", str(REPO / "configs/w4a16.yaml"), "--model.name_or_path", str(model_dir),
                 "--data.source", str(workdir / "calibration.txt"), "--output_dir", str(tmp_path / "cli"),
                 *flags]) == 0
    api = load_file(workdir / "runs/my-w4a16/quant_state.safetensors")
    cli = load_file(tmp_path / "cli/quant_state.safetensors")
    assert api.keys() == cli.keys()
    for name in api:
        assert torch.equal(api[name], cli[name]), name

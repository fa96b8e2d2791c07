"""Zero-shot (and few-shot) task accuracy through EleutherAI's lm-evaluation-harness (``cbq evaluate --tasks``).

Why a bridge instead of running ``lm_eval --model hf --model_args pretrained=<run>/model``: the fake-quant
checkpoint alone is the exact quantized model only for weight-only schemes. With activation quantization
the activation quantizers live in ``quant_state.safetensors`` and must be put back on the linears, which
``cbq evaluate`` already does when it loads a run. This module hands lm-eval that very model object (and
its tokenizer) through lm-eval's own Hugging Face wrapper (``HFLM(pretrained=<model instance>)``), so the
accuracies are measured on the same model the perplexity is, with lm-eval's prompts, metrics and
standard errors unchanged.

lm-eval is an optional dependency (``pip install "cbq-lightning[lm-eval]"``): everything here imports it
lazily, and :func:`prepare_tasks` fails with a :class:`~cbq_lightning.errors.ConfigError` naming the
install command when it is missing. Tasks can be lm-eval's built-in ones (which download their data
from the Hugging Face hub) or defined in YAML files under a ``task_dir``, which lm-eval's
``TaskManager`` indexes next to its own (``include_path``); such a task can read local files
(``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``) and then needs no network at all.

Task data is loaded by :func:`prepare_tasks`, before the model is: a missing file or an unreachable hub
stops the command before any model is loaded or any perplexity measured.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cbq_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: how to install the optional dependency, repeated in every error that needs it
LM_EVAL_INSTALL = 'pip install "cbq-lightning[lm-eval]"'
#: the oldest lm-eval release the bridge was tested with (``TaskManager.load`` and ``simple_evaluate``
#: accepting loaded ``Task`` objects); kept equal to the bound in pyproject.toml
MIN_LM_EVAL = "0.4.13"


def parse_tasks(tasks: list[str] | str | None) -> list[str]:
    """Task names from ``--tasks``: a list, a comma-separated string, or both (``[arc_easy,piqa]``)."""
    if tasks is None:
        return []
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


def lm_eval_version() -> str:
    """Version of the installed lm-eval, or a :class:`ConfigError` saying how to install it.

    Imports what the bridge needs (lm-eval's evaluator, task manager and Hugging Face wrapper, the last
    of which imports ``accelerate``), so a partial install is caught here too, before any model is loaded.
    """
    try:
        import lm_eval  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"--tasks runs EleutherAI's lm-evaluation-harness, which is not installed ({error}): "
            f"{LM_EVAL_INSTALL} (or pip install \"lm_eval>={MIN_LM_EVAL}\" accelerate)."
        ) from error
    from importlib.metadata import version

    from packaging.version import Version

    installed = version("lm_eval")
    if Version(installed) < Version(MIN_LM_EVAL):
        raise ConfigError(
            f"--tasks needs lm_eval>={MIN_LM_EVAL}, but {installed} is installed: {LM_EVAL_INSTALL} --upgrade."
        )
    return installed


@dataclass
class PreparedTasks:
    """The requested lm-eval tasks, their data loaded, ready for :func:`run_tasks`."""

    names: list[str]
    objects: list[Any]  # lm-eval Task / Group objects (or names when a load result could not be matched)
    manager: Any  # the lm-eval TaskManager that indexed them (simple_evaluate would build the full index again)
    lm_eval_version: str


def _task_manager(names: list[str], task_dir: str | None, installed: str) -> tuple[Any, bool, str | None]:
    """lm-eval's ``TaskManager`` for ``names``, whether it indexes lm-eval's own tasks (``full``), and the task
    folder it includes.

    Why two tries: indexing lm-eval's own ~15,000 tasks, groups and tags takes seconds, a task_dir alone far less.
    A name that task_dir defines as a task or group resolves to that definition either way (lm-eval lets
    include_path override its defaults); tags are excluded, as a tag of the same name in lm-eval's defaults would
    contribute tasks too.
    """
    from lm_eval.tasks import TaskManager

    include_path = None
    if task_dir is not None:
        directory = Path(task_dir).expanduser()
        if not directory.is_dir():
            raise ConfigError(
                f"task_dir={task_dir!r} is not a directory: give the folder holding your lm-eval task YAMLs."
            )
        include_path = str(directory.resolve())
    started = time.perf_counter()
    manager = None
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_subtasks or name in local.all_groups for name in names):
            manager = local
    full = manager is None
    if full:
        manager = TaskManager(include_path=include_path)
    log.info("lm-eval %s: %d tasks, groups and tags indexed in %.1fs", installed, len(manager.all_tasks),
             time.perf_counter() - started)
    return manager, full, include_path


def _check_known(names: list[str], manager: Any, installed: str, task_dir: str | None) -> None:
    """Refuse unknown task names with the closest known ones and the ways to find or define tasks."""
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f"lm-eval {installed}" + (f" or task_dir={task_dir!r}" if task_dir else "")
    raise ConfigError(
        f"unknown lm-eval task {', '.join(hints)}: no such task, group or tag in {where}. "
        "List the available ones with `lm-eval ls tasks`, or define the task in a YAML file (task:, "
        "dataset_path:, doc_to_text:, ...) in a directory passed as --task_dir."
    )


def prepare_tasks(names: list[str], task_dir: str | None = None) -> PreparedTasks:
    """Check lm-eval is installed and every task exists, then load the tasks' data.

    Unknown names raise a :class:`ConfigError` with close matches and the ways to find or define tasks;
    data that cannot be loaded (a missing local file, no network for a hub dataset) raises a
    :class:`DataError` naming the task.
    """
    installed = lm_eval_version()
    from lm_eval.tasks import TaskManager

    manager, full, include_path = _task_manager(names, task_dir, installed)
    _check_known(names, manager, installed, task_dir)
    objects: list[Any] = []
    requested_by: dict[str, str] = {}  # leaf task -> the requested name that brought it in
    for name in names:
        try:
            try:
                loaded = manager.load([name])
            except KeyError:
                if full:
                    raise
                # an unknown name inside the definition, e.g. a task_dir group listing built-in tasks:
                # retry with lm-eval's own tasks indexed as well
                manager, full = TaskManager(include_path=include_path), True
                loaded = manager.load([name])
        except Exception as error:  # lm-eval and datasets raise many types; all mean "cannot load this task"
            raise DataError(
                f"lm-eval task {name!r} could not be loaded: {type(error).__name__}: {error}. Built-in tasks "
                "download their data from the Hugging Face hub; for local data define the task under "
                "--task_dir with dataset_path: json and dataset_kwargs: {data_files: ...} (absolute paths, or "
                "paths relative to the directory cbq runs in)."
            ) from error
        objects.extend(_top_level(name, loaded))
        for task in loaded["tasks"]:
            if task in requested_by:
                raise ConfigError(
                    f"lm-eval task {task!r} is requested twice, by {requested_by[task]!r} and by {name!r} (a "
                    "group or tag includes it): lm-eval evaluates each task once, drop one of the two from --tasks."
                )
            requested_by[task] = name
    return PreparedTasks(names=names, objects=objects, manager=manager, lm_eval_version=installed)


def _top_level(name: str, loaded: dict[str, Any]) -> list[Any]:
    """The object(s) ``TaskManager.load([name])`` built for ``name``: its group, its task, or a tag's tasks.

    Passing these (rather than the name) to ``simple_evaluate`` keeps a group's aggregate score and does
    not load the data a second time.
    """
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    if not loaded["groups"]:  # a tag: a plain list of tasks
        return list(loaded["tasks"].values())
    return [name]  # unexpected shape: let simple_evaluate load it by name


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    prepared: PreparedTasks,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int | str = 1,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` (already on its device) on the prepared tasks; one summary dict per task and group.

    Each entry: ``task``, ``alias``, ``group`` (whether it aggregates other entries), ``num_fewshot``,
    ``samples`` (documents evaluated) and ``samples_total`` (documents in the split), ``version``, and
    ``metrics``: lm-eval's values by metric name (``acc``, ``acc_norm``, ...) with their standard errors
    as ``<metric>_stderr`` (``None`` where lm-eval gives none). Metrics of a filter other than lm-eval's
    default ``none`` keep lm-eval's ``metric,filter`` name.
    """
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=list(prepared.objects),
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=False,
        task_manager=prepared.manager,
    )
    if results is None:  # only non-zero ranks of a distributed run get None; this is a single process
        raise RuntimeError("lm-eval returned no results")
    return _summaries(results)


def _summaries(results: dict[str, Any]) -> list[dict[str, Any]]:
    groups = set(results.get("groups", {}))
    entries = []
    for name, values in results["results"].items():
        samples = results.get("n-samples", {}).get(name, {})
        entries.append({
            "task": name,
            "alias": str(values.get("alias", name)).strip(" -"),
            "group": name in groups,
            "num_fewshot": results.get("n-shot", {}).get(name),
            "samples": samples.get("effective"),
            "samples_total": samples.get("original"),
            "version": results.get("versions", {}).get(name),
            "metrics": _metrics(values),
        })
    return entries


def _metrics(values: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` as ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    metrics: dict[str, float | None] = {}
    for key, value in values.items():
        if "," not in key:  # alias, sample counts and other non-metric fields
            continue
        metric, _, filter_name = key.partition(",")
        name = metric if filter_name == "none" else key
        metrics[name] = _number(value)
    return metrics


def _number(value: Any) -> float | None:
    """A metric value as a float; lm-eval writes ``"N/A"`` for a standard error it did not compute."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_entry(entry: dict[str, Any]) -> str:
    """One printed line: ``piqa: acc 0.6050 ± 0.0114, acc_norm 0.6120 ± 0.0114 (1838 samples, 0-shot)``."""
    metrics = entry["metrics"]
    parts = []
    for name, value in metrics.items():
        if name.endswith("_stderr") or "_stderr," in name or value is None:
            continue
        stderr_name = name.replace(",", "_stderr,", 1) if "," in name else f"{name}_stderr"
        stderr = metrics.get(stderr_name)
        parts.append(f"{name} {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    counts = []
    if entry["samples"] is not None:
        counts.append(f"{entry['samples']} samples")
    if entry["num_fewshot"] is not None:
        counts.append(f"{entry['num_fewshot']}-shot")
    suffix = f" ({', '.join(counts)})" if counts else ""
    return f"{entry['task']}: {', '.join(parts) or 'no metrics'}{suffix}"

"""``cbq evaluate``: perplexity and lm-eval task accuracy of any causal LM (full precision, or a cbq-lightning output)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.evaluation.perplexity import evaluate_sets, prepare_eval_set
from cbq_lightning.evaluation.zero_shot import parse_tasks, prepare_tasks, run_tasks
from cbq_lightning.export.fake_quant import (
    MODEL_DIR,
    SIDECAR,
    attach_activation_quantizers,
    attach_corrections,
)
from cbq_lightning.files import check_checkpoint_dir, check_json, check_safetensors, rerun_quantize
from cbq_lightning.io import atomic_write_json
from cbq_lightning.models.adapter import DecoderAdapter
from cbq_lightning.models.loading import HubAccess, ModelConfig, load_model, load_tokenizer
from cbq_lightning.rotation.fold import RotationConfig, attach_online_rotations, rotate_model


@dataclass
class EvaluateConfig:
    """What ``cbq evaluate`` measures.

    Attributes:
        model: a hub id, a checkpoint directory, a ``.gguf`` file, ``smollm2-135m``, or the output
            directory of ``cbq quantize`` (its ``model/`` checkpoint is used).
        data: perplexity sources, one or a list: dataset names (``wikitext2``, ``c4``, ``ptb``) or
            ``.jsonl``/``.txt`` files; ``[]`` = no perplexity (e.g. with ``tasks``).
        split: split of the named datasets; empty = each dataset's standard evaluation split.
        seqlen: tokens per window.
        max_windows: evaluate the first N windows only; null = all.
        batch_size: windows per forward pass.
        data_dir: local mirror of the named datasets, tried before the hub (null: ``$CBQ_DATA_DIR`` when set).
        dtype: weights dtype (``float32`` reproduces the published CPU figures).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        trust_remote_code: allow custom model code from the hub.
        output: also write the results to this JSON file.
        tasks: lm-evaluation-harness tasks (or groups, tags) to run on the same model, a list or a
            comma-separated string (``arc_easy,hellaswag,piqa``); needs ``pip install "cbq-lightning[lm-eval]"``.
        task_dir: a directory of lm-eval task YAMLs, indexed next to lm-eval's own tasks (for tasks over
            local files: ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).
        num_fewshot: few-shot examples per prompt; null = each task's default (0 for most).
        limit: evaluate the first N documents of each task only (a quick check, not a comparable score).
        lm_eval_batch_size: requests per forward pass in lm-eval: a number, ``auto`` or ``auto:N``
            (largest that fits, re-detected N times); null = ``batch_size``.
        rotation: rotate a full-precision model as ``cbq quantize``'s ``extensions.rotation`` section would (drawn from
            ``seed``) before measuring it: the rotated model computes the same function, and this shows it. A
            ``cbq quantize`` output carries its own rotation and refuses this.
        seed: the seed the rotation is drawn from (a run's ``seed``).
    """

    model: str
    data: list[str] | str = "wikitext2"
    split: str | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    data_dir: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    output: str | None = None
    tasks: list[str] | str | None = None
    task_dir: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    lm_eval_batch_size: int | str | None = None
    rotation: RotationConfig | None = None
    seed: int = 0

    def sources(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)

    def hub_access(self) -> HubAccess:
        """How the model is fetched from the hub (the latest revision; custom code only when asked)."""
        return HubAccess(trust_remote_code=self.trust_remote_code)

    def task_names(self) -> list[str]:
        return parse_tasks(self.tasks)

    def __post_init__(self) -> None:
        """Reject impossible settings before anything is loaded (raised when the configuration is built)."""
        tasks = self.task_names()
        if not self.sources() and not tasks:
            raise ConfigError("nothing to evaluate: --data is empty and no --tasks given; set at least one of them.")
        if not tasks:
            for name in ("task_dir", "num_fewshot", "limit", "lm_eval_batch_size"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name}={getattr(self, name)!r} applies to lm-eval tasks only: also give --tasks.")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot={self.num_fewshot} must be >= 0, or null for each task's default.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit={self.limit} must be >= 1 (documents per task), or null for all.")
        size = self.lm_eval_batch_size
        if isinstance(size, int) and size < 1 or isinstance(size, str) and not _is_auto_batch_size(size):
            raise ConfigError(
                f"lm_eval_batch_size={size!r} must be a number >= 1, 'auto' or 'auto:N' (N re-detections)."
            )

    def lm_eval_batch(self) -> int | str:
        return self.batch_size if self.lm_eval_batch_size is None else self.lm_eval_batch_size


def _is_auto_batch_size(value: str) -> bool:
    head, _, times = value.partition(":")
    return head == "auto" and (not times or (times.isdigit() and int(times) >= 1))


def resolve_model_path(name_or_path: str) -> tuple[str, dict[str, Any] | None]:
    """A ``cbq quantize`` output directory stands for its ``model/`` checkpoint; also its quantization info."""
    path = Path(name_or_path).expanduser()
    if (path / MODEL_DIR / SIDECAR).is_file():
        path = path / MODEL_DIR
    sidecar = path / SIDECAR
    if sidecar.is_file():
        return str(path), check_json(sidecar, rerun_quantize(path.parent))
    return name_or_path, None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available: use --device cpu.")
    return torch.device(name)


def _evaluated_model(
    model_config: ModelConfig, vocab_size: int, path: str, quantization: dict[str, Any] | None, config: EvaluateConfig,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model as it runs: a cbq output with what its checkpoint cannot hold put back (online rotation, activation
    quantizers, low-rank corrections, in that order), or a full-precision model rotated by ``--rotation``; and the
    rotation folded here (None: none)."""
    model = load_model(model_config, vocab_size=vocab_size, hub=config.hub_access())
    rotation = None
    if quantization is not None:  # a run with an online rotation: put it back before anything reads the inputs
        attach_online_rotations(model, quantization.get("rotation"))
    elif config.rotation is not None:
        rotation = rotate_model(DecoderAdapter(model), config.rotation, config.seed)
    if quantization is not None and quantization.get("scheme", {}).get("activations"):
        attach_activation_quantizers(model, Path(path) / quantization["quant_state"])
    if quantization is not None and quantization.get("correction"):
        attach_corrections(model, Path(path) / quantization["quant_state"])  # after: it wraps the linears
    return model, rotation


def run_evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate and return ``{model, quantization, device, results: [{dataset, split, ..., ppl}], zero_shot: [...]}``.

    Everything that can fail on user input (the options, lm-eval being installed, task names, task data,
    perplexity data) is checked before the model is loaded. The lm-eval tasks then run on the very model
    object the perplexity is measured on (activation quantizers attached); ``zero_shot`` holds one entry
    per task and group (see :func:`~cbq_lightning.evaluation.zero_shot.run_tasks`), empty without ``tasks``.
    """
    started = time.perf_counter()
    device = _device(config.device)
    names = config.task_names()
    tasks = prepare_tasks(names, config.task_dir) if names else None
    path, quantization = resolve_model_path(config.model)
    if quantization is not None:  # a cbq quantize output: broken files are fixed by rerunning it, not by a download
        check_checkpoint_dir(Path(path), rerun_quantize(Path(path).parent))
    model_config = ModelConfig(name_or_path=path, dtype=config.dtype)
    tokenizer = load_tokenizer(model_config, hub=config.hub_access())
    sets = [
        prepare_eval_set(source, tokenizer, config.seqlen, config.split, config.max_windows, config.data_dir)
        for source in config.sources()
    ]
    if quantization is not None and config.rotation is not None:
        raise ConfigError(
            f"--rotation with {config.model}: a cbq quantize output is evaluated with the rotation it was "
            "quantized with (its sidecar records it); drop --rotation."
        )
    if quantization is not None and (quantization.get("scheme", {}).get("activations") or quantization.get("correction")):
        check_safetensors(Path(path) / quantization["quant_state"], rerun_quantize(Path(path).parent))
    model, rotation = _evaluated_model(model_config, len(tokenizer), path, quantization, config)
    model.to(device)
    zero_shot: list[dict[str, Any]] = []
    zero_shot_s = None
    if tasks is not None:
        zero_shot_started = time.perf_counter()
        zero_shot = run_tasks(model, tokenizer, tasks, config.num_fewshot, config.limit, config.lm_eval_batch())
        zero_shot_s = time.perf_counter() - zero_shot_started
    results = evaluate_sets(model, sets, device, config.batch_size, label="eval")
    summary = {
        "model": config.model,
        "quantization": quantization,
        # the rotation --rotation folded into a full-precision model (None: none)
        "rotation": rotation,
        "device": str(device),
        "dtype": config.dtype,
        "results": results,
        "zero_shot": zero_shot,
        "lm_eval_version": tasks.lm_eval_version if tasks is not None else None,
        "zero_shot_s": zero_shot_s,
        "wall_time_s": time.perf_counter() - started,
        "config": dataclasses.asdict(config),
    }
    if config.output:
        atomic_write_json(Path(config.output), summary)
    return summary

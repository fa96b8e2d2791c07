"""The Python API: CBQ on a model the caller has already loaded.

Why: the command line loads the model and reads the calibration text itself, so a user with a model in memory
(or their own data pipeline) could not call CBQ. :func:`quantize` takes the model, its tokenizer and the
calibration data as objects and runs exactly what ``cbq quantize`` runs (same recipe files, same composition,
same checks, same outputs); the command line is the same runner with every input read from the recipe.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from cbq_lightning.config import QuantizeConfig
from cbq_lightning.data.calibration import samples_of_text
from cbq_lightning.data.text import ROW_SEPARATOR
from cbq_lightning.errors import ConfigError
from cbq_lightning.runner import QuantizeResult, run_quantize
from cbq_lightning.supplied import SuppliedInputs

Calibration = torch.Tensor | str | Sequence[str] | None


def load_recipe(recipe: str | Path, overrides: Mapping[str, Any] | None = None) -> QuantizeConfig:
    """The configuration of a recipe file with dotted-key overrides (``{"quant.scheme": "W3A16G64"}``), resolved
    as ``cbq quantize --config RECIPE --quant.scheme W3A16G64`` resolves it (``base:`` chains included)."""
    arguments = ["--config", str(recipe)]
    for key, value in (overrides or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)  # jsonargparse reads flag values as YAML
        arguments.append(f"--{key}={text}")
    from cbq_lightning.cli import parse_quantize_config  # the CLI module imports jsonargparse's parser stack

    return parse_quantize_config(arguments)


def quantize(
    model: nn.Module,
    tokenizer: Any | None = None,
    *,
    recipe: str | Path | QuantizeConfig,
    calibration: Calibration = None,
    output_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    callbacks: Sequence[L.Callback] = (),
    save: bool = True,
) -> QuantizeResult:
    """Quantize ``model`` in place with a recipe and return it with the run's report.

    Args:
        model: a transformers causal LM already loaded (any supported family); its linears are replaced by
            quantized ones. A model on a GPU is moved to the CPU first: the windows move their blocks to the
            training device one window at a time.
        tokenizer: the model's tokenizer; reads text calibration and the recipe's evaluation datasets, and is
            saved beside the fake-quant checkpoint. Optional when ``calibration`` is a tensor of ids and the
            recipe evaluates nothing.
        recipe: a recipe file (``configs/w4a16.yaml``; ``base:`` chains are followed) or a ``QuantizeConfig``.
            Its ``model`` section is ignored: ``model`` is what gets quantized.
        calibration: ``[N, T]`` token ids; or text (one string, or a list of documents joined by blank lines),
            tokenized with ``tokenizer`` and cut into the recipe's ``data.num_samples`` disjoint samples of
            ``data.seqlen`` tokens drawn by its seed; None: the recipe's ``data`` section is read.
        output_dir: where the outputs go (``config.yaml``, ``report.json``, ``quant_state.safetensors``,
            ``model/``, ``tensorboard/``, the export); None: the recipe's ``output_dir``. An interrupted call with the
            same model, data and recipe resumes from the last finished window, as the command line does.
        overrides: dotted keys over the recipe, as the command line's flags (``{"train.epochs": 1}``).
        callbacks: extra Lightning callbacks joining every window's Trainer.
        save: False keeps nothing on disk: the run works in a temporary folder (its per-window checkpoints, caches,
            TensorBoard log) that is removed when it returns, so there is no resume; the quantized model and the
            report come back in memory. A recipe that exports (``export.format``) is refused with it.

    Returns:
        :class:`~cbq_lightning.runner.QuantizeResult`: ``report`` (what ``report.json`` holds), ``model`` (the
        quantized model, fake-quant weights) and ``tokenizer``.
    """
    config = _config(recipe, overrides)
    if output_dir is not None:
        config = dataclasses.replace(config, output_dir=str(output_dir))
    ids = _calibration_ids(calibration, tokenizer, config)
    supplied = SuppliedInputs(model=model, tokenizer=tokenizer, calibration_ids=ids)
    if save:
        return run_quantize(config, callbacks=callbacks, supplied=supplied)
    if config.export.format is not None:
        raise ConfigError(
            f"save=False keeps nothing on disk, but the recipe exports (export.format={config.export.format!r}): "
            "pass save=True (and an output_dir), or override export.format to null."
        )
    with tempfile.TemporaryDirectory(prefix="cbq-") as scratch:
        return run_quantize(dataclasses.replace(config, output_dir=scratch, resume=False), callbacks=callbacks,
                            supplied=supplied)


def _config(recipe: str | Path | QuantizeConfig, overrides: Mapping[str, Any] | None) -> QuantizeConfig:
    if isinstance(recipe, QuantizeConfig):
        if overrides:
            raise ConfigError(
                "overrides apply to a recipe file; with a QuantizeConfig object, change its fields "
                "(dataclasses.replace) instead."
            )
        return recipe
    if not isinstance(recipe, (str, Path)):
        raise ConfigError(f"recipe is a {type(recipe).__name__}: give a recipe file's path or a QuantizeConfig.")
    return load_recipe(recipe, overrides)


def _calibration_ids(calibration: Calibration, tokenizer: Any | None, config: QuantizeConfig) -> torch.Tensor | None:
    """Token ids from what the caller gave: ids as they are, text cut as the recipe cuts its corpus."""
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    if isinstance(calibration, str):
        text = calibration
    elif isinstance(calibration, Sequence) and all(isinstance(row, str) for row in calibration):
        text = ROW_SEPARATOR.join(calibration)
    else:
        raise ConfigError(
            f"calibration is a {type(calibration).__name__}: give a [num_samples, seqlen] tensor of token ids, a "
            "string, a list of strings, or None (the recipe's data section)."
        )
    if tokenizer is None:
        raise ConfigError("calibration text needs the model's tokenizer: pass tokenizer=..., or give token ids.")
    return samples_of_text(text, tokenizer, config.data, config.seed)

"""Inputs a caller already holds in memory: the model, its tokenizer and the calibration token ids.

Why a module of its own: the command line loads every input from the recipe (``model.name_or_path``,
``data.*``); the Python API (:func:`cbq_lightning.quantize`) hands over a model that is already loaded and,
optionally, its own calibration ids. The runner reads either, and this is the one place that checks what a
caller supplies and says how it enters the run's configuration, report and resume fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.models.finite import check_finite_parameters


@dataclass(frozen=True)
class SuppliedInputs:
    """A model already in memory, with its tokenizer and calibration ids when the caller has them.

    Attributes:
        model: a transformers causal LM (``AutoModelForCausalLM`` or the class itself); it is quantized in place.
        tokenizer: its tokenizer; needed to read the recipe's calibration and evaluation text and saved beside
            the fake-quant checkpoint. None: give ``calibration_ids`` and no evaluation datasets.
        calibration_ids: ``[N, T]`` token ids to calibrate on; None: the recipe's ``data`` section is read with
            ``tokenizer``.
    """

    model: nn.Module
    tokenizer: Any | None = None
    calibration_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module) or not hasattr(self.model, "config"):
            raise ConfigError(
                f"model is a {type(self.model).__name__}, not a transformers causal LM: load it with "
                "AutoModelForCausalLM.from_pretrained(...) and pass the model object."
            )
        ids = self.calibration_ids
        if ids is not None:
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
                raise ConfigError(
                    "calibration ids must be a non-empty [num_samples, seqlen] integer tensor of token ids "
                    f"(got {_describe(ids)}): stack equal-length samples, e.g. torch.stack(rows)."
                )
            vocab = getattr(self.model.config, "vocab_size", None)
            if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ConfigError(
                    f"calibration ids hold token {int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())}, "
                    f"outside the model's vocabulary [0, {vocab}): tokenize with this model's tokenizer."
                )
        elif self.tokenizer is None:
            raise ConfigError(
                "neither calibration ids nor a tokenizer were given: pass the model's tokenizer (the recipe's data "
                "section is then read with it) or calibration ids."
            )

    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", ""))

    @property
    def label(self) -> str:
        """What the report names as the model: the path or hub id it was loaded from, when transformers kept it."""
        name = getattr(self.model.config, "_name_or_path", "") or ""
        return name or f"in-memory {type(self.model).__name__}"

    def fingerprint(self) -> dict[str, Any]:
        """What a resume must find unchanged besides the configuration: the model's label and the ids' digest."""
        ids = self.calibration_ids
        digest = None if ids is None else hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        return {"model": self.label, "calibration_ids_sha256": digest}

    def prepared_model(self) -> nn.Module:
        """The model frozen, in eval mode and on the CPU, where the runner keeps the blocks between windows.

        Why the CPU: the windows move their own blocks to the training device; a model left on a GPU would hold
        every block there at once, which is what the walk exists to avoid.
        """
        model = self.model
        if any(p.device.type != "cpu" for p in model.parameters()):
            model = model.to("cpu")
        check_finite_parameters(model, self.label)
        model.requires_grad_(False)
        return model.eval()

    def adjust(self, config: Any) -> Any:
        """``config`` (a ``QuantizeConfig``) saying what this run really read: the ids' shape as ``data``'s
        sample count and length, and the model's label as ``model.name_or_path``."""
        model = dataclasses.replace(config.model, name_or_path=self.label, gguf_file=None)
        data = config.data
        if self.calibration_ids is not None:
            rows, length = self.calibration_ids.shape
            data = dataclasses.replace(data, num_samples=int(rows), seqlen=int(length))
        return dataclasses.replace(config, model=model, data=data)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"

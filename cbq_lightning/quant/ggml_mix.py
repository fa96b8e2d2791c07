"""llama.cpp's per-tensor type choice for its K-quant *mixes* (``Q4_K_M`` ...), in pure Python.

Why this exists: ``llama-quantize MODEL OUT Q4_K_M`` does not store every weight as ``Q4_K``. It walks the
model's tensors and picks a GGML type for each one (more bits for ``attn_v`` and ``ffn_down`` in some layers,
``Q6_K`` for the output head, a 32-block type where a row is not a multiple of 256, ...). cbq-lightning
calibrates every tensor on the exact GGML type llama.cpp would store for it, so that its GGUF export and
``llama-quantize`` store the same type per tensor and the two files can be compared fairly. This module is
that decision and nothing else: it reads names, row lengths and a few model facts, has no torch dependency,
and never touches weights.

Which llama.cpp: the one vendored by llama-cpp-python 0.3.36 (``vendor/llama.cpp/src/llama-quant.cpp``:
``llama_tensor_get_type``, ``llama_tensor_get_type_impl``, ``tensor_type_fallback``,
``llama_ftype_get_default_type``, ``init_quantize_state_counters``; the mix names and aliases of
``tools/quantize/quantize.cpp``). The rules change between llama.cpp releases; when the vendored copy is
updated, re-read those functions against this file. It follows llama-quantize run without options: no
``--pure``, no ``--tensor-type`` / ``--output-tensor-type`` / ``--token-embedding-type`` overrides, no
``--leave-output-tensor``, no ``--keep-split``, no pruning; an imatrix changes nothing for these mixes.

How llama.cpp decides, rule by rule as this module follows it (categories, processing order and counters, the
output head, ``tensor_type_fallback``, the "70B" table, Falcon): docs/export.md, "How a mix's types are chosen".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cbq_lightning.errors import ConfigError

#: the canonical mix names this module knows, as llama-quantize spells them (aliases in :data:`MIX_ALIASES`)
MIX_NAMES: tuple[str, ...] = ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
#: the other names llama-quantize accepts for these mixes (its ``QUANT_OPTIONS`` "alias for ..." entries)
MIX_ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

#: each mix's base type (``llama_ftype_get_default_type``): what a tensor no rule singles out gets
_DEFAULT_TYPE: dict[str, str] = {
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
}

#: weights per block of every type a mix can store (``ggml_blck_size``): a row must be a multiple of it
BLOCK_SIZES: dict[str, int] = {
    "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256,
    "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "F16": 1,
}

#: ``tensor_type_fallback``'s 32-block replacement for a 256-block type whose row does not fit
_FALLBACK: dict[str, str] = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

#: architectures whose "70B" model type is decided by the layer count alone (``llama`` also compares heads)
_SEVENTY_B_LAYERS: dict[str, int] = {"qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}

# tensor categories (llama.cpp's ``tensor_category``)
_TOKEN_EMBD = "token_embd"
_OUTPUT = "output"
_ATTN_QKV = "attn_qkv"
_ATTN_KV_B = "attn_kv_b"
_ATTN_V = "attn_v"
_ATTN_K = "attn_k"
_ATTN_Q = "attn_q"
_ATTN_OUTPUT = "attn_output"
_FFN_UP = "ffn_up"
_FFN_GATE = "ffn_gate"
_FFN_DOWN = "ffn_down"
_OTHER = "other"
#: the categories llama.cpp treats as ``attn_v`` (same rules, same counter)
_ATTN_V_LIKE = frozenset({_ATTN_V, _ATTN_QKV, _ATTN_KV_B})
#: substring tests in llama.cpp's order: the first that matches decides
_SUBSTRING_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attn_qkv.weight", _ATTN_QKV),
    ("attn_kv_b.weight", _ATTN_KV_B),
    ("attn_v.weight", _ATTN_V),
    ("attn_k.weight", _ATTN_K),
    ("attn_q.weight", _ATTN_Q),
    ("attn_output.weight", _ATTN_OUTPUT),
    ("ffn_up", _FFN_UP),
    ("ffn_gate", _FFN_GATE),
    ("ffn_down", _FFN_DOWN),
)

#: the layer number llama.cpp reads with ``sscanf(name, "blk.%d.", ...)`` (``%d`` skips spaces, takes a sign)
_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def canonical_mix(name: str) -> str | None:
    """The canonical mix llama-quantize would run for ``name`` (any case, aliases resolved), or None.

    ``"q4_k"`` -> ``"Q4_K_M"``, ``"Q2_K"`` -> ``"Q2_K"``; a name outside :data:`MIX_NAMES` and
    :data:`MIX_ALIASES` (``"Q4_0"``, ``"IQ3_M"``, a typo) -> None. Like llama-quantize, no surrounding spaces
    are trimmed; unlike it, numeric file-type ids (``"15"``) are not accepted, since a config that says ``15``
    is more likely a mistake than a choice.
    """
    if not isinstance(name, str):
        return None
    upper = name.upper()
    if upper in _DEFAULT_TYPE:
        return upper
    return MIX_ALIASES.get(upper)


def _require_mix(name: str) -> str:
    """:func:`canonical_mix`, or a one-line :class:`ConfigError` that names every accepted spelling."""
    canonical = canonical_mix(name)
    if canonical is None:
        aliases = ", ".join(f"{alias} (= {target})" for alias, target in MIX_ALIASES.items())
        raise ConfigError(
            f"unknown llama.cpp quantization mix {name!r}; accepted (any case): {', '.join(MIX_NAMES)}; "
            f"aliases: {aliases}"
        )
    return canonical


def default_type(mix: str) -> str:
    """The mix's base K type (llama.cpp's ``llama_ftype_get_default_type``), e.g. ``Q4_K_M`` -> ``Q4_K``.

    Aliases are accepted; an unknown mix raises :class:`ConfigError`.
    """
    return _DEFAULT_TYPE[_require_mix(mix)]


@dataclass(frozen=True)
class MixModel:
    """The model facts llama.cpp's mix rules read.

    Attributes:
        architecture: llama.cpp's ``general.architecture`` string (``"llama"``, ``"qwen2"``, ``"qwen3"``,
            ``"gemma3"``, ...); it matters for Falcon's branches and the "70B" model type.
        num_layers: the GGUF's ``block_count`` (llama.cpp's ``n_layer``).
        num_heads, num_kv_heads: attention heads and key/value heads; ``n_gqa = num_heads // num_kv_heads``
            (0 when there are no key/value heads, as in llama.cpp).
        num_experts: routed experts (0 or 1 for a dense model); 8 triggers llama.cpp's Mixtral-era branches.
        tied_embeddings: the model has no ``output.weight``, so ``token_embd`` takes the output head's rule.
    """

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int = 0
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        """Refuse facts llama.cpp could not load, before any type is chosen from them."""
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ConfigError(
                f"MixModel.architecture must be llama.cpp's architecture name, got {self.architecture!r}"
            )
        if not _is_int(self.num_layers) or self.num_layers < 1:
            raise ConfigError(f"MixModel.num_layers must be a positive integer, got {self.num_layers!r}")
        for field in ("num_heads", "num_kv_heads", "num_experts"):
            value = getattr(self, field)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"MixModel.{field} must be a non-negative integer, got {value!r}")

    @property
    def n_gqa(self) -> int:
        """Query heads per key/value head (llama.cpp's ``hparams.n_gqa()``)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    @property
    def is_70b(self) -> bool:
        """Whether llama.cpp's loader would type this model ``LLM_TYPE_70B`` (see the module docstring)."""
        if self.architecture == "llama":
            return self.num_experts != 8 and self.num_layers == 80 and self.num_heads != self.num_kv_heads
        return _SEVENTY_B_LAYERS.get(self.architecture) == self.num_layers


@dataclass(frozen=True)
class TensorType:
    """The type llama.cpp chooses for one tensor.

    Attributes:
        name: llama.cpp's tensor name (``blk.3.attn_v.weight``).
        wanted: the type the mix's rules chose (``Q4_K``).
        stored: the type the file holds after llama.cpp's fallback for rows that are not a multiple of
            ``wanted``'s block (``Q5_0``); equal to ``wanted`` when the row fits.
    """

    name: str
    wanted: str
    stored: str

    @property
    def fallback(self) -> bool:
        """True when the row length forced llama.cpp off the type the mix wanted."""
        return self.stored != self.wanted


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _category(name: str) -> str:
    """llama.cpp's ``tensor_get_category``: exact names for head and embeddings, substrings for the rest."""
    if name == "output.weight":
        return _OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return _TOKEN_EMBD
    for needle, category in _SUBSTRING_CATEGORIES:
        if needle in name:
            return category
    return _OTHER


def _layer_of(name: str) -> int | None:
    """The ``N`` of a ``blk.N.`` name (llama.cpp's ``sscanf`` read), None for a tensor outside the blocks."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def _processing_key(name: str) -> tuple[int, str]:
    """llama.cpp's ``weights_map`` order (``weight_name_comparer``): layer (-1 outside blocks), then name."""
    layer = _layer_of(name)
    return (-1 if layer is None else layer, name)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _stored_type(wanted: str, row_length: int) -> str:
    """llama.cpp's ``tensor_type_fallback``: the type a row of ``row_length`` weights can be stored in."""
    if row_length % BLOCK_SIZES[wanted] == 0:
        return wanted
    # a 32-block type has nothing smaller to fall back to: it keeps its name and goes on to the F16 test below
    stored = _FALLBACK.get(wanted, wanted)
    if row_length % BLOCK_SIZES[stored] != 0:
        stored = "F16"
    return stored


class _MixWalk:
    """One pass of llama.cpp's ``llama_tensor_get_type_impl`` over a model: the rules and their counters.

    Tensors must be fed in :func:`_processing_key` order, since the ``attn_v`` and dense ``ffn_down`` rules
    read how many tensors of their kind came before.
    """

    def __init__(self, mix: str, model: MixModel, n_attention_wv: int) -> None:
        self.mix = mix
        self.model = model
        self.falcon = model.architecture == "falcon"
        self.n_attention_wv = n_attention_wv
        self.i_attention_wv = 0
        self.n_ffn_down = model.num_layers
        self.i_ffn_down = 0

    def choose(self, name: str, row_length: int) -> str:
        """The type the mix wants for ``name`` (before the row-length fallback); advances the counters."""
        mix, model = self.mix, self.model
        base = _DEFAULT_TYPE[mix]
        category = _category(name)
        eight_experts = model.num_experts == 8

        if category == _OUTPUT or (model.tied_embeddings and category == _TOKEN_EMBD):
            # the base type is always a 256-block K type here, so llama.cpp's "row fits the base block" test
            # is a test against 256
            if self.falcon or row_length % BLOCK_SIZES[base] != 0:
                return "Q8_0"
            return "Q6_K"
        if category == _TOKEN_EMBD:
            return base  # untied embeddings: only the IQ/TQ mixes, out of scope here, change them
        if category in _ATTN_V_LIKE:
            return self._attn_v(base)
        if category == _ATTN_K:
            return "Q8_0" if eight_experts else base
        if category == _FFN_DOWN:
            return self._ffn_down(name, base)
        if category == _ATTN_OUTPUT:
            return self._attn_output(base)
        # attn_q, ffn_gate, ffn_up and everything else: the K mixes leave them at the base type
        return base

    def _attn_v(self, base: str) -> str:
        mix, model = self.mix, self.model
        i, n = self.i_attention_wv, self.n_attention_wv
        self.i_attention_wv += 1
        wanted = base
        if mix == "Q2_K":
            wanted = "Q4_K" if model.n_gqa >= 4 else "Q3_K"
        elif mix == "Q2_K_S" and model.n_gqa >= 4:
            wanted = "Q4_K"
        elif mix == "Q3_K_M":
            wanted = "Q5_K" if i < 2 else "Q4_K"
        elif mix == "Q3_K_L":
            wanted = "Q5_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            wanted = "Q6_K"
        elif mix == "Q4_K_S" and i < 4:
            wanted = "Q5_K"
        # 70B: attn_v is 8x smaller than attn_q there (grouped-query attention), so more bits cost little
        if model.is_70b and wanted in ("Q3_K", "Q4_K"):
            wanted = "Q5_K"
        if model.num_experts == 8:
            wanted = "Q8_0"
        return wanted

    def _ffn_down(self, name: str, base: str) -> str:
        mix, model = self.mix, self.model
        n_layer = self.n_ffn_down
        if model.num_experts > 1:
            # experts are not in layer order in every MoE file, so llama.cpp reads the layer from the name
            i_layer = _layer_of(name)
            if i_layer is None:
                raise ConfigError(f"cannot read the layer of MoE tensor {name!r}: expected a 'blk.N.' name")
            if not 0 <= i_layer < n_layer:
                raise ConfigError(
                    f"tensor {name!r} names layer {i_layer}, outside the model's {n_layer} layers"
                )
        else:
            i_layer = self.i_ffn_down
        self.i_ffn_down += 1

        more_bits = _use_more_bits(i_layer, n_layer)
        if mix == "Q2_K":
            return "Q3_K"
        if mix == "Q2_K_S":
            return "Q4_K" if i_layer < n_layer // 8 else base
        if mix == "Q3_K_M":
            if i_layer < n_layer // 16:
                return "Q5_K"
            return "Q4_K" if not self.falcon or more_bits else "Q3_K"
        if mix == "Q3_K_L":
            return "Q4_K" if self.falcon else "Q5_K"
        if mix == "Q4_K_M":
            if self.falcon:
                if i_layer < n_layer // 16:
                    return "Q6_K"
                return "Q5_K" if more_bits else "Q4_K"
            return "Q6_K" if more_bits else base
        if mix == "Q5_K_M":
            return "Q6_K" if more_bits else base
        if mix == "Q4_K_S" and not self.falcon and i_layer < n_layer // 8:
            return "Q5_K"
        return base

    def _attn_output(self, base: str) -> str:
        mix = self.mix
        if self.falcon:
            return "Q4_K" if mix == "Q3_K_L" else base
        if self.model.num_experts == 8:
            # note Q3_K_L is not in llama.cpp's list here: an 8-expert Q3_K_L keeps attn_output at Q3_K
            return "Q5_K" if mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else base
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, base)


def assign_types(mix: str, model: MixModel, tensors: Sequence[tuple[str, int]]) -> dict[str, TensorType]:
    """The GGML type llama-quantize would store for each tensor of ``model`` under ``mix``.

    Args:
        mix: a mix name or alias (:func:`canonical_mix`); unknown -> :class:`ConfigError`.
        model: the model facts the rules read.
        tensors: ``(llama.cpp tensor name, row length)`` for every weight llama.cpp would quantize (the 2-D,
            or 3-D expert, ``*.weight`` tensors other than norms and router gates); the row length is
            ``ne[0]``, the number of input features. Pass the whole model, in any order: the ``attn_v`` rules
            count the ``attn_v``-like tensors present, and the counters run in llama.cpp's own order.

    Returns:
        ``{name: TensorType}`` in the order of ``tensors``.
    """
    canonical = _require_mix(mix)
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    for entry in tensors:
        if not (isinstance(entry, tuple | list) and len(entry) == 2):
            raise ConfigError(f"each tensor must be a (name, row length) pair, got {entry!r}")
        name, row_length = entry
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tensor names must be non-empty strings, got {name!r}")
        if not _is_int(row_length) or row_length < 1:
            raise ConfigError(
                f"tensor {name!r}: the row length must be a positive integer, got {row_length!r}"
            )
        if name in seen:
            raise ConfigError(f"tensor {name!r} is listed twice")
        seen.add(name)
        rows.append((name, row_length))
    if model.tied_embeddings and "output.weight" in seen:
        raise ConfigError(
            "MixModel.tied_embeddings is set but the tensors include 'output.weight'; llama.cpp treats a "
            "model with an output.weight as untied"
        )

    walk = _MixWalk(canonical, model, n_attention_wv=sum(_category(name) in _ATTN_V_LIKE for name, _ in rows))
    chosen: dict[str, TensorType] = {}
    for name, row_length in sorted(rows, key=lambda row: _processing_key(row[0])):
        wanted = walk.choose(name, row_length)
        chosen[name] = TensorType(name=name, wanted=wanted, stored=_stored_type(wanted, row_length))
    return {name: chosen[name] for name, _ in rows}

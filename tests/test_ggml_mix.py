"""llama.cpp's per-tensor type choice for its K-quant mixes (:mod:`cbq_lightning.quant.ggml_mix`).

Every expectation below was worked out by hand from the C++ rules of llama-cpp-python 0.3.36's vendored
``llama-quant.cpp`` (``llama_tensor_get_type_impl``, ``tensor_type_fallback``, ``use_more_bits``), not by
running the module: the sets of "more bits" layers are written out literally, with the arithmetic in a
comment, so that a mistake in the module's ``use_more_bits`` cannot hide behind the same mistake here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.ggml_mix import (
    MIX_NAMES,
    MixModel,
    TensorType,
    assign_types,
    canonical_mix,
    default_type,
)

DENSE_BLOCK = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# use_more_bits(i, 30): 30/8 = 3, 7*30/8 = 26; i < 3, i >= 26, or (i - 3) % 3 == 2 -> i = 5, 8, ..., 23
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
# use_more_bits(i, 32): 32/8 = 4, 7*32/8 = 28; i < 4, i >= 28, or (i - 4) % 3 == 2 -> i = 6, 9, ..., 27
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
# use_more_bits(i, 80): 80/8 = 10, 7*80/8 = 70; i < 10, i >= 70, or (i - 10) % 3 == 2 -> i = 12, 15, ..., 69
MORE_BITS_80 = set(range(10)) | set(range(70, 80)) | set(range(12, 70, 3))


def dense_tensors(
    layers: int, hidden: int, intermediate: int, *, tied: bool, attn_out_cols: int | None = None
) -> list[tuple[str, int]]:
    """(name, row length) of a llama-style dense decoder in GGUF naming; row length = input features."""
    cols = {
        "attn_q": hidden,
        "attn_k": hidden,
        "attn_v": hidden,
        "attn_output": attn_out_cols or hidden,
        "ffn_gate": hidden,
        "ffn_up": hidden,
        "ffn_down": intermediate,
    }
    out = [("token_embd.weight", hidden)]
    for i in range(layers):
        out.extend((f"blk.{i}.{kind}.weight", cols[kind]) for kind in DENSE_BLOCK)
    if not tied:
        out.append(("output.weight", hidden))
    return out


def stored(result: dict[str, TensorType], kind: str, layer: int) -> str:
    return result[f"blk.{layer}.{kind}.weight"].stored


def per_layer(result: dict[str, TensorType], kind: str, layers: int) -> list[str]:
    return [stored(result, kind, i) for i in range(layers)]


SMOLLM = MixModel("llama", num_layers=30, num_heads=9, num_kv_heads=3, tied_embeddings=True)
SMOLLM_TENSORS = dense_tensors(30, 576, 1536, tied=True)
LLAMA7B = MixModel("llama", num_layers=32, num_heads=32, num_kv_heads=32)
LLAMA7B_TENSORS = dense_tensors(32, 4096, 11008, tied=False)  # 11008 = 43 * 256


# ----------------------------------------------------------------------------------------------------
# names


def test_mix_names_are_the_k_mixes() -> None:
    assert MIX_NAMES == (
        "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("Q4_K_M", "Q4_K_M"),
        ("q4_k_m", "Q4_K_M"),
        ("Q2_K", "Q2_K"),
        ("q2_k_s", "Q2_K_S"),
        ("q6_k", "Q6_K"),
        ("Q3_K", "Q3_K_M"),  # quantize.cpp: "alias for Q3_K_M"
        ("q4_k", "Q4_K_M"),
        ("Q5_k", "Q5_K_M"),
        ("Q4_0", None),  # a llama-quantize type, but not a K mix
        ("IQ3_M", None),
        ("Q4_K_X", None),
        ("Q6_K_M", None),
        ("", None),
    ],
)
def test_canonical_mix(given: str, canonical: str | None) -> None:
    assert canonical_mix(given) == canonical


@pytest.mark.parametrize(
    ("mix", "base"),
    [
        ("Q2_K", "Q2_K"),
        ("Q2_K_S", "Q2_K"),
        ("Q3_K_S", "Q3_K"),
        ("Q3_K_M", "Q3_K"),
        ("Q3_K_L", "Q3_K"),
        ("Q4_K_S", "Q4_K"),
        ("Q4_K_M", "Q4_K"),
        ("q4_k", "Q4_K"),
        ("Q5_K_S", "Q5_K"),
        ("Q5_K_M", "Q5_K"),
        ("Q6_K", "Q6_K"),
    ],
)
def test_default_type(mix: str, base: str) -> None:
    assert default_type(mix) == base


@pytest.mark.parametrize("bad", ["Q4_0", "Q7_K", "IQ2_XS"])
def test_unknown_mix_is_refused_with_one_line(bad: str) -> None:
    for call in (lambda: assign_types(bad, LLAMA7B, LLAMA7B_TENSORS), lambda: default_type(bad)):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert repr(bad) in message
        for name in (*MIX_NAMES, "Q3_K", "Q4_K", "Q5_K"):
            assert name in message


def test_alias_gives_the_same_types_as_its_mix() -> None:
    assert assign_types("q4_k", LLAMA7B, LLAMA7B_TENSORS) == assign_types("Q4_K_M", LLAMA7B, LLAMA7B_TENSORS)
    assert assign_types("Q3_K", SMOLLM, SMOLLM_TENSORS) == assign_types("Q3_K_M", SMOLLM, SMOLLM_TENSORS)


# ----------------------------------------------------------------------------------------------------
# SmolLM2-135M shape: hidden 576 (not a multiple of 256, a multiple of 32), tied embeddings


def test_smollm_q4_k_m() -> None:
    result = assign_types("Q4_K_M", SMOLLM, SMOLLM_TENSORS)
    assert list(result) == [name for name, _ in SMOLLM_TENSORS]
    # tied: token_embd takes the output rule; 576 % 256 != 0 -> Q8_0, which fits 576 = 18 * 32
    assert result["token_embd.weight"] == TensorType("token_embd.weight", "Q8_0", "Q8_0")
    assert not result["token_embd.weight"].fallback
    for i in range(30):
        for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert result[f"blk.{i}.{kind}.weight"] == TensorType(f"blk.{i}.{kind}.weight", "Q4_K", "Q5_0")
        v = result[f"blk.{i}.attn_v.weight"]
        down = result[f"blk.{i}.ffn_down.weight"]
        if i in MORE_BITS_30:
            assert (v.wanted, v.stored, v.fallback) == ("Q6_K", "Q8_0", True)
            assert (down.wanted, down.stored, down.fallback) == ("Q6_K", "Q6_K", False)  # 1536 = 6 * 256
        else:
            assert (v.wanted, v.stored, v.fallback) == ("Q4_K", "Q5_0", True)
            assert (down.wanted, down.stored, down.fallback) == ("Q4_K", "Q4_K", False)


def test_smollm_fallbacks_of_the_other_k_types() -> None:
    # Q2_K: base Q2_K -> Q4_0; attn_v (n_gqa = 9 // 3 = 3 < 4) Q3_K -> Q4_0; ffn_down Q3_K fits 1536
    q2 = assign_types("Q2_K", SMOLLM, SMOLLM_TENSORS)
    assert q2["blk.4.attn_q.weight"] == TensorType("blk.4.attn_q.weight", "Q2_K", "Q4_0")
    assert q2["blk.4.attn_v.weight"] == TensorType("blk.4.attn_v.weight", "Q3_K", "Q4_0")
    assert q2["blk.4.attn_output.weight"] == TensorType("blk.4.attn_output.weight", "Q3_K", "Q4_0")
    assert q2["blk.4.ffn_down.weight"] == TensorType("blk.4.ffn_down.weight", "Q3_K", "Q3_K")
    assert q2["token_embd.weight"].stored == "Q8_0"
    # Q5_K_M: Q5_K -> Q5_1
    q5 = assign_types("Q5_K_M", SMOLLM, SMOLLM_TENSORS)
    assert q5["blk.4.ffn_up.weight"] == TensorType("blk.4.ffn_up.weight", "Q5_K", "Q5_1")
    # layer 4 is not in MORE_BITS_30, layer 5 is
    assert q5["blk.4.attn_v.weight"] == TensorType("blk.4.attn_v.weight", "Q5_K", "Q5_1")
    assert q5["blk.5.attn_v.weight"] == TensorType("blk.5.attn_v.weight", "Q6_K", "Q8_0")
    # Q6_K: everything Q6_K -> Q8_0 except ffn_down
    q6 = assign_types("Q6_K", SMOLLM, SMOLLM_TENSORS)
    assert {t.stored for name, t in q6.items() if "ffn_down" not in name} == {"Q8_0"}
    assert {t.stored for name, t in q6.items() if "ffn_down" in name} == {"Q6_K"}


# ----------------------------------------------------------------------------------------------------
# llama-7B shape: hidden 4096, intermediate 11008, 32 layers, 32/32 heads (n_gqa = 1), untied


def _layers(rule: Callable[[int], str], n: int = 32) -> list[str]:
    return [rule(i) for i in range(n)]


#: mix -> (token_embd, output, attn_q/attn_k/ffn_gate/ffn_up, attn_output, attn_v and ffn_down per layer)
LLAMA7B_EXPECTED: dict[str, tuple[str, str, str, str, list[str], list[str]]] = {
    # attn_v: Q4_K_M and use_more_bits(i_attention_wv, 32) -> Q6_K; ffn_down: use_more_bits(i, 32) -> Q6_K
    "Q4_K_M": (
        "Q4_K", "Q6_K", "Q4_K", "Q4_K",
        _layers(lambda i: "Q6_K" if i in MORE_BITS_32 else "Q4_K"),
        _layers(lambda i: "Q6_K" if i in MORE_BITS_32 else "Q4_K"),
    ),
    # attn_v: i_attention_wv < 2 -> Q5_K else Q4_K; ffn_down: i < 32/16 = 2 -> Q5_K else Q4_K;
    # attn_output -> Q4_K
    "Q3_K_M": (
        "Q3_K", "Q6_K", "Q3_K", "Q4_K",
        _layers(lambda i: "Q5_K" if i < 2 else "Q4_K"),
        _layers(lambda i: "Q5_K" if i < 2 else "Q4_K"),
    ),
    # attn_v: n_gqa = 1 < 4 -> Q3_K; ffn_down -> Q3_K; attn_output -> Q3_K
    "Q2_K": ("Q2_K", "Q6_K", "Q2_K", "Q3_K", ["Q3_K"] * 32, ["Q3_K"] * 32),
    # no rule touches attn_v / ffn_down / attn_output at Q3_K_S (not 70B, not 8 experts)
    "Q3_K_S": ("Q3_K", "Q6_K", "Q3_K", "Q3_K", ["Q3_K"] * 32, ["Q3_K"] * 32),
    "Q6_K": ("Q6_K", "Q6_K", "Q6_K", "Q6_K", ["Q6_K"] * 32, ["Q6_K"] * 32),
    # attn_v / ffn_down / attn_output -> Q5_K
    "Q3_K_L": ("Q3_K", "Q6_K", "Q3_K", "Q5_K", ["Q5_K"] * 32, ["Q5_K"] * 32),
    # attn_v: i_attention_wv < 4 -> Q5_K; ffn_down: i < 32/8 = 4 -> Q5_K
    "Q4_K_S": (
        "Q4_K", "Q6_K", "Q4_K", "Q4_K",
        _layers(lambda i: "Q5_K" if i < 4 else "Q4_K"),
        _layers(lambda i: "Q5_K" if i < 4 else "Q4_K"),
    ),
    "Q5_K_M": (
        "Q5_K", "Q6_K", "Q5_K", "Q5_K",
        _layers(lambda i: "Q6_K" if i in MORE_BITS_32 else "Q5_K"),
        _layers(lambda i: "Q6_K" if i in MORE_BITS_32 else "Q5_K"),
    ),
    "Q5_K_S": ("Q5_K", "Q6_K", "Q5_K", "Q5_K", ["Q5_K"] * 32, ["Q5_K"] * 32),
    # attn_v: Q2_K_S only bumps at n_gqa >= 4; ffn_down: i < 4 -> Q4_K; attn_output untouched
    "Q2_K_S": (
        "Q2_K", "Q6_K", "Q2_K", "Q2_K",
        ["Q2_K"] * 32,
        _layers(lambda i: "Q4_K" if i < 4 else "Q2_K"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("mix", sorted(LLAMA7B_EXPECTED))
def test_llama7b_patterns(mix: str) -> None:
    token_embd, output, plain, attn_output, attn_v, ffn_down = LLAMA7B_EXPECTED[mix]
    result = assign_types(mix, LLAMA7B, LLAMA7B_TENSORS)
    assert not any(t.fallback for t in result.values())  # 4096 and 11008 are multiples of 256
    assert result["token_embd.weight"].stored == token_embd  # untied: the base type
    assert result["output.weight"].stored == output
    for kind in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
        assert per_layer(result, kind, 32) == [plain] * 32, kind
    assert per_layer(result, "attn_output", 32) == [attn_output] * 32
    assert per_layer(result, "attn_v", 32) == attn_v
    assert per_layer(result, "ffn_down", 32) == ffn_down


def test_llama7b_q4_k_m_layers_written_out() -> None:
    result = assign_types("Q4_K_M", LLAMA7B, LLAMA7B_TENSORS)
    # one digit per layer, 6 = Q6_K and 4 = Q4_K: layers 0-3, then (4, 4, 6) for 4-27, then 28-31
    pattern = "66664464464464464464464464466666"
    assert len(pattern) == 32
    expected = [f"Q{digit}_K" for digit in pattern]
    assert per_layer(result, "attn_v", 32) == expected
    assert per_layer(result, "ffn_down", 32) == expected


def test_order_of_the_list_does_not_matter() -> None:
    # llama.cpp walks tensors sorted by layer number (numerically: blk.10 after blk.9), then name
    forward = assign_types("Q3_K_M", LLAMA7B, LLAMA7B_TENSORS)
    backward = assign_types("Q3_K_M", LLAMA7B, list(reversed(LLAMA7B_TENSORS)))
    assert backward == forward
    assert list(backward) == [name for name, _ in reversed(LLAMA7B_TENSORS)]
    smol = assign_types("Q4_K_M", SMOLLM, sorted(SMOLLM_TENSORS))  # lexicographic: blk.10 before blk.2
    assert per_layer(smol, "ffn_down", 30) == ["Q6_K" if i in MORE_BITS_30 else "Q4_K" for i in range(30)]


def test_counters_count_tensors_not_layers() -> None:
    # a hybrid stack with attention only in blocks 3 and 7: i_attention_wv is 0 then 1, n_attention_wv = 2
    model = MixModel("llama", num_layers=8, num_heads=8, num_kv_heads=8)
    tensors = [("blk.3.attn_v.weight", 512), ("blk.7.attn_v.weight", 512)]
    tensors += [(f"blk.{i}.ffn_down.weight", 1024) for i in range(8)]
    q3m = assign_types("Q3_K_M", model, tensors)
    assert [q3m[f"blk.{i}.attn_v.weight"].wanted for i in (3, 7)] == ["Q5_K", "Q5_K"]  # counter < 2
    # use_more_bits(0, 2): 0 < 0? 0 >= 7*2/8 = 1? (0 - 0) % 3 == 2? -> no; use_more_bits(1, 2): 1 >= 1 -> yes
    q4m = assign_types("Q4_K_M", model, tensors)
    assert [q4m[f"blk.{i}.attn_v.weight"].wanted for i in (3, 7)] == ["Q4_K", "Q6_K"]


# ----------------------------------------------------------------------------------------------------
# grouped-query attention, 70B, tied + fitting rows, F16


def test_gqa_at_q2_k() -> None:
    # Llama-3-8B shape: 32 heads / 8 kv heads -> n_gqa = 4 -> attn_v Q4_K at Q2_K and Q2_K_S
    model = MixModel("llama", num_layers=32, num_heads=32, num_kv_heads=8)
    tensors = dense_tensors(32, 4096, 14336, tied=False)  # 14336 = 56 * 256
    for mix in ("Q2_K", "Q2_K_S"):
        assert per_layer(assign_types(mix, model, tensors), "attn_v", 32) == ["Q4_K"] * 32
    # n_gqa = 3 (SmolLM2) stays below the threshold: Q3_K at Q2_K, Q2_K at Q2_K_S
    assert {t.wanted for n, t in assign_types("Q2_K", SMOLLM, SMOLLM_TENSORS).items() if "attn_v" in n} == {
        "Q3_K"
    }
    assert {t.wanted for n, t in assign_types("Q2_K_S", SMOLLM, SMOLLM_TENSORS).items() if "attn_v" in n} == {
        "Q2_K"
    }


def test_seventy_b_bumps_attn_v() -> None:
    # Llama-2-70B shape: 80 layers, 64 heads / 8 kv -> LLM_TYPE_70B
    model = MixModel("llama", num_layers=80, num_heads=64, num_kv_heads=8)
    assert model.is_70b
    tensors = dense_tensors(80, 8192, 28672, tied=False)  # 28672 = 112 * 256
    # Q3_K_S: attn_v Q3_K -> Q5_K; Q2_K: n_gqa 8 -> Q4_K -> Q5_K; Q5_K_S: Q5_K is not bumped
    assert per_layer(assign_types("Q3_K_S", model, tensors), "attn_v", 80) == ["Q5_K"] * 80
    assert per_layer(assign_types("Q2_K", model, tensors), "attn_v", 80) == ["Q5_K"] * 80
    assert per_layer(assign_types("Q5_K_S", model, tensors), "attn_v", 80) == ["Q5_K"] * 80
    # Q4_K_M: more-bits layers Q6_K (not bumped), the rest Q4_K -> Q5_K
    q4m = per_layer(assign_types("Q4_K_M", model, tensors), "attn_v", 80)
    assert q4m == ["Q6_K" if i in MORE_BITS_80 else "Q5_K" for i in range(80)]
    assert sum(v == "Q6_K" for v in q4m) == 10 + 10 + 20
    # Q2_K_S: n_gqa 8 -> Q4_K -> Q5_K
    assert per_layer(assign_types("Q2_K_S", model, tensors), "attn_v", 80) == ["Q5_K"] * 80


@pytest.mark.parametrize(
    ("model", "is_70b"),
    [
        (MixModel("llama", 80, 64, 64), False),  # llama.cpp calls this 65B
        (MixModel("llama", 80, 64, 8, num_experts=8), False),
        (MixModel("qwen2", 80, 64, 64), True),
        (MixModel("qwen2", 64, 40, 8), False),
        (MixModel("olmo", 80, 64, 64), True),
        (MixModel("deci", 80, 64, 8), True),
        (MixModel("jais2", 68, 56, 8), True),
        (MixModel("qwen3", 80, 64, 8), False),
    ],
)
def test_seventy_b_table(model: MixModel, is_70b: bool) -> None:
    assert model.is_70b is is_70b
    tensors = [("blk.0.attn_v.weight", 8192)]
    assert assign_types("Q3_K_S", model, tensors)["blk.0.attn_v.weight"].wanted == (
        "Q8_0" if model.num_experts == 8 else "Q5_K" if is_70b else "Q3_K"
    )


def test_tied_embeddings_that_fit_get_q6_k() -> None:
    # Qwen3-0.6B shape: hidden 1024, 28 layers, 16 heads / 8 kv, q width 2048, tied
    model = MixModel("qwen3", num_layers=28, num_heads=16, num_kv_heads=8, tied_embeddings=True)
    tensors = dense_tensors(28, 1024, 3072, tied=True, attn_out_cols=2048)
    for mix in MIX_NAMES:
        result = assign_types(mix, model, tensors)
        assert result["token_embd.weight"] == TensorType("token_embd.weight", "Q6_K", "Q6_K"), mix
    # untied, the same embedding is a plain tensor at the base type
    untied = MixModel("qwen3", num_layers=28, num_heads=16, num_kv_heads=8)
    result = assign_types("Q4_K_M", untied, [*tensors, ("output.weight", 1024)])
    assert result["token_embd.weight"].stored == "Q4_K"
    assert result["output.weight"].stored == "Q6_K"


def test_rows_that_are_not_a_multiple_of_32_are_f16() -> None:
    model = MixModel("llama", num_layers=2, num_heads=4, num_kv_heads=4, tied_embeddings=True)
    tensors = [("token_embd.weight", 100), ("blk.0.attn_q.weight", 100), ("blk.0.ffn_down.weight", 48)]
    result = assign_types("Q4_K_M", model, tensors)
    # tied embedding: 100 % 256 -> Q8_0, 100 % 32 -> F16
    assert result["token_embd.weight"] == TensorType("token_embd.weight", "Q8_0", "F16")
    assert result["token_embd.weight"].fallback
    # Q4_K -> Q5_0 -> F16
    assert result["blk.0.attn_q.weight"] == TensorType("blk.0.attn_q.weight", "Q4_K", "F16")
    # ffn_down of layer 0 of 2: use_more_bits(0, 2) is false (see above) -> Q4_K -> Q5_0 -> F16
    assert result["blk.0.ffn_down.weight"] == TensorType("blk.0.ffn_down.weight", "Q4_K", "F16")


# ----------------------------------------------------------------------------------------------------
# experts, attn_qkv, Falcon


def mixtral_tensors() -> list[tuple[str, int]]:
    out = [("token_embd.weight", 4096), ("output.weight", 4096)]
    for i in range(32):
        out += [(f"blk.{i}.attn_{k}.weight", 4096) for k in ("q", "k", "v", "output")]
        out += [(f"blk.{i}.ffn_gate_exps.weight", 4096), (f"blk.{i}.ffn_up_exps.weight", 4096)]
        out += [(f"blk.{i}.ffn_down_exps.weight", 14336)]
    return out


MIXTRAL = MixModel("llama", num_layers=32, num_heads=32, num_kv_heads=8, num_experts=8)


def test_eight_experts_q4_k_m() -> None:
    result = assign_types("Q4_K_M", MIXTRAL, mixtral_tensors())
    assert per_layer(result, "attn_v", 32) == ["Q8_0"] * 32
    assert per_layer(result, "attn_k", 32) == ["Q8_0"] * 32
    assert per_layer(result, "attn_output", 32) == ["Q5_K"] * 32
    assert per_layer(result, "attn_q", 32) == ["Q4_K"] * 32
    assert per_layer(result, "ffn_gate_exps", 32) == ["Q4_K"] * 32
    assert per_layer(result, "ffn_up_exps", 32) == ["Q4_K"] * 32
    # ffn_down_exps is an ffn_down: layer read from the name, use_more_bits(layer, 32)
    assert per_layer(result, "ffn_down_exps", 32) == [
        "Q6_K" if i in MORE_BITS_32 else "Q4_K" for i in range(32)
    ]
    assert result["output.weight"].stored == "Q6_K"
    assert result["token_embd.weight"].stored == "Q4_K"


def test_eight_experts_q3_k_l_keeps_attn_output() -> None:
    # the 8-expert attn_output list omits Q3_K_L, and the non-expert Q3_K_L rule sits in the other branch
    result = assign_types("Q3_K_L", MIXTRAL, mixtral_tensors())
    assert per_layer(result, "attn_output", 32) == ["Q3_K"] * 32
    assert per_layer(result, "attn_v", 32) == ["Q8_0"] * 32
    assert per_layer(result, "ffn_down_exps", 32) == ["Q5_K"] * 32


def test_moe_ffn_down_reads_the_layer_from_the_name() -> None:
    # 64 experts (not 8): only the ffn_down layer reading changes; shexp and exps of one layer share its rule
    model = MixModel("qwen2moe", num_layers=24, num_heads=16, num_kv_heads=16, num_experts=64)
    # use_more_bits(i, 24): 24/8 = 3, 7*24/8 = 21; i < 3, i >= 21, (i - 3) % 3 == 2 -> 5, 8, 11, 14, 17, 20
    more = {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23}
    tensors = [(f"blk.{i}.ffn_down_{kind}.weight", 1408) for i in range(24) for kind in ("exps", "shexp")]
    result = assign_types(
        "Q5_K_M", model, tensors
    )  # 1408 = 5.5 * 256 -> Q5_K falls back to Q5_1, Q6_K to Q8_0
    for i in range(24):
        for kind in ("exps", "shexp"):
            expected = ("Q6_K", "Q8_0") if i in more else ("Q5_K", "Q5_1")
            t = result[f"blk.{i}.ffn_down_{kind}.weight"]
            assert (t.wanted, t.stored) == expected, (i, kind)


def test_moe_ffn_down_needs_a_layer_in_range() -> None:
    with pytest.raises(ConfigError, match="blk.N"):
        assign_types("Q4_K_M", MIXTRAL, [("ffn_down_exps.weight", 4096)])
    with pytest.raises(ConfigError, match="32 layers"):
        assign_types("Q4_K_M", MIXTRAL, [("blk.32.ffn_down_exps.weight", 4096)])


def test_fused_qkv_follows_the_attn_v_rules() -> None:
    # phi3-style attn_qkv is attn_v-like; the separate "attn_qkv -> Q5_K at Q4_K_M" rule is never reached
    model = MixModel("phi3", num_layers=32, num_heads=32, num_kv_heads=32)
    tensors = [(f"blk.{i}.attn_qkv.weight", 3072) for i in range(32)]  # 3072 = 12 * 256
    result = assign_types("Q4_K_M", model, tensors)
    assert per_layer(result, "attn_qkv", 32) == ["Q6_K" if i in MORE_BITS_32 else "Q4_K" for i in range(32)]
    q3m = assign_types("Q3_K_M", model, tensors)
    assert per_layer(q3m, "attn_qkv", 32) == ["Q5_K", "Q5_K"] + ["Q4_K"] * 30


def test_falcon_branches() -> None:
    model = MixModel("falcon", num_layers=32, num_heads=64, num_kv_heads=64)
    tensors = [("token_embd.weight", 4096), ("output.weight", 4096)]
    for i in range(32):
        tensors += [(f"blk.{i}.attn_qkv.weight", 4096), (f"blk.{i}.attn_output.weight", 4096)]
        tensors += [(f"blk.{i}.ffn_up.weight", 4096), (f"blk.{i}.ffn_down.weight", 16384)]
    q4m = assign_types("Q4_K_M", model, tensors)
    assert q4m["output.weight"].stored == "Q8_0"  # Falcon's head is Q8_0 even when the row fits
    # ffn_down: i < 32/16 = 2 -> Q6_K, else use_more_bits -> Q5_K, else Q4_K
    assert per_layer(q4m, "ffn_down", 32) == [
        "Q6_K" if i < 2 else "Q5_K" if i in MORE_BITS_32 else "Q4_K" for i in range(32)
    ]
    q3m = assign_types("Q3_K_M", model, tensors)
    # ffn_down: i < 2 -> Q5_K, else use_more_bits -> Q4_K, else Q3_K; attn_output untouched on Falcon
    assert per_layer(q3m, "ffn_down", 32) == [
        "Q5_K" if i < 2 else "Q4_K" if i in MORE_BITS_32 else "Q3_K" for i in range(32)
    ]
    assert per_layer(q3m, "attn_output", 32) == ["Q3_K"] * 32
    q3l = assign_types("Q3_K_L", model, tensors)
    assert per_layer(q3l, "ffn_down", 32) == ["Q4_K"] * 32
    assert per_layer(q3l, "attn_output", 32) == ["Q4_K"] * 32
    assert per_layer(q3l, "attn_qkv", 32) == ["Q5_K"] * 32
    q4s = assign_types("Q4_K_S", model, tensors)
    assert per_layer(q4s, "ffn_down", 32) == ["Q4_K"] * 32  # no first-eighth bump on Falcon


# ----------------------------------------------------------------------------------------------------
# bad input


def test_tied_model_with_an_output_tensor_is_refused() -> None:
    with pytest.raises(ConfigError, match="output.weight"):
        assign_types("Q4_K_M", SMOLLM, [*SMOLLM_TENSORS, ("output.weight", 576)])


@pytest.mark.parametrize(
    "tensors",
    [
        [("blk.0.attn_q.weight", 0)],
        [("blk.0.attn_q.weight", 4096.0)],
        [("blk.0.attn_q.weight", True)],
        [("", 4096)],
        [("blk.0.attn_q.weight", 4096), ("blk.0.attn_q.weight", 4096)],
        [("blk.0.attn_q.weight",)],
    ],
)
def test_bad_tensor_lists_are_refused(tensors: list[tuple[str, int]]) -> None:
    with pytest.raises(ConfigError):
        assign_types("Q4_K_M", LLAMA7B, tensors)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 0},
        {"num_heads": -1},
        {"num_kv_heads": 2.0},
        {"num_experts": -8},
        {"architecture": ""},
    ],
)
def test_bad_model_facts_are_refused(kwargs: dict[str, object]) -> None:
    facts: dict[str, object] = {"architecture": "llama", "num_layers": 4, "num_heads": 4, "num_kv_heads": 4}
    with pytest.raises(ConfigError):
        MixModel(**{**facts, **kwargs})  # type: ignore[arg-type]


def test_no_kv_heads_means_n_gqa_zero() -> None:
    assert MixModel("llama", 4, 4, 0).n_gqa == 0
    assert MixModel("llama", 4, 32, 8).n_gqa == 4

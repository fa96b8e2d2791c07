"""GGML block types as quantization schemes (issue #45): parsing, the exact grid, and the block packing.

The grid test is the contract the GGUF export rests on: for every implemented type, the quantizer's fake-quantized
weight (with learned-looking clipping, LoRA-style rounding decisions and GPTQ's codes) is bit-for-bit what
``gguf.quants.dequantize`` reads back from the blocks packed from its codes, scales and minimums.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cbq_lightning.errors import ConfigError
from cbq_lightning.export.gguf_blocks import pack_layer
from cbq_lightning.quant.config import QuantConfig
from cbq_lightning.quant.ggml_types import GGML_TYPES, LEGACY_TYPES, NOT_IMPLEMENTED
from cbq_lightning.quant.gptq import GPTQInit
from cbq_lightning.quant.qlinear import FinalizedQuantLinear, LayerQuantConfig, QuantLinear
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import QuantScheme, parse_scheme
from cbq_lightning.quant.weight_quantizer import ClipSearch, build_weight_quantizer

gguf = pytest.importorskip("gguf")
TYPES = list(GGML_TYPES)
K_QUANTS = [name for name in TYPES if GGML_TYPES[name].is_k_quant]
WIDTH = 512  # two super-blocks of the K-quants, sixteen blocks of the legacy types


def _weight(seed: int = 0) -> torch.Tensor:
    """Gaussian rows with the blocks the grid must handle: all zeros, all positive, one negative outlier, a
    super-block whose scales would underflow float16."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, WIDTH, generator=generator) * 0.05
    weight[0, :32] = 0.0
    weight[1, 32:64] = weight[1, 32:64].abs() + 0.01
    weight[2, 5] = -0.9
    weight[3, 40] = 1e-9  # a block whose scale would underflow float16 without care
    weight[3, 32:64] *= 1e-6
    weight[4, 256:] *= 1e-7
    return weight


def _dequantized(
    name: str, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None,
    supers: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> np.ndarray:
    d, dmin = supers if supers is not None else (None, None)
    packed = pack_layer(GGML_TYPES[name], codes, scale, minimum, d, dmin)
    return gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name])


@pytest.mark.parametrize("name", LEGACY_TYPES)
def test_parse_fixes_bits_blocks_and_symmetry(name: str) -> None:
    scheme = parse_scheme(name.lower())
    block = GGML_TYPES[name]
    assert (scheme.w_bits, scheme.group_size, scheme.a_bits, scheme.gguf_type) == (block.bits, 32, 16, name)
    assert scheme.sym == (not block.minimum) and scheme.gguf_mix is None
    assert scheme.name == name
    assert QuantConfig(scheme=name).resolve() == scheme


@pytest.mark.parametrize(
    "name, mix, base",
    [("Q4_K_M", "Q4_K_M", "Q4_K"), ("q4_k", "Q4_K_M", "Q4_K"), ("Q3_K_S", "Q3_K_S", "Q3_K"), ("Q2_K", "Q2_K", "Q2_K"),
     ("Q6_K", "Q6_K", "Q6_K"), ("Q5_K", "Q5_K_M", "Q5_K")],
)
def test_k_names_are_llama_quantize_mixes_on_their_base_type(name: str, mix: str, base: str) -> None:
    """As ``llama-quantize`` reads them: a K name is a per-tensor mix (``Q4_K`` is its alias of ``Q4_K_M``)."""
    scheme = parse_scheme(name)
    block = GGML_TYPES[base]
    assert (scheme.gguf_mix, scheme.gguf_type, scheme.name) == (mix, base, mix)
    assert (scheme.w_bits, scheme.group_size, scheme.sym) == (block.bits, block.sub_block, not block.minimum)
    assert scheme.with_ggml_type("Q5_0") == QuantScheme(5, 32, 16, True, "Q5_0", mix)


@pytest.mark.parametrize("name", ["IQ4_XS", "iq2_xxs", "TQ1_0", "Q8_K"])
def test_importance_matrix_and_other_types_are_refused_by_name(name: str) -> None:
    assert name.upper() in NOT_IMPLEMENTED
    with pytest.raises(ConfigError, match="does not calibrate"):
        parse_scheme(name)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"scheme": "Q4_1", "sym": True}, "stores a minimum")],
)
def test_settings_that_contradict_the_type_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs).resolve()


@pytest.mark.parametrize("flags", [["--extensions.layer_bits", '{"blocks.0.mlp.down_proj": 8}'],
                                   ["--extensions.mixed.budget", "3.5"]])
def test_per_layer_bits_are_refused_with_a_ggml_type(flags: list[str], tmp_path: Path) -> None:
    """A GGML type fixes every layer's bits: per-layer bits, given or allocated, are refused before any work."""
    from cbq_lightning.config import validate
    from tests.conftest import TINY_RECIPE, load_recipe

    config = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--quant.scheme", "Q4_0", *flags)
    with pytest.raises(ConfigError, match="a GGML type fixes every layer's bits"):
        validate(config)


def test_a_ggml_scheme_cannot_be_given_other_bits() -> None:
    with pytest.raises(ConfigError, match="4-bit codes"):
        QuantScheme(w_bits=3, group_size=32, sym=True, gguf_type="Q4_0")


@pytest.mark.parametrize("name", TYPES)
def test_fake_quant_is_what_gguf_dequantizes(name: str) -> None:
    weight = _weight()
    quantizer = build_weight_quantizer(weight, parse_scheme("Q8_0").with_ggml_type(name), learnable_clip=True,
                                       clip_init=0.9)
    with torch.no_grad():
        # clipping ratios that differ per block, as a fit leaves them
        quantizer.upper_logit.copy_(torch.randn(quantizer.upper_logit.shape, generator=torch.Generator().manual_seed(1)) + 2)
        rounding = (torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) > 0.5).float()
        fake = quantizer.fake_quantize(weight, rounding)
        scale, zero, minimum = quantizer.grid(weight)
        codes = quantizer.codes(weight, scale, zero, rounding, minimum=minimum)
    block = GGML_TYPES[name]
    assert int(codes.min()) >= block.qmin and int(codes.max()) <= block.qmax
    supers = quantizer.super_scales(weight)
    if block.is_k_quant:  # float16 d (and dmin) per super-block, integer multiples of it per sub-block
        assert supers is not None and torch.equal(supers[0].half().float(), supers[0])
    else:
        assert supers is None and torch.equal(scale.half().float(), scale)  # the stored float16 scale
    got = _dequantized(name, codes.reshape(weight.shape), scale.squeeze(-1), None if minimum is None else minimum.squeeze(-1),
                       supers)
    np.testing.assert_array_equal(got, fake.numpy())
    assert float((fake - weight).abs().max()) < 0.5  # and it is a quantization of the weight, not noise


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0"])
def test_signed_scale_puts_the_extreme_weight_on_the_lowest_code(name: str) -> None:
    """llama.cpp's convention: ``d = x / -8`` with ``x`` the largest-magnitude weight, so ``x`` is exact at ratio 1."""
    weight = _weight()
    quantizer = build_weight_quantizer(weight, parse_scheme(name), learnable_clip=False, clip_init=1.0)
    fake = quantizer.fake_quantize(weight)
    assert float(fake[2, 5]) == pytest.approx(-0.9, rel=1e-3)  # float16 scale: exact up to its rounding
    assert float(quantizer.scale_zero(weight)[0][2, 0, 0]) > 0  # negative extreme -> positive d
    assert float(quantizer.scale_zero(weight)[0][1, 1, 0]) < 0  # positive extreme -> negative d


def test_q8_0_never_stores_minus_128() -> None:
    weight = _weight()
    quantizer = build_weight_quantizer(weight, parse_scheme("Q8_0"), learnable_clip=True, clip_init=0.5)
    scale, zero, _ = quantizer.grid(weight)
    codes = quantizer.codes(weight, scale, zero, None)
    assert int(codes.min()) == 1 and int(codes.max()) == 255  # clipped at both ends: -127 and +127


@pytest.mark.parametrize("name", ["Q4_1", *K_QUANTS])
def test_clipping_gets_gradient_through_the_float16_scale(name: str) -> None:
    """Through the float16 rounding and, for a K-quant, the integer sub-block scales (straight-through)."""
    weight = _weight()
    quantizer = build_weight_quantizer(weight, parse_scheme("Q8_0").with_ggml_type(name), learnable_clip=True,
                                       clip_init=0.9)
    loss = (quantizer.fake_quantize(weight) - weight).pow(2).sum()
    loss.backward()
    assert quantizer.upper_logit.grad.abs().sum() > 0
    assert quantizer.lower_logit is None or quantizer.lower_logit.grad.abs().sum() > 0


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quant_sub_block_scales_are_integers_of_the_super_block_scale(name: str) -> None:
    """What the format stores: per super-block one float16 ``d`` (and ``dmin``), and per sub-block an integer
    ``sc`` in the type's range (4/6/8 bits); the largest sub-block scale of a super-block takes the top level."""
    block = GGML_TYPES[name]
    weight = _weight()
    quantizer = build_weight_quantizer(weight, parse_scheme("Q8_0").with_ggml_type(name), learnable_clip=False,
                                       clip_init=1.0)
    scale, _, minimum = quantizer.grid(weight)
    supers = quantizer.super_scales(weight)
    assert supers is not None
    d = supers[0].repeat_interleave(256 // block.sub_block, dim=1)
    sc = scale.squeeze(-1) / d
    assert torch.equal(sc, sc.round())
    levels = block.scale_levels
    if block.signed_scale:
        assert int(sc.min()) >= -levels and int(sc.max()) <= levels - 1
        assert (sc.reshape(24, -1, 256 // block.sub_block).abs().amax(-1) == levels).float().mean() > 0.9
    else:
        assert int(sc.min()) >= 1 and int(sc.max()) <= levels
        m = -minimum.squeeze(-1) / supers[1].repeat_interleave(256 // block.sub_block, dim=1)
        assert torch.equal(m, m.round()) and int(m.min()) >= 0 and int(m.max()) <= levels


def test_round_to_nearest_k_quants_are_as_accurate_as_their_bits() -> None:
    """Gaussian weights at clipping ratio 1: each type's relative error sits between the neighbouring bit-widths'
    (a mis-packed scale or a wrong level count would land far outside)."""
    weight = torch.randn(64, 1024, generator=torch.Generator().manual_seed(5))
    errors = {}
    for name in K_QUANTS:
        quantizer = build_weight_quantizer(weight, parse_scheme("Q8_0").with_ggml_type(name), learnable_clip=False,
                                           clip_init=1.0)
        errors[name] = float((quantizer.fake_quantize(weight) - weight).pow(2).mean().sqrt())
    ordered = [errors[name] for name in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]]
    assert ordered == sorted(ordered, reverse=True)
    # each added bit roughly halves the error of a uniform grid: between 1.5x and 3x per bit
    assert all(1.5 < a / b < 3.0 for a, b in zip(ordered, ordered[1:], strict=False))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("start", ["lora", "gptq_offset", "gptq_lora"])
def test_quant_linear_finalises_onto_the_gguf_grid(name: str, start: str) -> None:
    """A calibrating layer (clip search, learned rounding or GPTQ start) finalises to codes whose GGML blocks
    dequantize to exactly the layer's weight, and the finalised layer's forward uses that weight."""
    weight = _weight()
    linear = torch.nn.Linear(WIDTH, 24, bias=False)
    linear.weight.data.copy_(weight)
    inputs = torch.randn(1024, WIDTH, generator=torch.Generator().manual_seed(3))
    hessian = inputs.T @ inputs / inputs.shape[0]
    rounding = RoundingConfig(enabled=True, rank=4, form="offset" if start == "gptq_offset" else "residual")
    config = LayerQuantConfig(
        scheme=parse_scheme("Q8_0").with_ggml_type(name), rounding=rounding, clip_search=ClipSearch(steps=5),
        gptq=GPTQInit(act_order=True) if start.startswith("gptq") else None,
    )
    layer = QuantLinear(linear, config, torch.Generator().manual_seed(0), torch.diagonal(hessian), hessian)
    with torch.no_grad():
        layer.use_hard_rounding = True
        expected = layer.fake_weight()
    final = layer.finalize()
    assert isinstance(final, FinalizedQuantLinear)
    assert torch.equal(final.weight, expected)
    mins = final.mins
    assert (mins is not None) == GGML_TYPES[name].minimum and final.ggml_type == name
    supers = None if final.super_scales is None else (final.super_scales, final.super_mins)
    assert (supers is not None) == GGML_TYPES[name].is_k_quant
    np.testing.assert_array_equal(_dequantized(name, final.qweight, final.scales, mins, supers), final.weight.numpy())


@pytest.mark.parametrize("scheme, shape", [
    ("Q4_1", ()),
    ("Q4_K_M", ("--model.name_or_path", "tiny-llama:hidden_size=256,intermediate_size=512")),
])
def test_killed_ggml_run_resumes_bit_for_bit(tmp_path: Path, scheme: str, shape: tuple[str, ...]) -> None:
    """A finalised window's per-block minimums (``mins``), a K-quant's super-block scales and each layer's GGML type
    come back from the window checkpoint on resume."""
    import lightning as L
    from safetensors.torch import load_file

    from cbq_lightning.runner import run_quantize
    from tests.conftest import TINY_RECIPE, fast_flags, load_recipe

    class Killed(RuntimeError):
        pass

    class KillAtWindow(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            if pl_module.window.index == 2:
                raise Killed("killed at window 2")

    flags = (*fast_flags(1), "--quant.scheme", scheme, *shape)
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "whole"), *flags))
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "killed"), *flags), [KillAtWindow()])
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "killed"), *flags))
    expected = load_file(str(tmp_path / "whole" / "quant_state.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "quant_state.safetensors"))
    assert expected.keys() == resumed.keys() and any(key.endswith(".mins") for key in expected)
    assert any(key.endswith(".super_scales") for key in expected) == (scheme == "Q4_K_M")
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key

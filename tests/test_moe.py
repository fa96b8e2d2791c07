"""Mixture-of-experts blocks: fused experts unfused into per-expert linears that compute the same function,
every expert calibrated on every token while the block's output keeps the real routing, routers and shared
gates left in full precision, and the per-expert token counts in the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from cbq_lightning.cli import main
from cbq_lightning.errors import ConfigError
from cbq_lightning.export import compressed_tensors as ct
from cbq_lightning.export.packed import ExportConfig, export_run
from cbq_lightning.export.quantized_run import ExportScheme, QuantizedLayer
from cbq_lightning.models.adapter import DecoderAdapter, observe_linear_inputs, run_block
from cbq_lightning.models.families import checkpoint_name
from cbq_lightning.models.moe import UnfusedExperts, count_routed_tokens, merge_expert_stages
from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_model, byte_tokenizer
from cbq_lightning.quant.input_moments import InputMoments
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, load_recipe

VOCAB = len(byte_tokenizer())
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
MOE_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")


def _model(model_type: str, experts: int = 4, per_token: int = 2) -> nn.Module:
    shape = TinyModelConfig(num_layers=2, num_experts=experts, experts_per_token=per_token)
    return build_tiny_model(model_type, shape, vocab_size=VOCAB, seed=0).requires_grad_(False)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_unfused_experts_compute_the_fused_function(model_type: str) -> None:
    model = _model(model_type)
    fused = model.model.layers[0].mlp.experts
    with torch.no_grad():
        reference = model(IDS).logits
        gate_up = fused.gate_up_proj.clone()
    adapter = DecoderAdapter(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts) and adapter.unfused_experts == 2
    gate = getattr(experts[1], adapter.family.experts.gate)
    assert torch.equal(gate.weight, gate_up[1, : gate.out_features])  # expert 1's gate rows, copied exactly
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_statistics_reach_every_expert_and_keep_the_block_output(model_type: str) -> None:
    # one expert per token out of 8: with the real routing most experts see a few of the 48 tokens
    model = _model(model_type, experts=8, per_token=1)
    adapter = DecoderAdapter(model)
    hidden, kwargs = adapter.capture_block_inputs(IDS)
    block = adapter.blocks[0]
    with torch.no_grad():
        expected = run_block(block, hidden, kwargs[0])
    seen: dict[str, int] = {}
    outputs: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    linears = list(adapter.block_linears(block))
    try:
        observe_linear_inputs(block, linears, hidden, kwargs[0], batch_size=2,
                              observe=lambda name, x: seen.__setitem__(name, seen.get(name, 0) + x.shape[0]))
    finally:
        handle.remove()
    tokens = IDS.numel()
    experts = [name for name, _ in linears if ".experts." in name]
    assert len(experts) == 8 * 3 and all(seen[name] == tokens for name in experts)  # every token, every expert
    # the routed output, unchanged up to float32 rounding (the experts multiply all tokens, then keep the routed)
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-5, atol=1e-6)
    with count_routed_tokens(block) as counts:
        run_block(block, hidden, kwargs[0])
    assert sum(counts) == tokens * 1 and len(counts) == 8
    assert max(counts) > tokens / 8  # the real routing, not all tokens: some expert got more than its share


def test_routers_and_shared_gates_stay_full_precision() -> None:
    model = _model("qwen2_moe")
    adapter = DecoderAdapter(model)
    names = [name for name, _ in adapter.block_linears(adapter.blocks[0])]
    assert "mlp.shared_expert_gate" not in names and "mlp.gate" not in names
    assert "mlp.shared_expert.down_proj" in names and "mlp.experts.3.down_proj" in names


def test_report_counts_the_tokens_routed_to_each_expert(tmp_path: Path) -> None:
    result = run_quantize(load_recipe(
        TINY_RECIPE, "--model.name_or_path", "tiny-qwen3_moe:num_layers=2,num_experts=4,experts_per_token=2",
        "--quant.scheme", "W4A16G32",
        "--quant.sym", "true",
        "--train.epochs", "1", "--eval.datasets", "[]", "--data.num_samples", "4", "--data.seqlen", "32",
        "--advanced.monitor.rtn_reference", "false", "--advanced.trainer.enable_progress_bar", "false", "--output_dir", str(tmp_path),
    ))
    moe = result.report["model"]["moe"]
    assert moe["experts_per_token"] == 2 and set(moe["routed_tokens"]) == {"0", "1"}
    assert moe["full_precision"] == ["mlp.gate", "mlp.shared_expert_gate"]
    for counts in moe["routed_tokens"].values():
        assert len(counts) == 4 and sum(counts) == 4 * 32 * 2  # every calibration token, twice
    # the quantized model keeps the router a plain parameter and every expert a finalised quantized linear
    block = result.model.model.layers[1]
    assert isinstance(block.mlp.gate.weight, nn.Parameter)
    assert all(type(expert.down_proj).__name__ != "Linear" for expert in block.mlp.experts)
    # GPTQ v1 has no fused-expert layout in transformers 5: refused with the reason, before anything is written
    with pytest.raises(ConfigError, match="mixture of experts .*export as compressed-tensors"):
        export_run(tmp_path, ExportConfig(format="gptq", output=str(tmp_path / "gptq")))
    assert not (tmp_path / "gptq").exists()


def test_gptq_start_and_activation_quantization_on_experts(tmp_path: Path) -> None:
    """The shipped recipes' statistics paths on a mixture of experts: GPTQ measured stage by stage (every
    expert's gate/up in one stage, behind the quantized attention) with the activation-aware clip search, and
    8-bit activations with CFP's attention pair."""
    result = run_quantize(load_recipe(
        TINY_RECIPE, "--model.name_or_path", "tiny-qwen2_moe:num_layers=2",
        "--quant.scheme", "W4A8", "--quant.act_mode", "dynamic_sym", "--extensions.gptq", "{true_sequential: true}",
        "--extensions.clip_search", "{activation_aware: true}", "--cfp.activations", "true",
        "--train.epochs", "1", "--eval.datasets", "[]", "--data.num_samples", "4", "--data.seqlen", "32",
        "--advanced.monitor.rtn_reference", "false", "--advanced.trainer.enable_progress_bar", "false", "--output_dir", str(tmp_path),
    ))
    report = result.report
    assert report["cfp"]["activations"] and report["model"]["moe"]["routed_tokens"]
    assert all(error["quantized"] < 1.0 for error in report["block_errors"])
    with torch.no_grad():
        assert torch.isfinite(result.model(IDS).logits).all()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe"])
def test_true_sequential_gptq_measures_each_kind_of_expert_projection_once(model_type: str) -> None:
    model = _model(model_type)
    adapter = DecoderAdapter(model)
    hidden, kwargs = adapter.capture_block_inputs(IDS)
    _, stages = InputMoments(max_samples=2, batch_size=2, full=True).measure(adapter.blocks[0], hidden, kwargs[0])
    shared = [["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"], ["mlp.shared_expert.down_proj"]]
    assert stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        *(shared if model_type == "qwen2_moe" else []),
        [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")],
        [f"mlp.experts.{e}.down_proj" for e in range(4)],
    ]


def test_expert_stages_merge_by_kind_in_first_place() -> None:
    stages = [["a.q"], ["mlp.experts.0.w1", "mlp.experts.0.w3"], ["mlp.experts.0.w2"], ["mlp.experts.1.w1", "mlp.experts.1.w3"],
              ["mlp.experts.1.w2"], ["mlp.shared_expert.down_proj"]]
    assert merge_expert_stages(stages) == [
        ["a.q"], ["mlp.experts.0.w1", "mlp.experts.0.w3", "mlp.experts.1.w1", "mlp.experts.1.w3"],
        ["mlp.experts.0.w2", "mlp.experts.1.w2"], ["mlp.shared_expert.down_proj"],
    ]


# --- compressed-tensors exports that stock transformers loads (issue 49) --------------------------------------
def _relative(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_compressed_tensors_export_loads_in_stock_transformers(model_type: str, tmp_path: Path) -> None:
    """The user's path: ``cbq quantize --config configs/tiny.yaml`` (CBQ, asymmetric W3 per channel) on a tiny
    MoE (4 experts, top-2), ``cbq export --format compressed-tensors``, ``from_pretrained(OUT)`` with no arguments.

    The installed transformers must assemble its fused experts from the export (transformers 5.25 drops expert
    zero-points, so an asymmetric run's experts are stored symmetric with one bit more: exact). This runs in CI's
    default selection against the newest transformers and compressed-tensors pip resolves, so a release that
    changes the layout its loader converts fails here first. ``dtype auto`` (float32 scales) must reproduce the
    fake-quant model exactly, as the dense families' exports do; the default float16 export must load too, its
    experts within float16's rounding of the run's weights (logits are not compared there: float16 routing flips
    near-tied experts on a random model)."""
    pytest.importorskip("compressed_tensors")
    run, exact, default = tmp_path / "run", tmp_path / "ct-auto", tmp_path / "ct-float16"
    assert main(["quantize", "--config", str(TINY_RECIPE), "--model.name_or_path", f"tiny-{model_type}",
                 "--quant.scheme", "W3A16", "--quant.sym", "false",  # the recipe's own scheme, pinned for the asserts
                 "--output_dir", str(run), "--eval.datasets", "[]", "--advanced.trainer.enable_progress_bar", "false"]) == 0
    assert main(["export", "--run", str(run), "--format", "compressed-tensors", "--dtype", "auto",
                 "--output", str(exact)]) == 0
    assert main(["export", "--run", str(run), "--format", "compressed-tensors", "--output", str(default)]) == 0

    groups = json.loads((exact / "config.json").read_text())["quantization_config"]["config_groups"]
    assert groups["group_0"]["weights"]["symmetric"] is False and groups["group_0"]["weights"]["num_bits"] == 3
    assert groups["group_1"]["targets"] == [ct.EXPERTS_TARGET]
    assert groups["group_1"]["weights"]["symmetric"] is True and groups["group_1"]["weights"]["num_bits"] == 4
    with safe_open(str(exact / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert any(".experts.3." in key and key.endswith(".weight_packed") for key in keys)
    assert not any(".experts." in key and key.endswith(".weight_zero_point") for key in keys)
    assert "model.layers.0.self_attn.q_proj.weight_zero_point" in keys  # the dense linears keep theirs
    assert f"{checkpoint_name(model_type, 'model.layers.0.mlp.gate')}.weight" in keys  # the router: full precision

    reference = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(exact)  # stock, no arguments
    with torch.no_grad():
        assert _relative(model(IDS).logits, reference(IDS).logits) < 1e-6

    served = AutoModelForCausalLM.from_pretrained(default)  # float16, no arguments
    for index, layer in enumerate(served.model.layers):
        experts, expected = layer.mlp.experts, reference.model.layers[index].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            got, want = getattr(experts, name).float(), getattr(expected, name)
            # a float16 scale (relative error <= 2^-11) times an integer code, dequantized in float16 (<= 2^-11)
            assert torch.all((got - want).abs() <= want.abs() * 2**-10 + 2**-24), f"layer {index} {name}"


def test_widened_expert_codes_decompress_to_the_asymmetric_weights() -> None:
    """An asymmetric layer written as symmetric ``b+1``-bit codes: compressed-tensors' own decompression (with the
    experts' group as the config states it) gives ``(u - z) * scale`` exactly, at both extremes of the range."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    bits, group = 4, 8
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (16, 32), generator=generator, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (16, 4), generator=generator, dtype=torch.uint8)
    codes[0, :group], zeros[0, 0] = 2**bits - 1, 0  # q = +15
    codes[1, :group], zeros[1, 0] = 0, 2**bits - 1  # q = -15
    scales = torch.rand(16, 4, generator=generator) + 0.5
    layer = QuantizedLayer("model.layers.0.mlp.experts.1.down_proj", codes, scales, zeros, bits, group, None)
    expected = (codes.float() - zeros.float().repeat_interleave(group, dim=1)) * scales.repeat_interleave(group, dim=1)

    scheme = ExportScheme(bits, group, sym=False)
    config = ct.quantization_config(scheme, ignore=[], experts=True)["config_groups"]["group_1"]
    experts_scheme = QuantizationScheme(targets=config["targets"], weights=config["weights"], format=config["format"])
    packed = ct.layer_packer(scheme, torch.float32, experts=True)(layer)
    assert set(packed) == {"weight_packed", "weight_scale", "weight_shape"}  # no zero-point to drop
    compressor = BaseCompressor.get_value_from_registry(config["format"])
    weight = compressor.decompress(dict(packed), experts_scheme)["weight"]
    assert torch.equal(weight.float(), expected)

    shared = dataclasses.replace(layer, name="model.layers.0.mlp.shared_expert.down_proj")
    dense = ct.layer_packer(scheme, torch.float32, experts=True)(shared)
    assert "weight_zero_point" in dense  # not an expert: the linears' asymmetric group


def test_expert_target_covers_the_experts_and_nothing_else() -> None:
    assert all(ct.is_expert(name) for name in (
        "model.layers.0.mlp.experts.0.gate_proj", "model.layers.11.mlp.experts.127.down_proj",
        "model.layers.0.block_sparse_moe.experts.3.w1",  # Mixtral's saved names
        "model.layers.0.mlp.experts",  # a serving engine's fused experts module
    ))
    assert not any(ct.is_expert(name) for name in (
        "model.layers.0.mlp.shared_expert.up_proj", "model.layers.0.mlp.shared_expert_gate", "model.layers.0.mlp.gate",
        "model.layers.0.self_attn.q_proj", "lm_head",
    ))


def test_asymmetric_8_bit_experts_are_refused() -> None:
    with pytest.raises(ConfigError, match="9-bit symmetric codes.*quant.sym: true"):
        ct.layer_packer(ExportScheme(8, 32, sym=False), torch.float16, experts=True)
    assert ct.expert_warnings(ExportScheme(8, 32, sym=True), experts=True) == []  # symmetric: nothing widened
    assert ct.expert_warnings(ExportScheme(4, None, sym=False), experts=False) == []  # dense model

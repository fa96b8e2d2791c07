"""Every supported decoder family, on tiny random models built from transformers' own config classes: the
adapter's layout (blocks, output head, CFP's exact scaling pairs) matches what the model computes, and
``cbq quantize`` runs end to end with a fake-quant checkpoint and a compressed-tensors export that stock
transformers reloads with the run's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from cbq_lightning.cfp import CFPConfig, CoarseToFinePreprocessor
from cbq_lightning.crossblock import CrossBlockState
from cbq_lightning.errors import ModelSourceError
from cbq_lightning.export.packed import ExportConfig, export_run
from cbq_lightning.models.adapter import DecoderAdapter, run_block, run_blocks_batched
from cbq_lightning.models.families import SUPPORTED_MODEL_TYPES, checkpoint_name, family_for
from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_model, byte_tokenizer
from cbq_lightning.runner import run_quantize
from cbq_lightning.windows import WindowConfig, window_schedule
from tests.conftest import TINY_RECIPE, load_recipe

VOCAB = len(byte_tokenizer())
IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def _tiny(model_type: str, **shape: int) -> torch.nn.Module:
    model = build_tiny_model(model_type, TinyModelConfig(**shape), vocab_size=VOCAB, seed=0)
    return model.requires_grad_(False)


def _relative(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


def _plant_outliers(adapter: DecoderAdapter, block: torch.nn.Module, channel: int = 3, factor: float = 40.0) -> None:
    """Make ``channel`` of every scaling pair's activation an outlier, so that CFP has something to fold (a
    random tiny model has none, and a fold by ones would pass any exactness check)."""
    pairs = adapter.scaling_pairs
    for _, norm, _ in pairs.norm_pairs(block):
        offset = pairs.norm_offset
        norm.weight[channel] = factor * (offset + norm.weight[channel]) - offset
    for _, producer, _consumer, half in pairs.linear_pairs(block):
        row = channel if half is None else half * (producer.out_features // 2) + channel
        producer.weight[row] *= factor


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_blocks_and_output_head_reproduce_the_model(model_type: str) -> None:
    model = _tiny(model_type)
    adapter = DecoderAdapter(model)
    hidden, kwargs = adapter.capture_block_inputs(IDS)
    assert len(kwargs) == adapter.num_blocks and kwargs.kinds == 1  # every layer attends alike: one dict kept
    for index, block in enumerate(adapter.blocks):
        hidden = run_block(block, hidden, kwargs[index])
    with torch.no_grad():
        logits = adapter.output_head()(hidden)
        assert _relative(logits, model(IDS).logits) < 1e-6


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_cfp_channel_scaling_is_exact_in_full_precision(model_type: str) -> None:
    # float64: the folds are exact in real arithmetic, so any error above round-off is a wrong fold (in float32
    # the planted 40x channel alone leaves up to ~1e-4 of rounding after four blocks)
    model = _tiny(model_type).double()
    adapter = DecoderAdapter(model)
    for block in adapter.blocks:
        _plant_outliers(adapter, block)
    with torch.no_grad():
        reference = model(IDS).logits
    cfp = CoarseToFinePreprocessor(CFPConfig(weights=False), scale_activations=True, mlp=True,
                                   pairs=adapter.scaling_pairs)
    hidden, kwargs = adapter.capture_block_inputs(IDS)
    for index, block in enumerate(adapter.blocks):
        cfp(index, block, hidden, kwargs[index])
        hidden = run_block(block, hidden, kwargs[index])
    # every pair found the planted channel and folded a scale for it
    expected = len(adapter.scaling_pairs.norms) + len(adapter.scaling_pairs.linears)
    assert expected > 0
    for found in cfp.outlier_channels.values():
        assert len(found) == expected and all(3 in channels for channels in found.values())
    # Gemma's RMSNorm computes in float32 whatever the model's dtype: float32 round-off bounds it there (a fold
    # that ignored the norm's unit offset would be off by order one)
    tolerance = 1e-4 if family_for(model_type).norm_offset else 1e-12
    with torch.no_grad():
        assert _relative(model(IDS).logits, reference) < tolerance


def test_gemma_norm_fold_keeps_the_unit_offset() -> None:
    """Gemma's RMSNorm multiplies by (1 + w): folding s into it must give (1 + w') = (1 + w) / s."""
    model = _tiny("gemma2")
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, norm.weight.numel()))
    before = norm.weight.clone()
    from cbq_lightning.cfp import fold_channel_scales

    scales = torch.full_like(before, 2.0)
    fold_channel_scales(norm, [], scales, norm_offset=1.0)
    torch.testing.assert_close(1 + norm.weight, (1 + before) / 2)


def _local_global(model_type: str) -> torch.nn.Module:
    """A tiny model whose layers attend differently at the test's 40 tokens: Gemma 2 with an 8-token sliding
    window on every other layer (different masks), Gemma 3 with its local rotary base on layers 0-4 and the
    global one on layer 5 (different rotary tables), Qwen2 with an 8-token window from layer 2 on."""
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, pad_token_id=0)
    if model_type == "gemma2":
        config = AutoConfig.for_model("gemma2", num_hidden_layers=4, sliding_window=8, **shape)
    elif model_type == "qwen2":
        config = AutoConfig.for_model("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=8,
                                      max_window_layers=2, **shape)
    else:
        config = AutoConfig.for_model("gemma3_text", num_hidden_layers=6, **shape)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "qwen2"])
def test_local_and_global_layers_are_replayed_with_their_own_kwargs(model_type: str) -> None:
    """Replaying block 0's kwargs for every block would be silently wrong: each block gets its own."""
    model = _local_global(model_type)
    adapter = DecoderAdapter(model)
    hidden, kwargs = adapter.capture_block_inputs(IDS)
    assert kwargs.kinds == 2
    indices = range(adapter.num_blocks)
    with torch.no_grad():
        reference = model(IDS).logits
        replayed = adapter.output_head()(run_blocks_batched(list(adapter.blocks), hidden, kwargs.for_blocks(indices),
                                                           "cpu", 2))
        block0_only = adapter.output_head()(run_blocks_batched(list(adapter.blocks), hidden, kwargs[0], "cpu", 2))
    assert _relative(replayed, reference) < 1e-6
    assert _relative(block0_only, reference) > 1e-3  # the difference the per-block kwargs make


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss", "gemma3"])
def test_unsupported_types_are_refused_with_the_reason(model_type: str) -> None:
    with pytest.raises(ModelSourceError, match=f"model type '{model_type}' is not supported yet") as error:
        family_for(model_type)
    assert "qwen3_moe" in str(error.value)  # the message lists what is supported


def test_post_norm_opt_has_no_norm_pairs_and_says_so() -> None:
    """OPT-350m normalises after each sub-layer: its norms feed the residual stream, so nothing folds there."""
    model = _tiny("opt")
    model.config.do_layer_norm_before = False
    pairs = DecoderAdapter(model).scaling_pairs
    assert pairs.norms == () and "do_layer_norm_before is false" in " ".join(pairs.not_folded)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_quantize_reload_and_compressed_tensors_export(model_type: str, tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "run"
    result = run_quantize(load_recipe(
        TINY_RECIPE, "--model.name_or_path", f"tiny-{model_type}:num_layers=3",
        "--quant.scheme", "W4A16G32", "--quant.sym", "true", "--train.epochs", "1", "--eval.datasets", "[]",
        "--data.num_samples", "8", "--advanced.monitor.rtn_reference", "false", "--advanced.trainer.enable_progress_bar", "false",
        "--output_dir", str(out),
    ))
    report = result.report
    assert report["model"]["model_type"] == model_type
    assert report["model"]["scaling_pairs"]["norm_pairs"] == {
        pair.norm: list(pair.linears) for pair in family_for(model_type).norm_pairs
    }
    assert [w["blocks"] for w in report["windows"]] == [[0, 1], [1, 2]]
    assert all(w["trainable_parameters"]["rounding"] > 0 for w in report["windows"])
    with torch.no_grad():
        expected = result.model(IDS).logits
        fake_quant = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
        torch.testing.assert_close(fake_quant(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        export_run(out, ExportConfig(format="compressed-tensors", output=str(tmp_path / "ct"), dtype="auto"))
        packed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
        stored = safe_open(tmp_path / "ct" / "model.safetensors", "pt").keys()
        experts = family_for(model_type).experts
        if experts is None:
            assert any(hasattr(module, "weight_scale") for module in packed.modules())  # packed, not dense, weights
        else:  # stored packed per expert (vLLM's names), assembled into fused weights by the dequantizing loader
            names = {checkpoint_name(model_type, f"model.layers.{i}.mlp.experts.{e}.{p}") for i in range(3)
                     for e in range(4) for p in (experts.gate, experts.up, experts.down)}
            assert {f"{name}.weight_packed" for name in names} <= set(stored)
            assert not any(key.endswith((".gate_up_proj", ".down_proj")) for key in stored)
        assert not any(key.endswith(".weight") and ".layers." in key and "proj" in key for key in stored
                       if "shared_expert_gate" not in key)  # no quantized linear left dense
        assert _relative(packed(IDS).logits, expected) < 1e-6


@pytest.mark.parametrize("model_type", [t for t in SUPPORTED_MODEL_TYPES if family_for(t).experts is None])
def test_gptq_export_reloads_with_the_run_logits(model_type: str, tmp_path: Path) -> None:
    """GPTQ v1 (symmetric weight-only) for every dense family, reloaded by stock transformers with gptqmodel's
    plain torch kernel; the format's float16 scales are the only difference from the fake-quant model."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from transformers import GPTQConfig

    out = tmp_path / "run"
    result = run_quantize(load_recipe(
        TINY_RECIPE, "--method", "rtn", "--model.name_or_path", f"tiny-{model_type}:num_layers=2",
        "--quant.scheme", "W4A16G32", "--quant.sym", "true", "--eval.datasets", "[]", "--data.num_samples", "4",
        "--advanced.trainer.enable_progress_bar", "false", "--output_dir", str(out),
    ))
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):  # gptqmodel would compile its kernel
        expected = result.model(IDS).logits
        export_run(out, ExportConfig(format="gptq", output=str(tmp_path / "gptq"), dtype="auto"))
        packed = AutoModelForCausalLM.from_pretrained(
            tmp_path / "gptq", dtype=torch.float32, quantization_config=GPTQConfig(bits=4, backend="torch")
        ).eval()
        assert any(hasattr(module, "qweight") for module in packed.modules())
        # a float16 scale is off by up to 2^-11 of itself: a few 1e-4 of the logits after two blocks
        assert _relative(packed(IDS).logits, expected) < 2e-3


def test_cross_block_walk_uses_each_blocks_kwargs() -> None:
    """The windows' teacher targets and the full-precision cache follow the model through local and global
    layers: after the last window the cache is the model's last hidden state."""
    model = _local_global("gemma3_text")
    adapter = DecoderAdapter(model)
    hidden, kwargs = adapter.capture_block_inputs(IDS)
    state = CrossBlockState(adapter.blocks, hidden, kwargs, lambda index, block: None, batch_size=2)
    for window in window_schedule(adapter.num_blocks, WindowConfig(2, 1)):
        state.enter(window, "cpu")
        state.leave(window, "cpu")
    with torch.no_grad():
        assert _relative(adapter.output_head()(state.x_fp), model(IDS).logits) < 1e-6

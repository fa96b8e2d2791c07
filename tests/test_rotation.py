"""Rotations (cbq_lightning.rotation): the matrices are orthogonal Hadamard matrices, folding them keeps the
full-precision model's function for every family that declares a rotation layout, the online rotation
travels with its linear through calibration and reload, and what cannot be rotated or exported is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cbq_lightning.cli import main
from cbq_lightning.errors import ConfigError
from cbq_lightning.export.packed import ExportConfig, export_run
from cbq_lightning.models.adapter import DecoderAdapter, observe_linear_inputs, replace_module
from cbq_lightning.models.families import FAMILIES
from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_model, byte_tokenizer
from cbq_lightning.rotation.fold import RotationConfig, rotate_model
from cbq_lightning.rotation.hadamard import construction, hadamard, orthogonal
from cbq_lightning.rotation.online import OnlineRotation, online_rotation_of
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, load_recipe

VOCAB = len(byte_tokenizer())
IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
ROTATABLE = [t for family in FAMILIES if family.rotation is not None for t in family.model_types]
NOT_ROTATABLE = [t for family in FAMILIES if family.rotation is None for t in family.model_types]


def _relative(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


def _tiny(model_type: str, tie: bool = False) -> torch.nn.Module:
    """A tiny model whose norms and biases are not the identity, so that a wrong fold shows."""
    shape = TinyModelConfig(tie_embeddings=tie, hidden_size=48, intermediate_size=96, num_heads=4, num_kv_heads=2)
    model = build_tiny_model(model_type, shape, vocab_size=VOCAB, seed=0).requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
        elif name.endswith("bias"):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def test_small_hadamard_matrices_are_the_textbook_ones() -> None:
    torch.testing.assert_close(hadamard(2) * math.sqrt(2), torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    twelve = hadamard(12) * math.sqrt(12)  # Paley I, q = 11: first row all ones, first column 1 then -1
    assert set(twelve.unique().tolist()) == {-1.0, 1.0}
    assert twelve[0].eq(1).all() and twelve[1:, 0].eq(-1).all()
    assert hadamard(100) is None and construction(100).startswith("random orthogonal")


@pytest.mark.parametrize("size", [12, 20, 28, 36, 64, 576, 896, 1536])
def test_hadamard_matrices_are_orthogonal_with_flat_entries(size: int) -> None:
    matrix = hadamard(size)
    assert matrix is not None, construction(size)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix.abs(), torch.full_like(matrix, 1 / math.sqrt(size)), rtol=0, atol=1e-15)


def test_randomised_matrices_depend_on_the_seed_and_stay_orthogonal() -> None:
    for kind, size in (("hadamard", 576), ("random", 576), ("hadamard", 100)):
        first = orthogonal(size, torch.Generator().manual_seed(0), kind).matrix()
        again = orthogonal(size, torch.Generator().manual_seed(0), kind).matrix()
        other = orthogonal(size, torch.Generator().manual_seed(1), kind).matrix()
        assert torch.equal(first, again) and not torch.equal(first, other)
        torch.testing.assert_close(first @ first.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("size", "kind"), [(1536, "hadamard"), (576, "hadamard"), (64, "hadamard"), (100, "hadamard"),
                                           (48, "random")])
def test_the_online_rotation_applies_the_drawn_matrix_factor_by_factor(size: int, kind: str) -> None:
    """The factored forward ``A^T X B`` equals ``x diag(s) (A (x) B)``, the matrix folded into the weight."""
    drawn = orthogonal(size, torch.Generator().manual_seed(5), kind)
    online = OnlineRotation(drawn, {})
    x = torch.randn(3, 7, size, dtype=torch.float64)
    expected = (x @ drawn.matrix()).to(torch.float32)
    torch.testing.assert_close(online(x.to(torch.float32)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(online.matrix.double(), drawn.matrix(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("model_type", ROTATABLE)
def test_rotated_model_computes_the_same_function(model_type: str, tie: bool) -> None:
    model = _tiny(model_type, tie)
    reference = model(IDS).logits
    summary = rotate_model(DecoderAdapter(model), RotationConfig(), seed=3)
    assert _relative(model(IDS).logits, reference) < 1e-5
    assert summary["untied_lm_head"] is tie  # an untied head is left as it is
    assert model.config.tie_word_embeddings is False
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert all(norm.weight.eq(1).all() for name, norm in model.named_modules() if name.endswith("layernorm"))
    assert len(summary["online"]["linears"]) == len(DecoderAdapter(model).blocks)


@pytest.mark.parametrize("part", ["residual", "head", "online_down"])
def test_each_rotation_alone_is_exact_and_changes_the_weights(part: str) -> None:
    model = _tiny("llama")
    reference, before = model(IDS).logits, {k: v.clone() for k, v in model.state_dict().items()}
    switches = {"residual": False, "head": False, "online_down": False, part: True}
    rotate_model(DecoderAdapter(model), RotationConfig(**switches), seed=0)
    assert _relative(model(IDS).logits, reference) < 1e-5
    changed = {k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])}
    expected = {"residual": "embed_tokens", "head": "v_proj", "online_down": "down_proj"}[part]
    assert any(expected in key for key in changed)


def test_residual_rotation_spreads_a_massive_activation() -> None:
    """The point of R1: a hidden dimension hundreds of times louder than the rest is spread over all of them."""
    model = _tiny("llama")
    model.get_input_embeddings().weight[:, 5] *= 300.0  # one massive dimension in every token's embedding
    adapter = DecoderAdapter(model)

    def peak_to_rms() -> float:
        hidden, _ = adapter.capture_block_inputs(IDS)
        return float((hidden.abs().amax(-1) / hidden.pow(2).mean(-1).sqrt()).mean())

    before = peak_to_rms()
    rotate_model(adapter, RotationConfig(head=False, online_down=False), seed=0)
    assert before > 6.0 and peak_to_rms() < 2.0  # sqrt(48) ~ 6.9 is one dimension holding everything


def test_statistics_hooks_see_the_rotated_input_of_the_down_projection() -> None:
    model = _tiny("llama")
    adapter = DecoderAdapter(model)
    hidden, kwargs = adapter.capture_block_inputs(IDS)
    block = adapter.blocks[0]
    seen_before: list[torch.Tensor] = []
    observe_linear_inputs(block, [("down", block.mlp.down_proj)], hidden, kwargs[0], 8, lambda _, x: seen_before.append(x))
    rotate_model(adapter, RotationConfig(residual=False, head=False), seed=0)
    rotation = online_rotation_of(block.mlp.down_proj)
    seen_after: list[torch.Tensor] = []
    observe_linear_inputs(block, [("down", block.mlp.down_proj)], hidden, kwargs[0], 8, lambda _, x: seen_after.append(x))
    torch.testing.assert_close(seen_after[0], seen_before[0] @ rotation.matrix, rtol=1e-5, atol=1e-5)


def test_the_online_rotation_moves_with_its_linear() -> None:
    model = _tiny("llama")
    rotate_model(DecoderAdapter(model), RotationConfig(residual=False, head=False), seed=0)
    old = model.model.layers[0].mlp.down_proj
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False).requires_grad_(False)
    new.weight.copy_(old.weight)
    x = torch.randn(3, old.in_features)
    expected = old(x)
    replace_module(model, "model.layers.0.mlp.down_proj", new)
    assert online_rotation_of(old) is None and not old._forward_pre_hooks
    torch.testing.assert_close(new(x), expected)
    torch.testing.assert_close(old(x), x @ old.weight.T)  # the old module no longer rotates


@pytest.mark.parametrize("model_type", NOT_ROTATABLE)
def test_families_without_an_exact_rotation_are_refused(model_type: str) -> None:
    model = build_tiny_model(model_type, TinyModelConfig(), vocab_size=VOCAB, seed=0)
    with pytest.raises(ConfigError, match=f"model type '{model_type}' has no exact rotation layout"):
        rotate_model(DecoderAdapter(model), RotationConfig(), seed=0)


def test_a_rotation_that_rotates_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="rotates nothing"):
        RotationConfig(residual=False, head=False, online_down=False)


def _w4a4(out: Path, *overrides: str) -> dict:
    return run_quantize(load_recipe(
        TINY_RECIPE, "--quant.scheme", "W4A4", "--quant.act_mode", "dynamic_sym", "--train.epochs", "1",
        "--data.num_samples", "8", "--advanced.monitor.rtn_reference", "false", "--advanced.trainer.enable_progress_bar", "false",
        "--output_dir", str(out), *overrides,
    )).report


def test_rotated_run_keeps_the_reference_and_reloads_with_its_online_rotation(tmp_path: Path) -> None:
    plain = _w4a4(tmp_path / "plain")
    rotated = _w4a4(tmp_path / "rotated", "--extensions.rotation", "{}")
    (plain_eval,), (rotated_eval,) = plain["eval"], rotated["eval"]
    assert rotated_eval["ppl_fp"] == pytest.approx(plain_eval["ppl_fp"], rel=1e-5)
    assert rotated["rotation"]["online"]["size"] == 128 and plain["rotation"] is None
    sidecar = json.loads((tmp_path / "rotated" / "model" / "cbq_quantization.json").read_text())
    assert sidecar["rotation"] == rotated["rotation"]
    summary = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tmp_path / "rotated"), "--data", "shipped", "--seqlen", "128",
                 "--max_windows", "8", "--output", str(summary)]) == 0
    (reloaded,) = json.loads(summary.read_text())["results"]
    assert reloaded["ppl"] == pytest.approx(rotated_eval["ppl"], rel=1e-6)
    with pytest.raises(ConfigError, match="online"):
        export_run(tmp_path / "rotated", ExportConfig(format="compressed-tensors", output=str(tmp_path / "ct")))


def test_export_with_an_online_rotation_is_refused_before_any_work(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path), "--extensions.rotation", "{}",
                 "--export.format", "compressed-tensors"])
    assert code == 2
    assert "extensions.rotation.online_down" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_folded_rotations_export_and_reload_in_stock_transformers(tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    out = tmp_path / "run"
    result = run_quantize(load_recipe(
        TINY_RECIPE, "--model.name_or_path", "tiny-llama:num_layers=2,tie_embeddings=true", "--quant.scheme", "W4A16G32", "--quant.sym", "true",
        "--train.epochs", "1", "--eval.datasets", "[]", "--data.num_samples", "4", "--advanced.monitor.rtn_reference",
        "false", "--advanced.trainer.enable_progress_bar", "false", "--output_dir", str(out),
        "--extensions.rotation.online_down", "false",
    ))
    assert result.report["rotation"]["untied_lm_head"] is True
    with torch.no_grad():
        expected = result.model(IDS).logits
        export_run(out, ExportConfig(format="compressed-tensors", output=str(tmp_path / "ct"), dtype="auto"))
        packed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
        assert packed.config.tie_word_embeddings is False
        assert _relative(packed(IDS).logits, expected) < 1e-6


def test_cfp_mlp_scaling_with_an_online_rotation_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CFP's MLP scaling folds into down_proj's input columns, which the online rotation mixes: not exact."""
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path), "--extensions.rotation", "{}",
                 "--extensions.cfp_mlp", "true"])
    assert code == 2
    assert "extensions.cfp_mlp with extensions.rotation.online_down" in capsys.readouterr().err


def test_evaluate_rotates_a_full_precision_model_without_changing_its_perplexity(tmp_path: Path) -> None:
    """`cbq evaluate --rotation` shows the rotated model computes the same function (the check a user can run on
    their own model before quantizing it rotated)."""
    results = {}
    for name, flags in (("plain", []), ("rotated", ["--rotation", "{}", "--seed", "7"])):
        summary = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", "tiny-llama", "--data", "shipped", "--seqlen", "128", "--max_windows", "4",
                     "--output", str(summary), *flags]) == 0
        results[name] = json.loads(summary.read_text())
    assert results["plain"]["rotation"] is None
    assert results["rotated"]["rotation"]["online"]["seed"] == 7 * 8 + 4
    assert results["rotated"]["results"][0]["ppl"] == pytest.approx(results["plain"]["results"][0]["ppl"], rel=1e-5)

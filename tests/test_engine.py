"""The cross-block machinery on a tiny model: adapter, teacher caching, WindowModule, callback flow."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from callbacks.cross_block import CrossBlockCallback, WindowTargets
from callbacks.hardened_objective import HardenedObjective
from cbq_lightning.crossblock import CrossBlockState
from cbq_lightning.errors import TrainingError
from cbq_lightning.loss import LossConfig
from cbq_lightning.models.adapter import DecoderAdapter, run_blocks_batched
from cbq_lightning.quant.convert import finalized_linears, hard_rounding, quant_linears, quantize_block
from cbq_lightning.quant.qlinear import LayerQuantConfig
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.train_config import OptimConfig
from cbq_lightning.window import HARDENED_LOSS, WindowModule
from cbq_lightning.windows import WindowConfig, window_schedule

SCHEME = QuantScheme(w_bits=3)


def _ids(n: int = 6, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


def _quantizer(index: int, block: nn.Module) -> None:
    quantize_block(block, LayerQuantConfig(SCHEME, RoundingConfig(rank=2), learnable_clip=True, clip_init=0.99),
                   generator=torch.Generator().manual_seed(index))


def test_captured_inputs_replay_the_model(tiny_model: nn.Module) -> None:
    """Block 0 inputs + captured kwargs, run through every block standalone, give the model's output."""
    model = copy.deepcopy(tiny_model)
    adapter = DecoderAdapter(model)
    ids = _ids()
    hidden, kwargs = adapter.capture_block_inputs(ids)
    assert hidden.shape == (6, 32, 64)
    replayed = run_blocks_batched(list(adapter.blocks), hidden, kwargs.for_blocks(range(len(adapter.blocks))), "cpu",
                                  batch_size=4)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.model.norm(replayed), expected, rtol=1e-5, atol=1e-5)


def test_teachers_are_the_original_blocks(tiny_model: nn.Module) -> None:
    model = copy.deepcopy(tiny_model)
    adapter = DecoderAdapter(model)
    hidden, kwargs = adapter.capture_block_inputs(_ids())
    originals = [copy.deepcopy(b) for b in adapter.blocks]
    state = CrossBlockState(adapter.blocks, hidden, kwargs, _quantizer, batch_size=4)
    window = window_schedule(4, WindowConfig(2, 1))[0]
    state.enter(window, "cpu")
    expected = run_blocks_batched(originals[:2], hidden, kwargs.for_blocks([0, 1]), "cpu", 4)
    torch.testing.assert_close(state.y_fp, expected)
    torch.testing.assert_close(state.y_h, expected)  # X_q == X_fp before anything is quantized
    assert all(len(list(quant_linears(adapter.blocks[i]))) == 7 for i in (0, 1))
    assert not list(quant_linears(adapter.blocks[2]))  # blocks outside the window stay untouched
    state.leave(window, "cpu")
    assert len(list(finalized_linears(adapter.blocks[0]))) == 7 and not list(quant_linears(adapter.blocks[0]))
    assert len(list(quant_linears(adapter.blocks[1]))) == 7  # overlap: still calibrating, the next warm start
    assert not list(finalized_linears(adapter.blocks[1]))
    torch.testing.assert_close(state.x_fp, run_blocks_batched(originals[:1], hidden, kwargs[0], "cpu", 4))
    assert not torch.equal(state.x_q, state.x_fp)  # the quantized path has diverged
    assert set(state.teachers) == {1}  # the finalised block's teacher was released


def test_state_dict_and_reenter_continue_the_walk_where_it_stopped(tiny_model: nn.Module) -> None:
    """What resume relies on: a fresh state given the saved caches and history (``load_state_dict``) and the
    entered blocks back (``reenter``: the finalised block 0 and the overlap block 1, whose teacher must again be
    the full-precision block) continues with window 1 exactly as the uninterrupted state does."""
    original = copy.deepcopy(tiny_model)
    first, windows = copy.deepcopy(tiny_model), window_schedule(4, WindowConfig(2, 1))
    adapter = DecoderAdapter(first)
    hidden, kwargs = adapter.capture_block_inputs(_ids())
    state = CrossBlockState(adapter.blocks, hidden, kwargs, _quantizer, batch_size=4)
    state.enter(windows[0], "cpu")
    with torch.no_grad():  # stands in for training: the saved state must carry it
        next(layer for _, layer in quant_linears(adapter.blocks[1])).rounding.a2.add_(0.5)
    state.preprocess_stats = {0: {"cfp/x": 1.0}, 1: {"cfp/x": 2.0}}
    state.leave(windows[0], "cpu")
    saved = {key: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
             for key, value in state.state_dict().items()}
    # no RTN cache when not monitored; no routed-token counts in a dense model
    assert set(saved) == {"x_fp", "x_q", "block_errors", "preprocess_stats", "routed_tokens"}
    assert saved["routed_tokens"] == {}

    resumed_model = copy.deepcopy(original)
    resumed_adapter = DecoderAdapter(resumed_model)
    resumed = CrossBlockState(resumed_adapter.blocks, hidden, kwargs, _quantizer, batch_size=4)
    resumed.reenter(0, _quantizer, adapter.blocks[0].state_dict(), finalized=True)
    resumed.reenter(1, _quantizer, adapter.blocks[1].state_dict(), finalized=False)
    resumed.load_state_dict({**saved, "step_offset": 7})  # keys beyond its own are ignored
    assert resumed.preprocess_stats == {0: {"cfp/x": 1.0}, 1: {"cfp/x": 2.0}}
    for name, value in resumed.teachers[1].state_dict().items():
        torch.testing.assert_close(value, original.model.layers[1].state_dict()[name], rtol=0, atol=0)

    for walk in (state, resumed):
        walk.enter(windows[1], "cpu")
    torch.testing.assert_close(resumed.y_fp, state.y_fp, rtol=0, atol=0)
    torch.testing.assert_close(resumed.y_h, state.y_h, rtol=0, atol=0)
    for walk in (state, resumed):
        walk.leave(windows[1], "cpu")
    torch.testing.assert_close(resumed.x_q, state.x_q, rtol=0, atol=0)
    assert resumed.block_errors == state.block_errors and len(state.block_errors) == 2


def _window_module(model: nn.Module, quantize, blocks=(0, 1)):
    adapter = DecoderAdapter(model)
    hidden, kwargs = adapter.capture_block_inputs(_ids())
    state = CrossBlockState(adapter.blocks, hidden, kwargs, quantize, batch_size=4)
    window = window_schedule(4, WindowConfig(2, 1))[0]
    module = WindowModule([adapter.blocks[i] for i in blocks], window, kwargs.for_blocks(blocks), LossConfig(),
                          OptimConfig(epochs=1, batch_size=3))
    return state, window, module


def test_trainable_parameters_are_exactly_rounding_and_clipping(tiny_model: nn.Module) -> None:
    state, window, module = _window_module(copy.deepcopy(tiny_model), _quantizer)
    state.enter(window, "cpu")
    module.freeze_all_but_quantization_parameters()  # what configure_optimizers does after setup
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    expected = {n for n, _ in module.named_parameters() if n.endswith(("rounding.a1", "rounding.a2",
                                                                       "upper_logit", "lower_logit"))}
    assert trainable == expected and len(trainable) == 2 * 7 * 4  # 2 blocks x 7 linears x (a1, a2, u, l)
    module.check_trainable()
    module.blocks[0].input_layernorm.weight.requires_grad_(True)
    with pytest.raises(TrainingError, match="input_layernorm"):
        module.check_trainable()


def test_loss_is_zero_when_the_window_is_its_teacher(tiny_model: nn.Module) -> None:
    """No quantization: the window reproduces its teacher, so every loss part is exactly zero."""
    state, window, module = _window_module(copy.deepcopy(tiny_model), lambda index, block: None)
    state.enter(window, "cpu")
    loader = DataLoader(WindowTargets(state), batch_size=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False)
    trainer.validate(module, loader, verbose=False)
    assert float(trainer.callback_metrics[HARDENED_LOSS]) == 0.0


def test_hardened_objective_weights_each_batch_by_its_samples(tiny_model: nn.Module) -> None:
    """The validation loop's figure is the batches' hardened objectives weighted by their sample counts (6
    samples as 4 + 2: not the plain mean of the two batch means), and it hardens the rounding: it differs from
    the soft forward's once the decisions have moved from their start."""
    state, window, module = _window_module(copy.deepcopy(tiny_model), _quantizer)
    state.enter(window, "cpu")
    with torch.no_grad():
        for _, layer in quant_linears(module.blocks):
            layer.rounding.a2.add_(0.3)  # move the soft decisions away from what hardening gives
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False)
    trainer.validate(module, DataLoader(WindowTargets(state), batch_size=4), verbose=False)
    measured = float(trainer.callback_metrics[HARDENED_LOSS])
    batches = [(state.x_q[a:b], state.y_fp[a:b], state.y_h[a:b]) for a, b in ((0, 4), (4, 6))]
    with torch.no_grad():
        with hard_rounding(module.blocks):
            hard = [float(module.objective(module(x), y, h, torch.Generator())["loss"]) for x, y, h in batches]
        soft = [float(module.objective(module(x), y, h, torch.Generator())["loss"]) for x, y, h in batches]
    assert measured == pytest.approx((4 * hard[0] + 2 * hard[1]) / 6, rel=1e-6)
    assert measured != pytest.approx((hard[0] + hard[1]) / 2, rel=1e-4)
    assert measured != pytest.approx((4 * soft[0] + 2 * soft[1]) / 6, rel=1e-4)


def test_callback_drives_a_window_fit(tiny_model: nn.Module) -> None:
    """One trainer.fit of a WindowModule with the callback: quantize at setup, finalise after the fit."""
    model = copy.deepcopy(tiny_model)
    state, window, module = _window_module(model, _quantizer)
    objective = HardenedObjective(keep_best=False)
    callback = CrossBlockCallback(state, "cpu", objective)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[callback, objective],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=-1, check_val_every_n_epoch=2, inference_mode=False)
    targets = WindowTargets(state)
    trainer.fit(module, DataLoader(targets, batch_size=3), DataLoader(targets, batch_size=3))
    summary = callback.window_summaries[0]
    assert summary["steps"] == 4 and summary["finalized"] == [0]
    assert len(list(finalized_linears(model.model.layers[0]))) == 7 and not list(quant_linears(model.model.layers[0]))
    # the hardened objective before (sanity check) and after (last epoch's validation) the fit
    assert summary["train_loss_first"] is not None and None not in (summary["loss_first"], summary["loss_last"])
    assert summary["loss_first"] != summary["loss_last"]


def test_preprocessing_hook_sees_each_block_once_before_quantization(tiny_model: nn.Module) -> None:
    """The hook point CFP uses: called once per entering block, on FP linears, with its quantized-path inputs."""
    model = copy.deepcopy(tiny_model)
    adapter = DecoderAdapter(model)
    hidden, kwargs = adapter.capture_block_inputs(_ids())
    calls: list[tuple[int, bool, torch.Tensor]] = []

    def preprocess(index: int, block: nn.Module, inputs: torch.Tensor, _kwargs: dict) -> dict[str, float]:
        calls.append((index, any(True for _ in quant_linears(block)), inputs.clone()))
        return {"seen": float(index)}

    state = CrossBlockState(adapter.blocks, hidden, kwargs, _quantizer, batch_size=4, preprocessors=[preprocess])
    for window in window_schedule(4, WindowConfig(2, 1)):
        state.enter(window, "cpu")
        if window.index == 0:
            quantized_block0 = run_blocks_batched([adapter.blocks[0]], hidden, kwargs[0], "cpu", 4)
        state.leave(window, "cpu")
    assert [index for index, _, _ in calls] == [0, 1, 2, 3]
    assert not any(already_quantized for _, already_quantized, _ in calls)
    torch.testing.assert_close(calls[0][2], hidden)
    torch.testing.assert_close(calls[1][2], quantized_block0)  # block 1 sees block 0's quantized output
    assert state.preprocess_stats[3] == {"seen": 3.0}

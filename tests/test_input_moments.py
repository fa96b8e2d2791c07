"""Activation-aware clip search: input second moments per linear, and the search they weight."""

from __future__ import annotations

import copy

import pytest
import torch

from cbq_lightning.models.adapter import DecoderAdapter
from cbq_lightning.quant.input_moments import InputMoments
from cbq_lightning.quant.weight_quantizer import ClipSearch, WeightQuantizer


def _block_inputs(model: torch.nn.Module, samples: int = 3, seqlen: int = 16):
    adapter = DecoderAdapter(model)
    ids = torch.randint(0, 200, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = adapter.capture_block_inputs(ids)
    return adapter, inputs, kwargs[0]


def test_moments_of_q_proj_are_the_mean_square_of_the_normed_input(tiny_model) -> None:
    adapter, inputs, kwargs = _block_inputs(tiny_model)
    block = adapter.blocks[0]
    moments = InputMoments(max_samples=2, batch_size=1)
    stats = moments(0, block, inputs, kwargs)
    recorded = moments.pop(0)
    with torch.no_grad():
        normed = block.input_layernorm(inputs[:2]).reshape(-1, inputs.shape[-1]).double()
    expected = normed.pow(2).mean(dim=0).float()
    torch.testing.assert_close(recorded["self_attn.q_proj"], expected, rtol=1e-5, atol=1e-7)
    # q, k and v read the same input
    torch.testing.assert_close(recorded["self_attn.k_proj"], expected, rtol=1e-5, atol=1e-7)
    assert set(recorded) == {name for name, _ in DecoderAdapter.block_linears(block)}
    assert recorded["mlp.down_proj"].shape == (block.mlp.down_proj.in_features,)
    assert stats["preprocess/input_moment_peak_to_mean"] >= 1.0
    assert moments.pop(0) is None, "moments are handed out once"


def test_moments_leave_no_hooks_behind(tiny_model) -> None:
    adapter, inputs, kwargs = _block_inputs(tiny_model)
    block = adapter.blocks[1]
    InputMoments()(1, block, inputs, kwargs)
    assert all(not linear._forward_pre_hooks for _, linear in DecoderAdapter.block_linears(block))


def test_activation_aware_search_keeps_the_weight_of_a_massive_feature() -> None:
    """Weight error alone clips the outlier weight; weighted by E[x^2] it stays (nearly) intact.

    3 bits, one weight of 8 among 63 in [-1, 1]: the weight-error search shrinks the range to 0.832 and
    quantizes the outlier to 6.42; with E[x^2] = 1e4 on its feature the range stays at clip_init (0.99)
    and the outlier comes out at 7.64 (values measured, the inequalities are what must hold).
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.cat([torch.tensor([8.0]), torch.rand(63, generator=generator) * 2 - 1]).reshape(1, -1)
    search = ClipSearch(min_ratio=0.2, steps=41, norm=2.0)
    plain = WeightQuantizer(weight, bits=3, clip_init=0.99)
    plain_ratio = float(plain.search_clip(weight, search))
    moments = torch.ones(64)
    moments[0] = 1e4
    aware = WeightQuantizer(weight, bits=3, clip_init=0.99)
    aware_ratio = float(aware.search_clip(weight, search, moments))
    assert plain_ratio < 0.85 and aware_ratio == pytest.approx(0.99), (plain_ratio, aware_ratio)
    with torch.no_grad():
        plain_outlier = float(plain.fake_quantize(weight)[0, 0])
        aware_outlier = float(aware.fake_quantize(weight)[0, 0])
    assert abs(aware_outlier - 8.0) < 0.5 < abs(plain_outlier - 8.0)


def test_uniform_moments_give_the_weight_error_search() -> None:
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    search = ClipSearch()
    plain = WeightQuantizer(weight, bits=3, group_size=16).search_clip(weight, search)
    uniform = WeightQuantizer(weight, bits=3, group_size=16).search_clip(weight, search, torch.full((32,), 3.0))
    torch.testing.assert_close(plain, uniform)


def test_full_moments_are_the_input_covariance_and_share_the_diagonal(tiny_model) -> None:
    """``full=True`` records E[x x^T] (GPTQ's Hessian); its diagonal is the clip search's E[x_j^2]."""
    adapter, inputs, kwargs = _block_inputs(tiny_model)
    block = adapter.blocks[0]
    full = InputMoments(max_samples=2, batch_size=1, full=True)
    full(0, block, inputs, kwargs)
    matrices = full.pop(0)
    diagonal = InputMoments(max_samples=2, batch_size=1)
    diagonal(0, block, inputs, kwargs)
    diagonals = diagonal.pop(0)
    with torch.no_grad():
        normed = block.input_layernorm(inputs[:2]).reshape(-1, inputs.shape[-1]).double()
    expected = (normed.T @ normed / normed.shape[0]).float()
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        torch.testing.assert_close(matrices[name], expected, rtol=1e-4, atol=1e-6)
    for name, matrix in matrices.items():
        width = block.get_submodule(name).in_features
        assert matrix.shape == (width, width)
        torch.testing.assert_close(torch.diagonal(matrix), diagonals[name], rtol=1e-4, atol=1e-6)
    # the MLP's down projection reads a different input than gate/up: its matrix is not theirs
    assert matrices["mlp.down_proj"].shape != matrices["mlp.gate_proj"].shape or not torch.allclose(
        matrices["mlp.down_proj"], matrices["mlp.gate_proj"])


def _quantize_stage(block: torch.nn.Module, names: list[str], hessians: dict[str, torch.Tensor]) -> None:
    from cbq_lightning.quant.convert import quantize_block
    from cbq_lightning.quant.gptq import GPTQInit
    from cbq_lightning.quant.qlinear import LayerQuantConfig
    from cbq_lightning.quant.rounding import RoundingConfig
    from cbq_lightning.quant.scheme import QuantScheme

    config = LayerQuantConfig(QuantScheme(w_bits=2), RoundingConfig(enabled=False), learnable_clip=False, clip_init=1.0,
                              gptq=GPTQInit())
    quantize_block(block, config, hessians=hessians, names=names)


def _input_covariance(block: torch.nn.Module, name: str, inputs: torch.Tensor, kwargs) -> torch.Tensor:
    """E[x x^T] of one linear's input, measured by a hook of its own (the reference for the tests)."""
    from cbq_lightning.models.adapter import run_block

    seen: list[torch.Tensor] = []
    handle = block.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
    )
    try:
        with torch.no_grad():
            run_block(block, inputs, kwargs)
    finally:
        handle.remove()
    x = torch.cat(seen)
    return (x.T @ x / x.shape[0]).float()


def test_stages_follow_the_forward_and_group_linears_by_shared_input(tiny_model) -> None:
    adapter, inputs, kwargs = _block_inputs(tiny_model)
    moments = InputMoments(max_samples=2, batch_size=1, full=True)
    moments(0, adapter.blocks[0], inputs, kwargs)
    stages = [names for names, _ in moments.stages(0, adapter.blocks[0])]
    assert stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("sequential", [True, False])
def test_true_sequential_measures_each_stage_behind_the_quantized_ones(tiny_model, sequential: bool) -> None:
    """Sequential: o_proj's Hessian is that of the block with q/k/v already at 2 bits (not the FP one), and
    so on down the block; otherwise every stage gets the full-precision pass's matrices."""
    adapter, inputs, kwargs = _block_inputs(copy.deepcopy(tiny_model))  # its block 0 gets quantized
    block = adapter.blocks[0]
    rows = inputs[:2]
    fp = {name: _input_covariance(block, name, rows, kwargs) for name, _ in DecoderAdapter.block_linears(block)}
    moments = InputMoments(max_samples=2, batch_size=1, full=True, sequential=sequential)
    moments(0, block, inputs, kwargs)
    changed = []
    for position, (names, hessians) in enumerate(moments.stages(0, block)):
        for name in names:
            current = _input_covariance(block, name, rows, kwargs)  # the block as it is now
            expected = current if sequential else fp[name]
            torch.testing.assert_close(hessians[name], expected, rtol=1e-4, atol=1e-6)
            if position > 0:
                changed.append(float((current - fp[name]).norm() / fp[name].norm()))
        _quantize_stage(block, names, hessians)
    # the later stages do see the quantized earlier ones (2-bit q/k/v/o/gate/up move their inputs)
    assert min(changed) > 1e-3, changed
    assert not any(isinstance(m, torch.nn.Linear) for m in block.modules()), "every stage was quantized"

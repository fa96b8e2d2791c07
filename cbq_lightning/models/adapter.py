"""Generic adapter for Hugging Face decoder-only models.

CBQ needs four things from a model: the list of transformer blocks, the inputs of the first block, the
keyword arguments every block is called with (attention mask, rotary embeddings, positions), and a way
to run one block on its own. All of that is read from the model as it runs - nothing is re-implemented
per architecture - so supporting a new LLaMA-like family is a one-line change to
:data:`SUPPORTED_MODEL_TYPES` once it has been checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from cbq_lightning.errors import ModelSourceError

#: model types whose decoder layers are called as ``layer(hidden, **kwargs)`` with rotary embeddings
#: passed in, and whose block linears are q/k/v/o + gate/up/down
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

#: (norm, linears it feeds) in a decoder layer of the supported types: where a per-channel scale can be
#: folded exactly, since their norms compute ``weight * normalized(x)`` (RMSNorm) and the linears read
#: nothing else
NORM_LINEAR_PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)

#: (producer, consumer) linears of a decoder layer where the consumer reads the producer's output through
#: an elementwise product only: in the gated MLP ``down(act(gate(x)) * up(x))`` scaling up's output row c
#: by ``1/s_c`` and down's input column c by ``s_c`` is exact, so CFP can fold channel scales there too
LINEAR_LINEAR_PAIRS = (("mlp.up_proj", "mlp.down_proj"),)

#: keyword arguments of a block call that must not be replayed (KV caches, output flags)
_DROPPED_KWARGS = ("past_key_value", "past_key_values", "use_cache", "output_attentions")


def _pair_modules(block: nn.Module, names: tuple[str, ...], switch: str) -> list[nn.Module]:
    """The submodules of a scaling pair, or an error naming the missing one and the switch that avoids it."""
    try:
        return [block.get_submodule(name) for name in names]
    except AttributeError as error:
        raise ModelSourceError(
            f"block has no {' -> '.join(names)} pair ({error}): CFP's channel scaling needs the LLaMA-family "
            f"layout; set {switch}=false for this model."
        ) from error


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are known."""


def check_model_type(model_type: str) -> None:
    """Refuse architectures the adapter has not been validated on, naming the type and the options."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"model type {model_type!r} is not supported yet: cbq-lightning handles "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (LLaMA-family decoders). "
            "Use a model of one of these types or open an issue for this architecture."
        )


def block_output(output: Any) -> torch.Tensor:
    """The hidden states of a block call: a tensor (transformers >= 4.54) or the first tuple item."""
    return output[0] if isinstance(output, tuple | list) else output


def kwargs_to(kwargs: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor (also inside tuples, e.g. rotary ``(cos, sin)``) of a block's kwargs."""

    def move(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.to(device)
        if isinstance(value, tuple | list):
            return type(value)(move(v) for v in value)
        return value

    return {key: move(value) for key, value in kwargs.items()}


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one decoder block standalone on ``hidden`` ``[B, T, H]``."""
    return block_output(block(hidden, **kwargs))


@torch.no_grad()
def run_blocks_batched(
    blocks: list[nn.Module],
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    device: torch.device | str,
    batch_size: int,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Push a CPU cache ``[N, T, H]`` through ``blocks`` on ``device`` in batches; result on CPU.

    ``out`` (e.g. a memory-mapped cache, see :mod:`cbq_lightning.cache`) receives the result batch by
    batch instead of a new tensor.
    """
    kwargs = kwargs_to(kwargs, device)
    outputs = []
    for start in range(0, hidden.shape[0], batch_size):
        x = hidden[start : start + batch_size].to(device)
        for block in blocks:
            x = run_block(block, x, kwargs)
        if out is not None:
            out[start : start + x.shape[0]] = x.to("cpu", dtype=out.dtype)
        else:
            outputs.append(x.to("cpu", dtype=out_dtype or hidden.dtype))
    return out if out is not None else torch.cat(outputs)


@torch.no_grad()
def observe_linear_inputs(
    block: nn.Module,
    linears: list[tuple[str, nn.Module]],
    inputs: torch.Tensor,
    kwargs: dict[str, Any],
    batch_size: int,
    observe: Callable[[str, torch.Tensor], None],
) -> None:
    """Run ``block`` over ``inputs`` and hand each named linear's input, as ``[tokens, features]``, to
    ``observe(name, x)``.

    Why one helper: every statistic a preprocessor gathers (second moments for the clip search, channel
    maxima for CFP) is "what does this linear see on the quantized path", and the hooks must be removed
    even when the forward fails.
    """

    def hook_for(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            observe(name, args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears]
    try:
        device = next(block.parameters()).device
        run_blocks_batched([block], inputs, kwargs, device, batch_size)
    finally:
        for handle in handles:
            handle.remove()


class DecoderAdapter:
    """Access to the transformer blocks of a Hugging Face causal LM."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        check_model_type(model_type)
        self.model = model
        self.model_type = model_type
        self.blocks: nn.ModuleList = model.model.layers

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def output_head(self) -> nn.Module:
        """The final norm and the LM head, as one frozen module mapping last-block hidden states to logits.

        Why: the last window can then be trained on what perplexity measures (the next-token distribution)
        rather than on a proxy of it. The modules are the model's own (the head may be tied to the
        embedding), so nothing is copied.
        """
        return nn.Sequential(self.model.model.norm, self.model.get_output_embeddings())

    @staticmethod
    def block_linears(block: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
        """Every ``nn.Linear`` of a block with its dotted name inside the block (q_proj, mlp.up_proj...)."""
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                yield name, module

    @staticmethod
    def norm_linear_pairs(block: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear]]]:
        """``(norm name, norm, [linears reading its output])`` of a block, for CFP's channel scaling."""
        pairs = []
        for norm_name, linear_names in NORM_LINEAR_PAIRS:
            norm, *linears = _pair_modules(block, (norm_name, *linear_names), "cfp.activations")
            pairs.append((norm_name, norm, linears))
        return pairs

    @staticmethod
    def linear_linear_pairs(block: nn.Module) -> list[tuple[str, nn.Linear, nn.Linear]]:
        """``(consumer name, producer, consumer)`` of a block, for CFP's channel scaling inside the MLP."""
        pairs = []
        for producer_name, consumer_name in LINEAR_LINEAR_PAIRS:
            producer, consumer = _pair_modules(block, (producer_name, consumer_name), "cfp.mlp")
            pairs.append((consumer_name, producer, consumer))
        return pairs

    @staticmethod
    def replace_linears(block: nn.Module, factory: Callable[[str, nn.Linear], nn.Module]) -> None:
        """Replace each ``nn.Linear`` of ``block`` in place by ``factory(name, linear)``."""
        for name, linear in list(DecoderAdapter.block_linears(block)):
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, factory(name, linear))

    @torch.no_grad()
    def capture_block_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Inputs of block 0 for every calibration sequence, plus the kwargs blocks are called with.

        This runs where the model is (CPU for big models: only the embedding and the rotary tables are
        evaluated before the hook stops the forward). Sequences are run one at a time, so the captured kwargs have batch dimension 1 and broadcast over
        any batch of same-length sequences (no padding: calibration samples all have the same length).
        Returns ``(hidden [N, T, H] on CPU, kwargs on CPU)``.
        """
        captured: dict[str, Any] = {}

        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured["hidden"] = hidden.detach()
            if "kwargs" not in captured:
                captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
            raise _StopForward

        device = self.model.get_input_embeddings().weight.device
        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        hiddens = []
        try:
            for row in input_ids:
                try:
                    self.model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
                except _StopForward:
                    pass
                hiddens.append(captured["hidden"].to("cpu"))
        finally:
            handle.remove()
        return torch.cat(hiddens), kwargs_to(captured["kwargs"], "cpu")

"""Generic adapter for Hugging Face decoder-only models.

CBQ needs four things from a model: the list of transformer blocks, the inputs of the first block, the
keyword arguments each block is called with (attention mask, rotary embeddings, positions), and a way
to run one block on its own. All of that is read from the model as it runs - nothing is re-implemented
per architecture. What cannot be read off a running model (which norm feeds which linears, what happens
between the last block and the logits) is declared per family in :mod:`cbq_lightning.models.families`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbq_lightning.errors import ModelSourceError
from cbq_lightning.models.families import (
    SUPPORTED_MODEL_TYPES,
    FamilyLayout,
    LinearPair,
    LogitTransform,
    NormPair,
    family_for,
    norm_pairs,
)
from cbq_lightning.models.moe import (
    keeps_full_precision,
    route_all_tokens,
    unfuse_experts,
)
from cbq_lightning.rotation.online import move_online_rotation

__all__ = ["SUPPORTED_MODEL_TYPES", "BlockKwargs", "DecoderAdapter", "ScalingPairs", "check_model_type"]

#: keyword arguments of a block call that must not be replayed (KV caches, output flags)
_DROPPED_KWARGS = ("past_key_value", "past_key_values", "use_cache", "output_attentions")


def _pair_modules(block: nn.Module, names: tuple[str, ...], switch: str) -> list[nn.Module]:
    """The submodules of a scaling pair, or an error naming the missing one and the switch that avoids it."""
    try:
        return [block.get_submodule(name) for name in names]
    except AttributeError as error:
        raise ModelSourceError(
            f"block has no {' -> '.join(names)} pair ({error}): the model does not have its family's declared "
            f"layout (cbq_lightning/models/families.py); set {switch}=false for this model."
        ) from error


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are known."""


def check_model_type(model_type: str) -> None:
    """Refuse architectures no family layout covers, naming the type, the reason and the supported types."""
    family_for(model_type)


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


def kwargs_list_to(per_block: list[dict[str, Any]], device: torch.device | str) -> list[dict[str, Any]]:
    """:func:`kwargs_to` for a list of blocks' kwargs, moving each distinct dict once (blocks called alike share
    one dict, see :class:`BlockKwargs`, and keep sharing its moved copy)."""
    moved: dict[int, dict[str, Any]] = {}
    for kwargs in per_block:
        if id(kwargs) not in moved:
            moved[id(kwargs)] = kwargs_to(kwargs, device)
    return [moved[id(kwargs)] for kwargs in per_block]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``root``'s submodule ``name``; an online rotation of the old module moves to the new one
    (:mod:`cbq_lightning.rotation.online`), so a linear keeps rotating its input through all its lives."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    move_online_rotation(getattr(parent, child), new)
    setattr(parent, child, new)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one decoder block standalone on ``hidden`` ``[B, T, H]``."""
    return block_output(block(hidden, **kwargs))


@torch.no_grad()
def run_blocks_batched(
    blocks: list[nn.Module],
    hidden: torch.Tensor,
    kwargs: dict[str, Any] | list[dict[str, Any]],
    device: torch.device | str,
    batch_size: int,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Push a CPU cache ``[N, T, H]`` through ``blocks`` on ``device`` in batches; result on CPU.

    ``kwargs``: one dict for every block, or a list with each block's (:meth:`BlockKwargs.for_blocks`).

    ``out`` (e.g. a memory-mapped cache, see :mod:`cbq_lightning.cache`) receives the result batch by
    batch instead of a new tensor.
    """
    per_block = kwargs_list_to(kwargs if isinstance(kwargs, list) else [kwargs] * len(blocks), device)
    if len(per_block) != len(blocks):
        raise ValueError(f"{len(blocks)} blocks but kwargs for {len(per_block)}")
    outputs = []
    for start in range(0, hidden.shape[0], batch_size):
        x = hidden[start : start + batch_size].to(device)
        for block, block_kwargs in zip(blocks, per_block, strict=True):
            x = run_block(block, x, block_kwargs)
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
    even when the forward fails. In a mixture-of-experts block every expert sees every token here
    (:func:`~cbq_lightning.models.moe.route_all_tokens`), so none is calibrated on a handful of tokens.
    """

    def hook_for(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            observe(name, args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    handles = [linear.register_forward_pre_hook(hook_for(name)) for name, linear in linears]
    try:
        device = next(block.parameters()).device
        with route_all_tokens(block):
            run_blocks_batched([block], inputs, kwargs, device, batch_size)
    finally:
        for handle in handles:
            handle.remove()


class BlockKwargs:
    """The keyword arguments each block is called with (attention mask, rotary tables, positions), on CPU.

    Why per block: models with local and global attention layers (Gemma 2/3, Qwen2 with sliding windows) give
    each kind of layer its own mask or rotary tables; replaying block 0's for every block would train the
    others on the wrong attention. Blocks called alike share one dict, so a uniform model holds one.
    """

    def __init__(self, per_block: list[dict[str, Any]]) -> None:
        self._distinct: list[dict[str, Any]] = []
        self._which: list[int] = []
        for kwargs in per_block:
            match = next((i for i, known in enumerate(self._distinct) if _same_kwargs(known, kwargs)), None)
            if match is None:
                self._distinct.append(kwargs)
                match = len(self._distinct) - 1
            self._which.append(match)

    def __len__(self) -> int:
        return len(self._which)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._distinct[self._which[index]]

    @property
    def kinds(self) -> int:
        """How many distinct ways the blocks are called (1 for a model whose layers all attend alike)."""
        return len(self._distinct)

    def for_blocks(self, indices: Iterable[int]) -> list[dict[str, Any]]:
        """The kwargs of the given blocks, in order (for :func:`run_blocks_batched`)."""
        return [self[index] for index in indices]

    def to(self, device: torch.device | str) -> BlockKwargs:
        """The same kwargs with every tensor on ``device`` (each distinct dict moved once)."""
        moved = BlockKwargs([])
        moved._distinct = [kwargs_to(kwargs, device) for kwargs in self._distinct]
        moved._which = list(self._which)
        return moved


@dataclass(frozen=True)
class ScalingPairs:
    """The exact per-channel scaling pairs of one model's blocks (CFP's activation part; rotations later).

    Why a separate object: CFP runs on a single block and must not guess the layout from module names; the
    adapter resolves the family once (and the config switches that remove pairs) and hands this over.
    """

    norms: tuple[NormPair, ...]
    linears: tuple[LinearPair, ...]
    norm_offset: float = 0.0
    #: what has no exact pair in this layout, and why (report.json states it)
    not_folded: tuple[str, ...] = ()

    def norm_pairs(self, block: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear]]]:
        """``(norm name, norm, [linears reading its output])`` of a block."""
        pairs = []
        for pair in self.norms:
            norm, *linears = _pair_modules(block, (pair.norm, *pair.linears), "cfp.activations")
            pairs.append((pair.norm, norm, linears))
        return pairs

    def linear_pairs(self, block: nn.Module) -> list[tuple[str, nn.Linear, nn.Linear, int | None]]:
        """``(consumer name, producer, consumer, producer half)`` of a block, for scaling inside the MLP."""
        pairs = []
        for pair in self.linears:
            producer, consumer = _pair_modules(block, (pair.producer, pair.consumer), "extensions.cfp_mlp")
            pairs.append((pair.consumer, producer, consumer, pair.producer_half))
        return pairs

    def describe(self) -> dict[str, Any]:
        """The pairs as report.json lists them."""
        return {
            "norm_pairs": {pair.norm: list(pair.linears) for pair in self.norms},
            "linear_pairs": {pair.consumer: pair.producer for pair in self.linears},
            "not_folded": list(self.not_folded),
        }


#: the LLaMA layout's pairs (the tiny model's): for tests and tools that build a block by hand
LLAMA_PAIRS = ScalingPairs(family_for("llama").norm_pairs, family_for("llama").linear_pairs)


class DecoderAdapter:
    """Access to the transformer blocks of a Hugging Face causal LM, through its family's layout.

    A mixture-of-experts model's fused experts are unfused into per-expert linears here, once, in place
    (:mod:`cbq_lightning.models.moe`): everything downstream then sees them as the linears they are.
    """

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", type(model).__name__)
        self.family: FamilyLayout = family_for(model_type)
        self.model = model
        self.model_type = model_type
        self.blocks: nn.ModuleList = model.get_submodule(self.family.blocks)
        experts = self.family.experts
        #: how many fused expert modules were unfused (0 for a dense model)
        self.unfused_experts = unfuse_experts(self.blocks, experts) if experts is not None else 0
        pairs = norm_pairs(self.family, config)
        not_folded = self.family.not_folded
        if len(pairs) < len(self.family.norm_pairs):
            not_folded += (f"norm -> linear: this {model_type} config normalises after each sub-layer "
                           f"({self.family.pre_norm} is false)",)
        self.scaling_pairs = ScalingPairs(pairs, self.family.linear_pairs, self.family.norm_offset, not_folded)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def describe_experts(self, routed_tokens: dict[int, list[int]]) -> dict[str, Any] | None:
        """report.json's ``moe`` entry (None for a dense model): the full-precision modules and
        ``routed_tokens``, the tokens each finalised block's router sent to each of its experts on the
        calibration inputs (:func:`~cbq_lightning.models.moe.count_routed_tokens`)."""
        if self.family.experts is None:
            return None
        never = {str(block): [e for e, n in enumerate(row) if n == 0] for block, row in sorted(routed_tokens.items())}
        return {
            "experts_per_token": getattr(self.model.config, "num_experts_per_tok", None),
            "full_precision": list(self.family.experts.full_precision),
            "statistics": "every expert sees every calibration token (GPTQ, clip search, CFP); the loss uses the routing",
            "routed_tokens": {str(block): row for block, row in sorted(routed_tokens.items())},
            "experts_never_routed": {block: experts for block, experts in never.items() if experts},
        }

    def output_head(self) -> nn.Module:
        """The final norm, anything between it and the LM head, the LM head and the family's logit transform,
        as one frozen module mapping last-block hidden states to the logits the model returns.

        Why: the last window can then be trained on what perplexity measures (the next-token distribution)
        rather than on a proxy of it. The modules are the model's own (the head may be tied to the
        embedding), so nothing is copied.
        """
        stages = [self.model.get_submodule(self.family.final_norm)]
        for path in self.family.after_norm:
            parent, _, leaf = path.rpartition(".")
            module = getattr(self.model.get_submodule(parent), leaf, None)
            if module is not None:
                stages.append(module)
        stages.append(self.model.get_output_embeddings())
        config = self.model.config
        softcap = getattr(config, self.family.logit_softcap, None) if self.family.logit_softcap else None
        divisor = getattr(config, self.family.logits_divisor, None) if self.family.logits_divisor else None
        if softcap is not None or divisor is not None:
            stages.append(LogitTransform(softcap, divisor))
        return nn.Sequential(*stages)

    @staticmethod
    def block_linears(block: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
        """Every ``nn.Linear`` CBQ quantizes in a block, with its dotted name inside the block (q_proj,
        mlp.up_proj, mlp.experts.3.down_proj...): all of them but MoE routers and shared-expert gates."""
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and not keeps_full_precision(module):
                yield name, module

    @staticmethod
    def replace_linears(block: nn.Module, factory: Callable[[str, nn.Linear], nn.Module]) -> None:
        """Replace each ``nn.Linear`` of ``block`` in place by ``factory(name, linear)``."""
        for name, linear in list(DecoderAdapter.block_linears(block)):
            replace_module(block, name, factory(name, linear))

    @torch.no_grad()
    def capture_block_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, BlockKwargs]:
        """Inputs of block 0 for every calibration sequence, plus the kwargs each block is called with.

        This runs where the model is (CPU for big models: after the first sequence only the embedding and the
        rotary tables are evaluated before the hook stops the forward). Sequences are run one at a time, so
        the captured kwargs have batch dimension 1 and broadcast over any batch of same-length sequences (no
        padding: calibration samples all have the same length). The first sequence runs through every block,
        which is where each block's own kwargs are read (see :class:`BlockKwargs`).
        Returns ``(hidden [N, T, H] on CPU, kwargs on CPU)``.
        """
        device = self.model.get_input_embeddings().weight.device
        hiddens: list[torch.Tensor] = []
        block_kwargs: BlockKwargs | None = None
        for index, row in enumerate(input_ids):
            hidden, per_block = self._run_to_blocks(row.unsqueeze(0).to(device), every_block=index == 0)
            hiddens.append(hidden.to("cpu"))
            if index == 0:
                block_kwargs = BlockKwargs(per_block).to("cpu")  # deduplicated first: one copy per kind
        if block_kwargs is None:
            raise ValueError("no calibration sequence to capture block inputs from")
        return torch.cat(hiddens), block_kwargs

    def _run_to_blocks(self, ids: torch.Tensor, every_block: bool) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Block 0's input for one sequence and the kwargs of block 0 (with ``every_block``: of every block).

        Only block 0's hidden state is kept: the others' would cost a sequence of activations per block."""
        hidden: list[torch.Tensor] = []
        per_block: list[dict[str, Any]] = []
        last = len(self.blocks) - 1 if every_block else 0

        def hook_for(index: int) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                if index == 0:
                    hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
                per_block.append({k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS and k != "hidden_states"})
                if index == last:
                    raise _StopForward

            return hook

        handles = [block.register_forward_pre_hook(hook_for(i), with_kwargs=True)
                   for i, block in enumerate(self.blocks) if i <= last]
        try:
            self.model(input_ids=ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return hidden[0], per_block


def _same_kwargs(reference: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two block calls got the same kwargs (tensors compared exactly)."""

    def same(a: Any, b: Any) -> bool:
        if a is b:  # the usual case: the model hands every block the same tensor objects
            return True
        if torch.is_tensor(a) or torch.is_tensor(b):
            return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
        if isinstance(a, tuple | list) and isinstance(b, tuple | list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return bool(a == b)

    return reference.keys() == other.keys() and all(same(reference[key], other[key]) for key in reference)

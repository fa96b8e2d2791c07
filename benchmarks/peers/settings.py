"""What a peer quantizer is asked to do, and what it hands back.

The peers (GPTQ, AutoRound) are other people's weight-only PTQ methods that the quality benchmark puts next
to CBQ. To be a fair comparison they must quantize to the *same* grid as the scheme CBQ ran at: the
same bits, the same group size (or per channel) and the same symmetry. That mapping lives here, once,
and so does the way a peer says it cannot run (:class:`PeerUnavailable`): the benchmark prints the
reason in the table instead of leaving the row out.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from torch import nn

from cbq_lightning.errors import CBQError
from cbq_lightning.quant.scheme import QuantScheme, parse_scheme

#: the group-size value both peers use for "one scale per output channel"
PER_CHANNEL = -1


class PeerUnavailable(CBQError):
    """A peer cannot run here (package missing or incompatible, scheme it cannot express).

    The message is the reason, written for the benchmark table: short and naming the fix.
    """


@dataclass(frozen=True)
class PeerSettings:
    """The scheme's weight grid in the terms both peers use.

    Attributes:
        bits: weight bit-width.
        group_size: input features per scale / zero-point; ``-1`` = per output channel.
        sym: symmetric weights (zero-point fixed at the middle of the range).
    """

    bits: int
    group_size: int
    sym: bool

    def describe(self) -> str:
        group = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        return f"W{self.bits} {group} {'sym' if self.sym else 'asym'}"


def peer_settings(scheme: QuantScheme | str) -> PeerSettings:
    """The peers' settings for ``scheme`` (a resolved scheme, or a string such as ``W3A16G64``).

    Both peers are weight-only: a scheme that quantizes activations has no peer counterpart, and
    saying so is the row's content (:class:`PeerUnavailable`).
    """
    resolved = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    if resolved.quantizes_activations:
        raise PeerUnavailable(
            f"weight-only peer: {resolved.name} also quantizes activations (A{resolved.a_bits})"
        )
    group = PER_CHANNEL if resolved.group_size is None else resolved.group_size
    return PeerSettings(bits=resolved.w_bits, group_size=group, sym=resolved.sym)


def installed_version(distribution: str) -> str | None:
    """Version of an installed distribution, or None (found from metadata: nothing is imported)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class PeerOutcome:
    """A peer's result: the model with its block linears fake-quantized (dequantized weights in plain
    ``nn.Linear`` modules, so any evaluator runs it), and how it got there.

    Attributes:
        model: the quantized causal LM (the very object handed in, or the peer's copy of it).
        column_groups: per quantized linear (module name), the group index of every input column:
            contiguous groups for most runs, a permutation for GPTQ's activation order. The tests check
            the weights against the grid with it.
        settings: every setting the peer ran with that matters for the result (stated in the table).
        version: the peer package's version.
        quantize_s: wall time of the peer's quantization alone.
    """

    model: nn.Module
    column_groups: dict[str, torch.Tensor]
    settings: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    quantize_s: float = 0.0


def contiguous_groups(in_features: int, group_size: int) -> torch.Tensor:
    """Group index of each input column for contiguous groups (``-1``: one group per row)."""
    if group_size == PER_CHANNEL:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // group_size


def max_levels_per_group(weight: torch.Tensor, groups: torch.Tensor) -> int:
    """The largest number of distinct values any (row, group) of ``weight`` holds.

    A weight on a ``b``-bit grid has at most ``2**b`` per group; a float weight has one per column.
    """
    most = 0
    for group in groups.unique():
        block = weight[:, groups == group]
        most = max(most, max(int(row.unique().numel()) for row in block))
    return most


@contextmanager
def preserved_global_state() -> Iterator[None]:
    """Run a peer without leaving its global side effects behind.

    AutoRound seeds Python's, NumPy's and torch's global generators with its own seed, and peers may
    change torch's thread count; a peer run in-process (tests, notebooks) must not change what runs
    after it.
    """
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state, threads = torch.get_rng_state(), torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        torch.set_num_threads(threads)

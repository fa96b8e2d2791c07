"""Coarse-to-fine preprocessing (CFP, docs/method.md §4): outlier detection, weight truncation, channel scaling.

Outlier detection on a set of values (one set per row of a batch, vectorised):

* **coarse** - quartiles Q1, Q3; the candidates are the values above ``Q3 + lambda1 * (Q3 - Q1)``;
* **fine** - with the values sorted in descending order, each split ``t`` (top ``t`` = outliers, the rest
  retained) among the candidates scores ``M(t) = (min(outliers) - max(retained)) - lambda2 * Var(retained)``;
  the best split wins and the threshold is ``max(retained)``.

Two choices the method leaves open, fixed here (and documented in the README):

* ``M(t)`` adds a distance to a variance, so its verdict would depend on the units of the values; we
  measure values in units of the set's robust standard deviation ``IQR / 1.349`` (unaffected by the
  outliers themselves), which makes the detection scale-free;
* a set has outliers only when the best ``M(t)`` is positive, i.e. the gap is larger than the retained
  spread: a Gaussian set then has none, and a set whose "candidates" merely continue the tail is left alone.

Uses: per output row of a linear on ``|W|`` (values beyond the threshold are truncated; by default only in
the rows where truncating lowers the layer's quantized output error, see :class:`CFPConfig`), and per input
channel on the calibration ``max|x|`` of a norm's output, where outlier channels get
``s_c = (max_c / max_retained) ** alpha`` folded into the norm (divided) and the following linears' input
columns (multiplied): an exact re-parameterisation, nothing is left for run time. Optionally
(``extensions.cfp_mlp``, an extension of the method) the same detection and scaling run on the input of the gated MLP's
down projection, folded into the up projection's output rows instead of a norm: exact as well, and where
LLaMA-family models carry their largest activations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from cbq_lightning.distributed import all_reduce_
from cbq_lightning.errors import ConfigError
from cbq_lightning.models.adapter import LLAMA_PAIRS, DecoderAdapter, ScalingPairs, observe_linear_inputs
from cbq_lightning.quant.input_moments import InputMoments

#: IQR of a standard normal distribution: IQR / this is a robust estimate of the standard deviation
_NORMAL_IQR = 1.349


@dataclass
class CFPConfig:
    """Coarse-to-fine preprocessing settings (the ``cfp:`` section of a recipe).

    Attributes:
        weights: truncate weight outliers per output row of every block linear (changes the function
            slightly; the truncation counts are logged).
        truncation: ``judged`` (default) keeps a row's truncation only where it lowers the layer's output
            error after round-to-nearest quantization on the scheme's grid, ``E||(W - Q(W')) x||^2`` with
            ``W'`` the truncated row, measured on the calibration inputs; ``always`` truncates every
            detected outlier (docs/method.md §4 read literally). Why: the detection looks at ``|W|`` alone, and
            LLaMA-family models have a few large weights that their massive activations depend on ("super
            weights"); truncating those wrecks the model (SmolLM2 W3A16G64: 246.97 perplexity against
            RTN's 71.97), while truncating a large weight on a quiet input channel buys a finer grid for
            the rest of the row, which is what the paper wants from it.
        activations: scale outlier input channels of norm -> linear pairs (exact). Applied only when the
            scheme quantizes activations: for weight-only schemes it would move activation outliers into
            the weights and help nothing.

    The paper's finer settings (the detection's constants, the migration strength, the statistics' sample) are
    :class:`CFPTuning` (``advanced.cfp``).
    """

    weights: bool = True
    truncation: Literal["judged", "always"] = "judged"
    activations: bool = True

    def __post_init__(self) -> None:
        if self.truncation not in ("judged", "always"):
            raise ConfigError(f"cfp.truncation={self.truncation!r} is unknown: use 'judged' or 'always'.")


@dataclass
class CFPTuning:
    """CFP's finer settings at the paper's values (``advanced.cfp``): a recipe rarely changes them.

    Attributes:
        lambda1: coarse IQR multiplier.
        lambda2: weight of the retained-set variance in the fine split score.
        alpha: migration strength of the channel scales, ``s_c = (max_c / max_retained) ** alpha``.
        max_samples: calibration sequences used for the activation statistics.
    """

    lambda1: float = 1.5
    lambda2: float = 1.0
    alpha: float = 0.7
    max_samples: int = 16

    def __post_init__(self) -> None:
        if self.lambda1 < 0 or self.lambda2 < 0:
            raise ConfigError(f"advanced.cfp.lambda1={self.lambda1}, advanced.cfp.lambda2={self.lambda2}: both must "
                              "be >= 0.")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"advanced.cfp.alpha={self.alpha} must lie in (0, 1] (0.7 is the default).")
        if self.max_samples < 1:
            raise ConfigError(f"advanced.cfp.max_samples={self.max_samples} must be >= 1.")


@dataclass(frozen=True)
class OutlierSplit:
    """Result of :func:`find_outliers` for ``R`` sets of values.

    Attributes:
        threshold: ``[R]`` max of the retained values (the set's max when it has no outliers).
        count: ``[R]`` number of outliers (values strictly above ``threshold``, ties aside).
        coarse: ``[R]`` the coarse IQR threshold.
    """

    threshold: torch.Tensor
    count: torch.Tensor
    coarse: torch.Tensor


def _quantile_sorted(ascending: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of rows that are already sorted (``torch.quantile``'s definition,
    without its input-size limit)."""
    n = ascending.shape[-1]
    position = q * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    frac = position - low
    return ascending[..., low] * (1 - frac) + ascending[..., high] * frac


@torch.no_grad()
def find_outliers(values: torch.Tensor, lambda1: float = 1.5, lambda2: float = 1.0) -> OutlierSplit:
    """Coarse-to-fine outlier split of each row of ``values`` ``[R, n]`` (or one set ``[n]``)."""
    rows = values.detach().float().reshape(-1, values.shape[-1])
    n = rows.shape[-1]
    descending = rows.sort(dim=-1, descending=True).values
    ascending = descending.flip(-1)
    q1, q3 = _quantile_sorted(ascending, 0.25), _quantile_sorted(ascending, 0.75)
    iqr = q3 - q1
    coarse = q3 + lambda1 * iqr
    candidates = (rows > coarse.unsqueeze(-1)).sum(dim=-1).clamp(max=n - 1)
    no_outliers = OutlierSplit(descending[:, 0].clone(), torch.zeros_like(candidates), coarse)
    most = int(candidates.max()) if n > 1 else 0
    if most == 0:
        return no_outliers
    unit = (iqr / _NORMAL_IQR).double()
    spread = rows.double().std(dim=-1, unbiased=False)
    unit = torch.where(unit > 0, unit, spread)
    unit = torch.where(unit > 0, unit, torch.ones_like(unit))
    d = descending.double() / unit.unsqueeze(-1)
    head = d[:, : most + 1]
    t = torch.arange(1, most + 1, device=rows.device)
    retained = (n - t).double()
    sum1 = d.sum(-1, keepdim=True) - head.cumsum(-1)[:, :most]  # sum of the values after the top t
    sum2 = d.pow(2).sum(-1, keepdim=True) - head.pow(2).cumsum(-1)[:, :most]
    variance = (sum2 / retained - (sum1 / retained).pow(2)).clamp(min=0.0)
    gap = head[:, :most] - head[:, 1 : most + 1]  # min(outliers) - max(retained)
    score = gap - lambda2 * variance
    score = score.masked_fill(t.unsqueeze(0) > candidates.unsqueeze(-1), float("-inf"))
    best_score, best = score.max(dim=-1)
    accept = best_score > 0
    count = torch.where(accept, best + 1, torch.zeros_like(best))
    threshold = torch.where(accept, descending.gather(-1, (best + 1).unsqueeze(-1)).squeeze(-1), descending[:, 0])
    return OutlierSplit(threshold, count, coarse)


@torch.no_grad()
def truncate_weight_outliers(weight: torch.Tensor, lambda1: float = 1.5, lambda2: float = 1.0) -> OutlierSplit:
    """Clamp each output row of ``weight`` ``[out, in]`` (in place) to +-its ``|W|`` outlier threshold."""
    split = find_outliers(weight.abs(), lambda1, lambda2)
    bound = split.threshold.to(weight.dtype).unsqueeze(-1)
    weight.copy_(torch.maximum(torch.minimum(weight, bound), -bound))
    return split


@torch.no_grad()
def output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per output row, ``E[((W - W_hat) x)^2] = d H d^T`` with ``d`` the row's error and ``H = E[x x^T]``: ``[out]``."""
    error = (weight.double() - approximation.double())
    return ((error @ hessian.double().to(error.device)) * error).sum(dim=-1)


@torch.no_grad()
def judged_truncation(
    weight: torch.Tensor, hessian: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor],
    lambda1: float = 1.5, lambda2: float = 1.0,
) -> tuple[OutlierSplit, torch.Tensor]:
    """Truncate each row's outliers (in place) only where that lowers the row's quantized output error.

    ``quantize`` maps a weight to its round-to-nearest fake-quantized version on the run's grid;
    ``hessian`` is ``E[x x^T]`` of the layer's inputs. Returns the detected split and the ``[out]`` mask of
    rows whose truncation was kept.
    """
    candidate = weight.detach().clone()
    split = truncate_weight_outliers(candidate, lambda1, lambda2)
    detected = split.count > 0
    kept = output_error(weight, quantize(weight), hessian)
    truncated = output_error(weight, quantize(candidate), hessian)
    accept = detected & (truncated < kept)
    weight.copy_(torch.where(accept.unsqueeze(-1), candidate, weight))
    return split, accept


@torch.no_grad()
def channel_scales(channel_max: torch.Tensor, alpha: float, lambda1: float = 1.5, lambda2: float = 1.0) -> tuple[torch.Tensor, OutlierSplit]:
    """Per-channel scales ``[C]``: ``(max_c / max_retained) ** alpha`` on outlier channels, 1 elsewhere."""
    split = find_outliers(channel_max.reshape(1, -1), lambda1, lambda2)
    threshold = split.threshold[0].clamp(min=1e-12)
    values = channel_max.float()
    scales = torch.where(values > threshold, (values / threshold).pow(alpha), torch.ones_like(values))
    return scales, split


@torch.no_grad()
def fold_linear_channel_scales(
    producer: nn.Linear, consumer: nn.Linear, scales: torch.Tensor, producer_half: int | None = None
) -> None:
    """Divide the producer's output rows (and bias) by ``scales`` and multiply the consumer's input columns.

    Exact whenever the consumer's input channel ``c`` is the producer's output ``c`` through something that
    commutes with a positive scale: the gated MLP's ``act(gate(x)) * up(x)``, or OPT's ``relu``. With
    ``producer_half`` the producer is a fused ``[gate; up]`` projection (Phi-3) and only that half of its rows
    (0 or 1) feeds the consumer.
    """
    rows = slice(None)
    if producer_half is not None:
        half = producer.out_features // 2
        rows = slice(producer_half * half, (producer_half + 1) * half)
    producer.weight[rows] /= scales.to(producer.weight).unsqueeze(1)
    if producer.bias is not None:
        producer.bias[rows] /= scales.to(producer.bias)
    consumer.weight.mul_(scales.to(consumer.weight).unsqueeze(0))


@torch.no_grad()
def fold_channel_scales(norm: nn.Module, linears: list[nn.Linear], scales: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide the norm's output channels by ``scales`` and multiply the linears' input columns by them.

    ``linear(norm(x))`` is unchanged: the norm's output channel ``c`` shrinks by ``s_c`` and every weight that
    reads it grows by ``s_c``. A norm computes ``x_hat * (norm_offset + w) + b`` (Gemma's RMSNorm has offset
    1), so its weight becomes ``(norm_offset + w) / s - norm_offset`` and its bias ``b / s``.
    """
    scales = scales.to(norm.weight)
    norm.weight.copy_((norm.weight + norm_offset) / scales - norm_offset)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(scales.to(norm.bias))
    for linear in linears:
        linear.weight.mul_(scales.to(linear.weight).unsqueeze(0))


class CoarseToFinePreprocessor:
    """The CFP cross-block preprocessor: runs on each block entering its first window, before quantization.

    Weight outliers are truncated first, on the original weights: truncating after the channel scaling
    would clip the very columns the scaling enlarged and undo its exactness. The activation statistics
    are the per-channel ``max|x|`` of each norm's output on the block's quantized-path inputs.

    Args:
        config: CFP settings.
        tuning: CFP's finer settings (``advanced.cfp``); None: the paper's.
        mlp: also scale the down projection's input channels (``extensions.cfp_mlp``).
        scale_activations: apply the activation part (the run quantizes activations and ``cfp.activations``).
        batch_size: sequences per forward when gathering statistics.
        pairs: the model family's exact scaling pairs; the LLaMA layout by default (the tiny model's).
    """

    def __init__(
        self,
        config: CFPConfig,
        scale_activations: bool,
        batch_size: int = 8,
        rtn: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
        pairs: ScalingPairs = LLAMA_PAIRS,
        tuning: CFPTuning | None = None,
        mlp: bool = False,
    ) -> None:
        if config.weights and config.truncation == "judged" and rtn is None:
            raise ValueError("judged weight truncation needs the run's round-to-nearest quantizer (rtn)")
        self.config = config
        self.tuning = tuning if tuning is not None else CFPTuning()
        self.mlp = mlp
        self.scale_activations = scale_activations
        self.batch_size = batch_size
        #: ``rtn(block index, linear name, weight)``: the weight fake-quantized to nearest on its grid
        self.rtn = rtn
        #: the model family's exact scaling pairs (``DecoderAdapter.scaling_pairs``)
        self.pairs = pairs
        #: outlier channels found per block and norm (indices), for inspection and tests
        self.outlier_channels: dict[int, dict[str, list[int]]] = {}

    @property
    def active(self) -> bool:
        return self.config.weights or self.scale_activations

    def state_dict(self) -> dict[str, Any]:
        """The outlier channels found so far: a resumed run reports every block's, not only those it preprocessed
        after the resume (the folded scales themselves live in the blocks' saved weights)."""
        return {"outlier_channels": {str(index): found for index, found in self.outlier_channels.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The inverse of :meth:`state_dict` (keys beyond its own are ignored)."""
        self.outlier_channels.update({int(index): found for index, found in state["outlier_channels"].items()})

    @property
    def max_samples(self) -> int:
        """Sequences of the quantized-path inputs the activation statistics read (the rest go unused)."""
        return self.tuning.max_samples

    def __call__(self, index: int, block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, float]:
        stats: dict[str, float] = {}
        if self.config.weights:
            stats.update(self._truncate_weights(index, block, inputs, kwargs))
        if self.scale_activations:
            stats.update(self._scale_activations(index, block, inputs, kwargs))
        return stats

    def _truncate_weights(
        self, index: int, block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]
    ) -> dict[str, float]:
        stats: dict[str, float] = {}
        judged = self.config.truncation == "judged"
        hessians: dict[str, torch.Tensor] = {}
        if judged:
            moments = InputMoments(max_samples=self.max_samples, batch_size=self.batch_size, full=True)
            hessians, _ = moments.measure(block, inputs[: self.max_samples], kwargs)
        for name, linear in DecoderAdapter.block_linears(block):
            weight = linear.weight.detach()
            before = float(weight.abs().max())
            if judged:
                assert self.rtn is not None
                split, accept = judged_truncation(
                    weight, hessians[name], lambda w, name=name: self.rtn(index, name, w),
                    self.tuning.lambda1, self.tuning.lambda2,
                )
                stats[f"cfp/weight_rows_refused/{name}"] = float(((split.count > 0) & ~accept).sum())
                stats[f"cfp/weight_rows_truncated/{name}"] = float(accept.sum())
                truncated = split.count * accept
            else:
                split = truncate_weight_outliers(weight, self.tuning.lambda1, self.tuning.lambda2)
                truncated = split.count
            stats[f"cfp/weight_truncated/{name}"] = float(truncated.sum())
            stats[f"cfp/weight_threshold/{name}"] = float(split.threshold.mean())
            stats[f"cfp/weight_max_before/{name}"] = before
            stats[f"cfp/weight_max_after/{name}"] = float(weight.abs().max())
        return stats

    @torch.no_grad()
    def _scale_activations(
        self, index: int, block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]
    ) -> dict[str, float]:
        pairs = self.pairs.norm_pairs(block)
        mlp_pairs = self.pairs.linear_pairs(block) if self.mlp else []
        maxima: dict[str, torch.Tensor] = {}

        def record(name: str, x: torch.Tensor) -> None:
            x = x.abs().amax(dim=0).float().cpu()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x

        # the first linear of a pair sees exactly the norm's output; the down projection's input does not
        # change when the norm pairs are folded (those foldings are exact), so one pass observes everything
        observed = [(norm_name, linears[0]) for norm_name, _, linears in pairs]
        observed += [(name, consumer) for name, _, consumer, _ in mlp_pairs]
        observe_linear_inputs(block, observed, inputs[: self.max_samples], kwargs, self.batch_size, record)
        stats: dict[str, float] = {}
        found: dict[str, list[int]] = {}

        def scales_for(name: str) -> torch.Tensor:
            channel_max = all_reduce_(maxima[name], "max")  # DDP: every rank folds the same scales
            scales, split = channel_scales(channel_max, self.tuning.alpha, self.tuning.lambda1, self.tuning.lambda2)
            found[name] = torch.nonzero(scales > 1.0).flatten().tolist()
            stats[f"cfp/act_outlier_channels/{name}"] = float(len(found[name]))
            stats[f"cfp/act_threshold/{name}"] = float(split.threshold[0])
            stats[f"cfp/act_max_before/{name}"] = float(channel_max.max())
            stats[f"cfp/act_max_after/{name}"] = float((channel_max / scales).max())
            return scales

        for norm_name, norm, linears in pairs:
            fold_channel_scales(norm, linears, scales_for(norm_name).to(norm.weight.device), self.pairs.norm_offset)
        for name, producer, consumer, half in mlp_pairs:
            fold_linear_channel_scales(producer, consumer, scales_for(name).to(consumer.weight.device), half)
        self.outlier_channels[index] = found
        return stats

"""Perplexity the way the GPTQ, OmniQuant and CBQ papers report it.

Rows are joined (``"\\n\\n"`` for WikiText-2), tokenized once, cut into non-overlapping windows of
``seqlen`` tokens (the tail shorter than a window is dropped), and PPL = exp of the mean over windows
of the per-window mean next-token cross-entropy. All windows have the same length, so that equals
exp(total NLL / total predicted tokens), which is what :class:`WindowPerplexity` accumulates — in
float64 and as a torchmetrics ``Metric`` (``sync_on_compute=True`` sums shards evaluated on several
processes; off by default, since a run evaluates on one process).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from tqdm.auto import tqdm

from cbq_lightning.data.text import check_source, eval_split, load_text, tokenize_text
from cbq_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Perplexity evaluation of a run (off when ``datasets`` is empty).

    Attributes:
        datasets: sources to evaluate on: dataset names (``wikitext2``, ``c4``, ``ptb``) or local
            ``.jsonl``/``.txt`` files (each dataset's standard split; another one: ``advanced.eval.split``).
        seqlen: tokens per window (2048 in the papers).
        max_windows: evaluate only the first N windows (a quick, still comparable, prefix); null = all.
        fp_reference: also evaluate the unquantized model on the very same tokens (``ppl_fp``); measured once per
            model and tokens and reused by later runs (:mod:`cbq_lightning.evaluation.fp_cache`).

    How the windows are read and batched: :class:`EvalTuning` (``advanced.eval``).
    """

    datasets: list[str] = field(default_factory=list)
    seqlen: int = 2048
    max_windows: int | None = None
    fp_reference: bool = True

    def __post_init__(self) -> None:
        """Reject impossible settings before any model is loaded (raised when the configuration is built)."""
        if self.seqlen < 2:
            raise ConfigError(f"eval.seqlen={self.seqlen} must be >= 2 (one token predicts the next).")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"eval.max_windows={self.max_windows} must be >= 1, or null for the whole split.")
        for source in self.datasets:
            check_source(source)


@dataclass
class EvalTuning:
    """The evaluation's finer settings (``advanced.eval``): which split, how many windows per forward.

    Attributes:
        split: split of the named datasets; null means each dataset's standard one (WikiText-2 and PTB ``test``,
            C4 ``validation``), the split every published figure uses.
        batch_size: windows per forward pass (more: faster on a GPU, the same perplexity).
    """

    split: str | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"advanced.eval.batch_size={self.batch_size} must be >= 1.")


@dataclass
class EvalSet:
    """The token windows of one dataset split, prepared once and reused for every model compared."""

    dataset: str
    split: str
    windows: torch.Tensor  # [num_windows, seqlen] int64
    total_tokens: int  # tokens of the whole split, before cutting into windows

    def describe(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "seqlen": int(self.windows.shape[1]),
            "windows": int(self.windows.shape[0]),
            "tokens": int(self.windows.numel()),
        }


def cut_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """``[W, seqlen]`` non-overlapping windows from the start of ``tokens``; a short tail is dropped."""
    available = tokens.numel() // seqlen
    if available == 0:
        raise DataError(
            f"the evaluation text has {tokens.numel():,} tokens, fewer than one window of {seqlen}: "
            "lower eval.seqlen or evaluate on a longer text."
        )
    count = available if max_windows is None else min(available, max_windows)
    return tokens[: count * seqlen].reshape(count, seqlen)


def prepare_eval_set(
    source: str, tokenizer, seqlen: int, split: str | None = None, max_windows: int | None = None,
    data_dir: str | None = None,
) -> EvalSet:
    """Load, join, tokenize once and cut one dataset split."""
    resolved_split = eval_split(source, split)
    tokens = tokenize_text(tokenizer, load_text(source, resolved_split, data_dir=data_dir))
    return EvalSet(source, resolved_split, cut_windows(tokens, seqlen, max_windows), int(tokens.numel()))


class WindowPerplexity(Metric):
    """exp(sum of next-token NLL / number of predicted tokens), accumulated in float64."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, sync_on_compute: bool = False) -> None:
        # no cross-process sync by default: a run evaluates the whole set on one process (rank 0 under DDP,
        # after the other ranks have finished), and a sync would wait at a barrier for ranks that are gone
        super().__init__(sync_on_compute=sync_on_compute)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, input_ids: torch.Tensor) -> None:  # type: ignore[override]
        """``logits [B, T, V]`` of a forward pass on ``input_ids [B, T]``: token t predicts token t+1."""
        predicted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        targets = input_ids[:, 1:].reshape(-1).to(predicted.device)
        nll = F.cross_entropy(predicted, targets, reduction="sum")
        self.nll_sum += nll.double().to(self.nll_sum.device)
        self.count += targets.numel()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.count)


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 1,
    desc: str = "perplexity", progress_bar: bool = True,
) -> float:
    """PPL of ``model`` on ``windows`` (``[W, T]``), one forward per batch of windows, no KV cache; a progress bar
    unless ``progress_bar`` is false (a run's ``advanced.trainer.enable_progress_bar``)."""
    was_training = model.training
    model.eval()
    metric = WindowPerplexity()
    with tqdm(total=windows.shape[0], desc=desc, unit="window", leave=False, disable=not progress_bar) as progress:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            metric.update(logits, batch)
            progress.update(batch.shape[0])
            progress.set_postfix(ppl=f"{float(metric.compute()):.3f}")
    model.train(was_training)
    value = float(metric.compute())
    if not math.isfinite(value):
        log.warning("%s: perplexity is %s: the model produced non-finite logits", desc, value)
    return value


def evaluate_sets(
    model: nn.Module, sets: list[EvalSet], device: torch.device | str, batch_size: int = 1, label: str = "model",
    progress_bar: bool = True,
) -> list[dict]:
    """``[{dataset, split, seqlen, windows, tokens, ppl, eval_s}]``, one entry per set."""
    results = []
    for eval_set in sets:
        started = time.perf_counter()
        value = perplexity(model, eval_set.windows, device, batch_size, desc=f"{label} {eval_set.dataset}",
                           progress_bar=progress_bar)
        results.append({**eval_set.describe(), "ppl": value, "eval_s": time.perf_counter() - started})
    return results

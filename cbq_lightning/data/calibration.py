"""Calibration samples: N disjoint random segments of T tokens from a corpus, drawn by seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbq_lightning.data.text import NAMED_DATASETS, SHIPPED_SOURCE, check_source, load_text, tokenize_text
from cbq_lightning.errors import ConfigError, DataError


@dataclass
class CalibrationConfig:
    """Calibration data.

    Attributes:
        source: a dataset name (``wikitext2``, ``wikitext2-tokenized``, ``c4``, ``ptb``), a local
            ``.jsonl``/``.txt`` file, or ``shipped`` (the built-in WikiText-2 excerpt).
        split: split of a named dataset. Calibrate on text you do not evaluate on (never ``test``).
        num_samples: number of calibration sequences N.
        seqlen: tokens per sequence T.
    """

    source: str = SHIPPED_SOURCE
    split: str = "validation"
    num_samples: int = 128
    seqlen: int = 2048

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.seqlen < 2:
            raise DataError(
                f"data.num_samples={self.num_samples} and data.seqlen={self.seqlen} must be >= 1 and >= 2."
            )
        check_source(self.source)
        if self.source in NAMED_DATASETS and self.split == "test":
            raise ConfigError(
                "data.split=test would calibrate on the evaluation text: calibrate on 'validation' or 'train'."
            )


def sample_segments(tokens: torch.Tensor, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[num_samples, seqlen]`` disjoint segments of ``tokens`` (1-D), chosen at random by ``seed``.

    The corpus is cut into non-overlapping chunks starting at a random offset, and N distinct chunks are
    drawn, so no token is seen twice and the result depends only on the corpus and the seed.
    """
    available = tokens.numel() // seqlen
    if available < num_samples:
        raise DataError(
            f"the calibration text has {tokens.numel():,} tokens, too few for {num_samples} disjoint samples "
            f"of {seqlen} tokens ({num_samples * seqlen:,} needed): lower data.num_samples or data.seqlen, "
            "or give a longer corpus."
        )
    generator = torch.Generator().manual_seed(seed)
    slack = tokens.numel() - available * seqlen
    offset = int(torch.randint(0, slack + 1, (1,), generator=generator))
    chunks = tokens[offset : offset + available * seqlen].reshape(available, seqlen)
    chosen = torch.randperm(available, generator=generator)[:num_samples]
    return chunks[chosen].clone()


@dataclass
class DataTuning:
    """How calibration text is read (``advanced.data``).

    Attributes:
        text_field: JSON key of the text in ``.jsonl`` files (``text`` in every shipped and mirrored set).
    """

    text_field: str = "text"


def calibration_ids(config: CalibrationConfig, tokenizer, seed: int, data_dir: str | None = None,
                    text_field: str = DataTuning.text_field) -> torch.Tensor:
    """Read the calibration corpus and draw the samples: ``[N, T]`` int64."""
    return samples_of_text(load_text(config.source, config.split, text_field, data_dir), tokenizer, config, seed)


def samples_of_text(text: str, tokenizer, config: CalibrationConfig, seed: int) -> torch.Tensor:
    """Tokenize a whole corpus once and draw ``config``'s samples from it (also the Python API's text calibration)."""
    return sample_segments(tokenize_text(tokenizer, text), config.num_samples, config.seqlen, seed)

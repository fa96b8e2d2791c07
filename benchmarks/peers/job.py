"""One peer run as the quality benchmark needs it: the recipe's model, calibration rows and evaluation
windows, the peer's quantization, our perplexity.

Everything that makes the comparison fair is taken from the recipe exactly as ``cbq quantize`` takes
it: the model through :func:`~cbq_lightning.models.loading.load_model` (so the SmolLM2 GGUF is dequantized
the same way), the calibration rows from :func:`~cbq_lightning.data.calibration.calibration_ids` with the
recipe's ``data`` settings and seed (the same N x T tokens CBQ trains on), and the evaluation windows of
its ``eval`` section, scored by :func:`~cbq_lightning.evaluation.perplexity.evaluate_sets`.

A peer that cannot run gives a record with ``status`` ``unavailable`` (package missing, scheme it cannot
express) or ``failed`` (it raised) and the ``reason``, never nothing: the benchmark table prints it.

    python -m benchmarks.peers --peer gptq --config configs/smollm2_w3a16g64.yaml --output gptq.json
    python -m benchmarks.peers --peer autoround-light --config configs/tiny.yaml --output ar.json \\
        --data.num_samples 8          # any further flag is a recipe override, as for `cbq quantize`
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.peers import autoround, gptq
from benchmarks.peers.settings import PeerSettings, PeerUnavailable, installed_version, peer_settings
from cbq_lightning.config import QuantizeConfig
from cbq_lightning.data.calibration import calibration_ids
from cbq_lightning.distributed import Placement, compute_device
from cbq_lightning.evaluation.perplexity import evaluate_sets, prepare_eval_set
from cbq_lightning.io import atomic_write_json
from cbq_lightning.models.loading import load_model, load_tokenizer

log = logging.getLogger("benchmarks.peers")



@dataclass(frozen=True)
class Peer:
    """A peer as the benchmark names it: the package adapter and the options that make this variant.

    Why variants and not one row per package: a peer at its light or default settings is a different
    competitor from the same peer at its best options, and the table must say which one it beat."""

    name: str
    label: str
    module: ModuleType
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def distribution(self) -> str:
        return self.module.DISTRIBUTION

    def unavailable_reason(self, settings: PeerSettings) -> str | None:
        return self.module.unavailable_reason(settings)


#: the peers by the name ``--peers`` takes
PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    Peer("gptq", "GPTQ", gptq),
    Peer("gptq-tuned", "GPTQ (act-order, MSE grid)", gptq, {"tuned": True}),
    Peer("autoround", "AutoRound (200 iters)", autoround, {"iters": autoround.DEFAULT_ITERS}),
    Peer("autoround-light", "AutoRound (50 iters)", autoround, {"iters": autoround.LIGHT_ITERS}),
)}
#: longest reason kept in a record (exception messages can be pages long)
MAX_REASON = 300


def parse_peers(text: str | Sequence[str] | None) -> list[str]:
    """``"gptq,autoround"`` (or a list) as known peer names, in order, without repeats."""
    if not text:
        return []
    items = text.split(",") if isinstance(text, str) else [part for item in text for part in item.split(",")]
    names: list[str] = []
    for item in (part.strip().lower() for part in items):
        if not item:
            continue
        if item not in PEERS:
            raise SystemExit(f"unknown peer {item!r}: choose from {', '.join(PEERS)}")
        if item not in names:
            names.append(item)
    return names


def _peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**3 if sys.platform == "darwin" else 1024**2)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def check_peer(name: str, config: QuantizeConfig) -> PeerSettings:
    """The peer's settings for the recipe's scheme; raises :class:`PeerUnavailable` with the reason."""
    settings = peer_settings(config.quant.resolve())
    reason = PEERS[name].unavailable_reason(settings)
    if reason is not None:
        raise PeerUnavailable(reason)
    return settings


def run_peer(name: str, config: QuantizeConfig, iters: int | None = None) -> dict[str, Any]:
    """Quantize the recipe's model with peer ``name`` on the recipe's calibration rows and evaluate it.

    Returns the record ``{peer, label, package, version, status, reason, settings, results, quantize_s,
    eval_s, wall_s, peak_rss_gib, device}``; ``results`` is :func:`evaluate_sets`'s list (one entry per
    ``eval.datasets`` source) and is empty unless ``status`` is ``ok``. ``iters`` applies to AutoRound.
    """
    started = time.perf_counter()
    peer = PEERS[name]
    device = compute_device(config.trainer.accelerator, Placement())  # where `cbq quantize` would run it
    record: dict[str, Any] = {
        "peer": name, "label": peer.label, "package": peer.distribution,
        "version": installed_version(peer.distribution), "status": "ok", "reason": None, "settings": None,
        "results": [], "quantize_s": None, "eval_s": None, "device": str(device),
    }
    try:
        settings = check_peer(name, config)
        tokenizer = load_tokenizer(config.model, hub=config.advanced.model)
        ids = calibration_ids(config.data, tokenizer, config.seed, config.data_dir, config.advanced.data.text_field)
        evaluation = config.eval
        sets = [
            prepare_eval_set(source, tokenizer, evaluation.seqlen, config.advanced.eval.split, evaluation.max_windows,
                             config.data_dir)
            for source in evaluation.datasets
        ]
        model = load_model(config.model, vocab_size=len(tokenizer), seed=config.seed, hub=config.advanced.model)
        try:
            if peer.module is autoround:
                options = {**peer.options, **({} if iters is None else {"iters": iters}), "seed": config.seed}
            else:
                options = dict(peer.options)
            outcome = peer.module.quantize(model, tokenizer, ids, settings, device=str(device), **options)
        except ImportError as error:  # installed, but it does not import against this torch/transformers
            raise PeerUnavailable(f"{peer.distribution} does not import here: {_short(error)}") from error
        del model
        record.update(settings=outcome.settings, version=outcome.version, quantize_s=outcome.quantize_s)
        eval_started = time.perf_counter()
        outcome.model.to(device)
        record["results"] = evaluate_sets(outcome.model, sets, device, config.advanced.eval.batch_size, label=name)
        record["eval_s"] = time.perf_counter() - eval_started
    except PeerUnavailable as error:
        record.update(status="unavailable", reason=str(error))
        log.warning("%s not run: %s", peer.label, error)
    except Exception as error:  # a peer's crash is a result of the benchmark, not the end of it
        record.update(status="failed", reason=_short(error), traceback=traceback.format_exc())
        log.error("%s failed: %s", peer.label, record["reason"])
    record["wall_s"] = time.perf_counter() - started
    record["peak_rss_gib"] = _peak_rss_gib()
    return record


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> QuantizeConfig:
    """The recipe parsed exactly as ``cbq quantize --config PATH OVERRIDES...`` parses it."""
    from cbq_lightning.cli import parse_quantize_config

    return parse_quantize_config(["--config", str(path), *overrides])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", allow_abbrev=False,
        description="Quantize a recipe's model with a peer method (GPTQ, AutoRound) on the recipe's "
        "calibration rows and evaluate it with cbq-lightning's perplexity; further flags override the recipe.",
    )
    parser.add_argument("--peer", required=True, choices=sorted(PEERS))
    parser.add_argument("--config", required=True, help="the recipe (a cbq quantize YAML)")
    parser.add_argument("--output", required=True, type=Path, help="where the JSON record goes")
    parser.add_argument("--iters", type=int, default=None,
                        help="AutoRound iterations per block, replacing the variant's (autoround: 200, "
                        "AutoRound's default; autoround-light: 50)")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_recipe(args.config, overrides)
    record = run_peer(args.peer, config, iters=args.iters)
    record["recipe"] = str(args.config)
    record["overrides"] = list(overrides)
    atomic_write_json(args.output, record)
    result = ", ".join(f"{r['dataset']} ppl {r['ppl']:.4f}" for r in record["results"])
    print(f"{record['label']}: {record['status']}" + (f" ({record['reason']})" if record["reason"] else "")
          + (f": {result}" if result else ""))
    return 0

"""``report.json``: what a run did, on what, with which result, and where its code and machine came from.

Why a module of its own: the report is the run's account for people and for the benchmarks that read it; the
runner's stages produce its parts, this module is the one place that says what the file holds.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cbq_lightning.provenance import device_name, peak_rss_gib, versions
from cbq_lightning.quant.convert import finalized_linears
from cbq_lightning.quant.correction import CorrectionConfig

if TYPE_CHECKING:  # the runner's own records of a job; the runner imports this module
    from cbq_lightning.runner import _Built, _Job


def eval_entries(quantized: list[dict[str, Any]], fp: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Report entries ``{dataset, split, seqlen, windows, tokens, ppl, ppl_fp, ...}``."""
    entries = []
    for index, result in enumerate(quantized):
        entry = {key: value for key, value in result.items() if key != "eval_s"}
        entry["ppl_fp"] = fp[index]["ppl"] if fp else None
        # the reference came from an earlier run's measurement of the same model and tokens (evaluation/fp_cache.py)
        entry["ppl_fp_cached"] = bool(fp[index].get("cached")) if fp else False
        entry["eval_s"] = result["eval_s"] + (fp[index]["eval_s"] if fp else 0.0)
        entries.append(entry)
    return entries


def correction_summary(model: nn.Module, correction: CorrectionConfig | None) -> dict[str, Any] | None:
    """What the low-rank corrections add: their ranks and full-precision parameters, against the quantized
    linears' own weight count (the corrections are not folded into the integer weights)."""
    if correction is None:
        return None
    layers = [layer for _, layer in finalized_linears(model)]
    added = sum(layer.correction_parameter_count() for layer in layers)
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    ranks = sorted({layer.correction.rank for layer in layers if layer.correction is not None})
    return {
        "rank": correction.rank or None,
        "rank_fraction": correction.rank_fraction or None,
        "ranks": ranks,
        "init": correction.init,
        "parameters": added,
        "parameters_per_quantized_weight": added / weights if weights else 0.0,
    }


def run_report(
    job: _Job, built: _Built, windows: list[dict[str, Any]], scheme_info: dict[str, Any],
    correction_info: dict[str, Any] | None, eval_entries: list[dict[str, Any]], shards: list[Any],
    device: torch.device, started: float, calibrated_s: float,
) -> dict[str, Any]:
    """``report.json``: what ran, on what, what each window did, the errors and the perplexities."""
    config, state, cfp, resume = job.config, built.state, built.cfp, job.resume
    final = state.block_errors[-1]
    return {
        "method": config.method,
        "scheme": scheme_info,
        "window": {"size": config.window.size, "overlap": config.window.overlap} if job.cbq else {"size": 1, "overlap": 0},
        "model": _model_section(job, state.routed_tokens),
        "calibration": {
            "source": "supplied by the caller" if job.supplied_ids else config.data.source,
            "num_samples": int(job.all_ids.shape[0]),
            "seqlen": int(job.all_ids.shape[1]),
            "tokens": int(job.all_ids.numel()),
        },
        "distributed": {"world_size": job.place.world, "shards": shards},
        "windows": windows,
        "block_errors": [dataclasses.asdict(e) for e in state.block_errors],
        "cfp": {
            "weights": config.cfp.weights,
            "activations": cfp.scale_activations,
            "outlier_channels": {str(index): found for index, found in sorted(cfp.outlier_channels.items())},
        },
        "preprocess": {str(index): stats for index, stats in sorted(state.preprocess_stats.items())},
        # the rotations folded into the model before calibration (None: none)
        "rotation": job.rotation,
        # what the recipe asked for that this model could not take, and what ran instead ({}: nothing)
        "adapted_to_model": job.adapted,
        # the low-rank correction's cost, which the integer weights do not show (None without one)
        "correction": correction_info,
        # per-layer bits (extensions.mixed.budget / extensions.layer_bits), their average and the sensitivities (None: uniform)
        "mixed_precision": built.mixed_summary,
        # a llama.cpp mix: the GGML type each weight is stored in and the fallbacks (None: not a mix)
        "gguf_types": None if job.gguf_plan is None else job.gguf_plan.summary(),
        # the end-to-end phase after the windows (an extension; None: none): steps, output KL before/after, kept
        "end_to_end": built.end_to_end,
        "final_error": {config.method: final.quantized, **({"rtn": final.rtn} if final.rtn is not None else {})},
        "eval": eval_entries,
        "resumed_after_window": None if resume is None else resume.last_window,
        # the windows this invocation trained (all of them, unless it resumed a killed run)
        "recomputed_windows": [w["index"] for w in windows if resume is None or w["index"] > resume.last_window],
        "guard": _guard_section(windows),
        "calibration_time_s": calibrated_s,
        "wall_time_s": time.perf_counter() - started,
        "peak_rss_gib": peak_rss_gib(),
        "versions": versions(),
        "device": device_name(device),
        "seed": config.seed,
    }


def _model_section(job: _Job, routed_tokens: Any) -> dict[str, Any]:
    """The model that was quantized: where it came from, its family's facts that shaped the run."""
    return {
        "name_or_path": job.config.model.name_or_path,
        # handed over by the Python API (cbq_lightning.quantize) rather than loaded from name_or_path
        "in_memory": job.in_memory,
        "model_type": job.adapter.model_type,
        "num_blocks": job.adapter.num_blocks,
        # where CFP's channel scaling can fold exactly in this family, and what it cannot
        "scaling_pairs": job.adapter.scaling_pairs.describe(),
        # mixture of experts: tokens routed to each expert in calibration, what stays full precision
        "moe": job.adapter.describe_experts(routed_tokens),
    }


def _guard_section(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """The divergence guard's interventions: windows retried at lower learning rates, windows left at RTN."""
    return {
        "retried_windows": [w["index"] for w in windows if w.get("attempts", 1) > 1],
        "rtn_fallback_windows": [w["index"] for w in windows if w.get("fallback") == "rtn"],
    }

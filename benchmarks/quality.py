"""Quality benchmark (BENCHMARK.md): FP, RTN and CBQ perplexity per scheme, in one invocation.

For each scheme the recipe ``configs/smollm2_<scheme>.yaml`` is run as ``--method rtn`` (plain
round-to-nearest: CFP off) and ``--method cbq``, with the same seed, hence the same calibration samples
and the same evaluation windows; schemes that quantize activations also get a CBQ run without CFP (the
ablation of BENCHMARK.md). The full-precision model is evaluated once on those windows. Every run is its own ``cbq``
process, so its wall time and peak RSS are its own. Results go to ``benchmarks/results/`` as one JSON
per scheme plus ``quality.md`` (the markdown table, also printed) and ``quality.png`` (perplexity vs
weight bits, per-block error of RTN vs CBQ: ``quality_plot.py``; needs matplotlib, skipped with a message
without it).

Peers (``--peers gptq,gptq-tuned,autoround,autoround-light``): GPTQ at GPTQModel's defaults and at its best
options (act-order, MSE grid), AutoRound at its default 200 iterations and its light 50, quantize the same
model on the same calibration rows
(the recipe's ``data`` settings and seed) and are scored by our evaluator on the same windows, each in its
own process (``python -m benchmarks.peers``, see ``benchmarks/peers``); a peer that cannot run gets
its reason in the table. They need ``pip install -e ".[peers]"``.

    python benchmarks/quality.py                      # every scheme below (cpu-quick protocol)
    python benchmarks/quality.py --schemes W3A16G64 --set train.epochs=2   # quick look, overrides
    python benchmarks/quality.py --schemes W4A16 W3A16G64 W2A16G64 --peers gptq,autoround-light
    python benchmarks/quality.py --schemes W3A16G64 --peers gptq-tuned,autoround --peers-only   # add peers to a record
    python benchmarks/quality.py --redraw             # rewrite quality.md and quality.png from the records, run nothing

A peer run elsewhere (a lent GPU turns AutoRound's 200 iterations from an hour into three minutes) is added with
``--peer-records``: the JSON that ``python -m benchmarks.peers ... --output FILE`` wrote, checked to have
calibrated like the scheme's record (same recipe and overrides; only where it ran may differ):

    python benchmarks/quality.py --peer-records ar200_w4a16.json ar200_w2a16g64.json

A ``cbq quantize`` output made elsewhere (another machine, or further seeds of the recipe) is added with
``--cbq-runs RUN_DIR ...``: its ``config.yaml`` must resolve to the scheme's recipe with the record's overrides
(or to that with CFP off, for the ``CBQ w/o CFP`` cell); only where it ran and its seed may differ. The recipe's
seed fills the ``CBQ (shipped recipe)`` cell, every seed joins the seed spread shown beside it:

    python benchmarks/quality.py --cbq-runs runs/w2-seed1 runs/w2-seed2

Ablations (``--ablation NAME KEY=VALUE ...``, repeatable): extra CBQ runs of the scheme's recipe with those
overrides on top (same samples and windows), each a row of the ablation table under the main one, e.g. the
extensions of docs/method.md. ``--ablations-only`` adds them to the scheme's existing record instead of rerunning FP,
RTN and CBQ:

    python benchmarks/quality.py --schemes W4A4 --ablations-only --ablation lowrank10 extensions.correction.rank_fraction=0.1
    python benchmarks/quality.py --schemes W2A16G64 --ablations-only --ablation mixed2.5 extensions.mixed.budget=2.5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# run as a script, Python puts benchmarks/ on the path, not the repository root that `benchmarks.peers` lives under
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SCHEMES = ("W4A16", "W3A16G64", "W2A16G64", "W4A8", "W4A4")
#: flags that switch coarse-to-fine preprocessing off (the RTN baseline and the CFP ablation)
CFP_OFF = ["--cfp.weights", "false", "--cfp.activations", "false"]
#: the RTN baseline is plain round-to-nearest even when the recipe starts CBQ from GPTQ
#: (``method: rtn`` with a ``extensions.gptq`` section would be GPTQ), rotates the model first or trains it end to end
#: after the windows (which ``method: rtn`` refuses)
PLAIN_RTN = ["--extensions.gptq", "null", "--extensions.rotation", "null", "--extensions.end_to_end", "null"]
#: ``CBQ (paper settings)``: the paper's method (docs/method.md §1-4) as ``configs/paper/<scheme>.yaml`` states it, on
#: top of a scheme's demo recipe, which keeps only its budget (samples, epochs, batch size) and its scheme: RTN start
#: on the unclipped grid, LoRA-Rounding ``V0 + A1 A2`` (rank 4) trained through soft decisions and hardened at the
#: end, windows K=2 / O=1, MSE + hidden-state KL on both branches, learnable weight (and activation) clipping, CFP,
#: AdamW at the paper's learning rates. One deviation, named wherever the row is shown: CFP's weight truncation is
#: *judged* (``cfp.truncation: judged``, kept only where it lowers the layer's quantized output error); read
#: literally (``always``) it cuts the weights SmolLM2's massive activations depend on. These are the method keys
#: the row takes from the paper recipe (the rest of the paper recipe is its GPU budget).
PAPER_KEYS = (
    "extensions.gptq", "extensions.clip_search", "advanced.quant.clip_init", "quant.learnable_clip",
    "advanced.quant.act_learnable", "rounding.enabled", "rounding.form", "rounding.rank", "extensions.rounding_forward",
    "advanced.rounding.reg_weight",
    "extensions.column_scale", "window.size", "window.overlap", "cfp.weights", "cfp.truncation", "cfp.activations",
    "loss.global_branch", "loss.homologous_branch", "loss.kl_weight", "extensions.output_kl_weight",
    "extensions.keep_best", "train.lr_rounding", "train.lr_clip",
    # the paper rotates nothing (an extension, docs/rotation.md) and has no end-to-end phase (docs/method.md §3)
    "extensions.rotation", "extensions.end_to_end",
)
PAPER_RECIPES = ROOT / "configs" / "paper"


def _setting(config: object, key: str) -> object:
    for part in key.split("."):  # "section.name", or a whole optional section ("rotation")
        config = getattr(config, part)
    return config


def paper_settings(scheme: str = "W3A16G64") -> dict[str, str]:
    """``{key: value}`` of :data:`PAPER_KEYS` in the paper recipe of ``scheme`` (``configs/paper/``), as flags
    write them: the paper row runs what that recipe states, not a second copy of it."""
    from benchmarks.peers.job import load_recipe

    path = PAPER_RECIPES / f"{scheme.lower()}.yaml"
    if not path.is_file():
        raise SystemExit(f"no paper recipe {path.relative_to(ROOT)} for scheme {scheme}: write one or drop the scheme.")
    config = load_recipe(path)
    return {key: _shown(_setting(config, key)) for key in PAPER_KEYS}


def paper_flags(scheme: str) -> list[str]:
    """The overrides that turn a scheme's demo recipe into ``CBQ (paper settings)`` on the same budget."""
    return [flag for key, value in paper_settings(scheme).items() for flag in (f"--{key}", value)]


def _run(command: list[str]) -> float:
    """Run a ``cbq`` command (output streamed), fail loudly; returns its wall time in seconds."""
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def _git_commit() -> str:
    from cbq_lightning.provenance import source_commit

    # results written by earlier schemes of the same invocation do not make the code dirty
    return source_commit((".", ":!benchmarks/results")) or "unknown"


def recipe_deviations(recipe: Path) -> dict[str, tuple[str, str]]:
    """Where a recipe departs from :func:`paper_settings`: ``{key: (paper value, recipe value)}``.

    Read from the recipe itself, so the list shown next to a ``CBQ (shipped recipe)`` figure cannot drift
    from what ran. A key the recipe leaves out takes the code's default (read from the config classes).
    """
    from benchmarks.peers.job import load_recipe

    config = load_recipe(recipe)
    deviations = {}
    for key, paper in paper_settings().items():  # the same method keys for every scheme (tests/test_quality_benchmark.py)
        shown = _shown(_setting(config, key))
        if _normalise(shown) != _normalise(paper):
            deviations[key] = (paper, shown)
    return deviations


def _shown(value: object) -> str:
    """A setting as YAML would write it: ``true``, ``null``, or an extension section as ``{key: value}`` listing
    the keys that differ from the section's defaults (``{}``: on at its defaults)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if dataclasses.is_dataclass(value):
        try:
            default = type(value)()
        except Exception:  # a section without defaults for every key (e.g. extensions.mixed.budget): show all of it
            default = None
        changed = [f"{f.name}: {_shown(getattr(value, f.name))}" for f in dataclasses.fields(value)
                   if default is None or getattr(value, f.name) != getattr(default, f.name)]
        return "{" + ", ".join(changed) + "}"
    return str(value)


def _normalise(value: str) -> str:
    """``1.0`` and ``1``, ``0.0`` and ``0`` are the same setting."""
    try:
        return repr(float(value))
    except ValueError:
        return value


def _recipe(scheme: str) -> Path:
    path = ROOT / "configs" / f"smollm2_{scheme.lower()}.yaml"
    if not path.is_file():
        raise SystemExit(f"no recipe {path.relative_to(ROOT)} for scheme {scheme}: write one or drop the scheme.")
    return path


def _overrides(settings: list[str]) -> list[str]:
    """``key=value`` pairs as ``--key value`` flags of ``cbq quantize``; a key a record gave before it moved into
    ``extensions`` is given under its new name (:func:`today_key`), so the record's runs can be replayed."""
    flags = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"--set {setting!r}: write key=value, e.g. train.epochs=2")
        flags += [f"--{today_key(key)}", value]
    return flags


def _fp_reference(recipe: Path, workdir: Path, flags: list[str]) -> dict:
    """Evaluate the unquantized model once, on the recipe's evaluation windows (an RTN-free ``--eval`` run)."""
    import yaml

    config = yaml.safe_load(recipe.read_text())
    evaluation = config.get("eval", {})
    settings = dict(zip(flags[::2], flags[1::2], strict=True))
    output = workdir / "fp.json"
    command = [
        sys.executable, "-m", "cbq_lightning.cli", "evaluate",
        "--model", settings.get("--model.name_or_path", config["model"]["name_or_path"]),
        "--data", json.dumps(evaluation["datasets"]),
        "--seqlen", str(settings.get("--eval.seqlen", evaluation.get("seqlen", 2048))),
        "--max_windows", str(settings.get("--eval.max_windows", evaluation.get("max_windows"))),
        *(["--data_dir", data_dir] if (data_dir := settings.get("--data_dir", config.get("data_dir"))) else []),
        "--output", str(output),
    ]
    wall = _run(command)
    summary = json.loads(output.read_text())
    return {"results": summary["results"], "wall_s": wall, "command": shlex.join(command)}


def _quantize(recipe: Path, method: str, workdir: Path, flags: list[str], cfp: bool = True, name: str = "") -> dict:
    out = workdir / (name or method)
    command = [
        sys.executable, "-m", "cbq_lightning.cli", "quantize", "--config", str(recipe.relative_to(ROOT)),
        "--method", method, "--eval.fp_reference", "false", "--output_dir", str(out),
        *([] if cfp else CFP_OFF), *flags,
    ]
    wall = _run(command)
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "wall_s": wall, "command": shlex.join(command)}


def _peer(recipe: Path, peer: str, workdir: Path, flags: list[str]) -> dict:
    """One peer in its own process (its own wall time and peak RSS; a crash is a row, not the end).

    Returns the peer's record (``benchmarks.peers.job.run_peer``) plus ``command``."""
    output = workdir / f"peer_{peer}.json"
    command = [
        sys.executable, "-m", "benchmarks.peers", "--peer", peer, "--config", str(recipe.relative_to(ROOT)),
        "--output", str(output), *flags,
    ]
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    status = subprocess.run(command, cwd=ROOT).returncode
    wall = time.perf_counter() - started
    if output.is_file():
        record = json.loads(output.read_text())
    else:  # killed (memory), or it died before writing: still a row
        record = {"peer": peer, "status": "failed", "reason": f"peer process exited with status {status}",
                  "results": [], "settings": None, "version": None, "quantize_s": None}
    record["process_wall_s"] = wall
    record["command"] = shlex.join(command)
    return record


def _parse_ablations(specs: list[list[str]]) -> dict[str, list[str]]:
    """``[[NAME, KEY=VALUE, ...], ...]`` -> ``{NAME: [KEY=VALUE, ...]}`` (checked: a name, then overrides)."""
    ablations: dict[str, list[str]] = {}
    for spec in specs:
        name, settings = spec[0], spec[1:]
        if "=" in name or not settings:
            raise SystemExit(f"--ablation {' '.join(spec)}: write a name, then KEY=VALUE overrides, e.g. "
                             "--ablation lowrank10 extensions.correction.rank_fraction=0.1")
        if name in ablations:
            raise SystemExit(f"--ablation {name} is given twice")
        _overrides(settings)  # the same KEY=VALUE check as --set
        ablations[name] = settings
    return ablations


def _ablation_summary(name: str, settings: list[str], run: dict, cbq_ppl: float | None, ran: str) -> dict:
    """What the ablation table shows of one ablation run (with what the option adds, where it reports it).

    ``ran`` is the fingerprint of the settings the run resolved to (recipe, record overrides, the ablation's
    overrides): after a recipe change the same overrides may describe another run, and the table says so
    rather than pairing an old figure with today's recipe."""
    report = run["report"]
    ppl = report["eval"][0]["ppl"]
    correction = report.get("correction") or {}
    mixed = report.get("mixed_precision") or {}
    return {
        "name": name,
        "overrides": settings,
        "ppl": ppl,
        "over_cbq": ppl / cbq_ppl if cbq_ppl else None,
        "time_s": run["wall_s"],
        "peak_rss_gib": report["peak_rss_gib"],
        "settings": ran,
        **({"correction_parameters": correction["parameters"],
            "correction_per_weight": correction["parameters_per_quantized_weight"]} if correction else {}),
        **({"average_bits": mixed["average_bits"]} if mixed else {}),
    }


#: configuration keys renamed since some records were made: the table shows today's key, and what the run was given
RENAMED_KEYS = {"quant.estimator": "quant.continuous.estimator", "quant.clamp": "quant.continuous.clamp"}


def _overrides_text(overrides: list[str]) -> str:
    """The ablation's overrides as a user would write them today (and, where a key was renamed, as the run got them)."""
    today = []
    for item in overrides:
        key, sep, value = item.partition("=")
        today.append(f"{today_key(RENAMED_KEYS.get(key, key))}{sep}{value}")
    text = f"`{' '.join(today)}`"
    return text if today == list(overrides) else f"{text} (run as `{' '.join(overrides)}`)"


def _ablation_table(rows: list[dict]) -> str:
    """One line per ablation run of every row: the option, its perplexity against plain CBQ, its cost.

    A row whose run no longer matches today's recipe with its overrides (``ablations_current``: False, or None
    for entries made before ablations recorded their settings) is marked "(earlier recipe)"."""
    lines = ["| scheme | ablation | overrides | PPL | / CBQ | adds | time | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for entry in (row.get("ablations") or {}).values():
            earlier = "ablations_current" in row and not row["ablations_current"].get(entry["name"])
            adds = []
            if "correction_parameters" in entry:
                adds.append(f"{entry['correction_parameters']:,} params ({100 * entry['correction_per_weight']:.1f} %)")
            if "average_bits" in entry:
                adds.append(f"{entry['average_bits']:.3f} avg bits")
            ratio = f"{entry['over_cbq']:.3f}" if entry["over_cbq"] else "-"
            lines.append(
                f"| {row['scheme']} | {entry['name']}{' (earlier recipe)' if earlier else ''} | {_overrides_text(entry['overrides'])} | {entry['ppl']:.2f} | "
                f"{ratio} | {', '.join(adds) or '-'} | {entry['time_s'] / 60:.1f} min | {entry['peak_rss_gib']:.2f} GiB |"
            )
    return "\n".join(lines)


def _peer_summary(record: dict) -> dict:
    """What the table and the plot need of a peer record."""
    results = record.get("results") or []
    return {
        "status": record["status"],
        "reason": record.get("reason"),
        "ppl": results[0]["ppl"] if results else None,
        "package": record.get("package"),
        "version": record.get("version"),
        "settings": record.get("settings"),
        "quantize_s": record.get("quantize_s"),
        "wall_s": record.get("process_wall_s", record.get("wall_s")),
        "peak_rss_gib": record.get("peak_rss_gib"),
        "device": record.get("device"),
    }


def _quantizes_activations(scheme: str) -> bool:
    from cbq_lightning.quant.scheme import parse_scheme

    return parse_scheme(scheme).quantizes_activations


def _row(
    scheme: str, fp: dict, rtn: dict, cbq: dict, cbq_no_cfp: dict | None = None, peers: dict | None = None,
    cbq_paper: dict | None = None,
) -> dict:
    ppl_fp, ppl_rtn = fp["results"][0]["ppl"], rtn["report"]["eval"][0]["ppl"]
    return {
        "scheme": scheme,
        "fp": ppl_fp,
        "rtn": ppl_rtn,
        **_cbq_summary(cbq, ppl_fp, ppl_rtn, cbq_no_cfp),
        **(_paper_summary(cbq_paper) if cbq_paper is not None else {}),
        "rtn_time_s": rtn["wall_s"],
        **({"peers": {name: _peer_summary(record) for name, record in peers.items()}} if peers else {}),
    }


def _cbq_summary(cbq: dict, ppl_fp: float, ppl_rtn: float, cbq_no_cfp: dict | None) -> dict:
    """The ``CBQ (shipped recipe)`` (and ``CBQ w/o CFP``) fields of a row, against the row's FP and RTN."""
    ppl_cbq = cbq["report"]["eval"][0]["ppl"]
    gap = ppl_rtn - ppl_fp
    return {
        "cbq": ppl_cbq,
        "is_cbq": is_cbq(cbq["report"]),
        "cbq_no_cfp": None if cbq_no_cfp is None else cbq_no_cfp["report"]["eval"][0]["ppl"],
        "cbq_over_fp": ppl_cbq / ppl_fp,
        "gap_closed": (ppl_rtn - ppl_cbq) / gap if gap > 0 else None,
        "cbq_over_rtn": ppl_cbq / ppl_rtn,
        "cbq_time_s": cbq["wall_s"],
        "cbq_calibration_s": cbq["report"]["calibration_time_s"],
        "cbq_peak_rss_gib": cbq["report"]["peak_rss_gib"],
        "eval": cbq["report"]["eval"][0] | {"ppl": None},
    }


def _paper_summary(run: dict) -> dict:
    """The ``CBQ (paper settings)`` fields of a row."""
    return {"cbq_paper": run["report"]["eval"][0]["ppl"], "cbq_paper_time_s": run["wall_s"]}


def _peer_cell(row: dict, peer: str) -> str:
    """A peer's perplexity, why it has none, or ``-`` when the row's run did not ask for it."""
    summary = (row.get("peers") or {}).get(peer)
    if summary is None:
        return "-"
    if summary["status"] == "ok" and summary["ppl"] is not None:
        return f"{summary['ppl']:.2f}"
    return f"not run: {summary['reason']}" if summary["status"] == "unavailable" else f"failed: {summary['reason']}"


def is_cbq(report: dict) -> bool:
    """Whether a run's report shows the method the project calls CBQ: overlapping windows whose trainable
    parameters are LoRA-rounding factors and clipping thresholds (no full-rank rounding offsets). A report
    that predates the per-window parameter counts cannot show it, so it is not called CBQ."""
    counts = [window.get("trainable_parameters") for window in report.get("windows", [])]
    if not counts or any(count is None for count in counts):
        return False
    trains_lora = any(count["rounding"] > 0 for count in counts)
    return trains_lora and all(count["rounding_offset"] == 0 for count in counts) and report["window"]["overlap"] >= 1


def _table(rows: list[dict]) -> str:
    from benchmarks.peers.job import PEERS

    peers = [name for name in PEERS if any(name in (row.get("peers") or {}) for row in rows)]
    peer_heads = "".join(f" {PEERS[name].label} |" for name in peers)
    lines = [
        f"| scheme | FP | RTN |{peer_heads} CBQ (paper settings) | CBQ w/o CFP | CBQ (shipped recipe) | gap closed | "
        "CBQ / RTN | CBQ / FP | CBQ time | peak RSS |",
        "|---|---|---|" + "---|" * len(peers) + "---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        closed = f"{100 * row['gap_closed']:.0f} %" if row["gap_closed"] is not None else "n/a"
        no_cfp = f"{row['cbq_no_cfp']:.2f}" if row.get("cbq_no_cfp") is not None else "-"
        paper = f"{row['cbq_paper']:.2f}" if row.get("cbq_paper") is not None else "not measured"
        peer_cells = "".join(f" {_peer_cell(row, name)} |" for name in peers)
        if not row.get("is_cbq"):
            shipped = f"not CBQ: {row['cbq']:.2f} (earlier recipe)"
        elif row.get("cbq_current") is False:
            shipped = f"{row['cbq']:.2f} (earlier recipe)"
        else:
            shipped = f"{row['cbq']:.2f}{_seed_spread(row)}"
        lines.append(
            f"| {row['scheme']} | {row['fp']:.2f} | {row['rtn']:.2f} |{peer_cells} {paper} | {no_cfp} | {shipped} | "
            f"{closed} | {row['cbq_over_rtn']:.2f} | {row['cbq'] / row['fp']:.2f} | "
            f"{row['cbq_time_s'] / 60:.1f} min{_threads_note(row.get('cbq_device'))} | {row['cbq_peak_rss_gib']:.2f} GiB |"
        )
    return "\n".join(lines)


def _threads_note(device: str | None) -> str:
    """`` (1 thread)`` after a CPU run's time when it ran on a single thread: such runs were made two or three
    at a time on a small machine, so their wall time is not what the recipe takes on the cores it is sized for."""
    match = re.search(r"\((?:[^,]*), (\d+) threads?\)", device or "")
    return " (1 thread)" if match and int(match.group(1)) == 1 else ""


def _peer_notes(row: dict) -> list[str]:
    """One line per peer that ran: package, version, settings, wall time (the table's fine print)."""
    from benchmarks.peers.job import PEERS

    notes = []
    for name, summary in (row.get("peers") or {}).items():
        if summary["status"] != "ok":
            continue
        settings = ", ".join(f"{k} {v}" for k, v in (summary["settings"] or {}).items())
        label = PEERS[name].label if name in PEERS else name
        notes.append(
            f"  - {label}: {summary['package']} {summary['version']} ({settings}); quantization "
            f"{summary['quantize_s'] / 60:.1f} min, whole peer run {summary['wall_s'] / 60:.1f} min"
            + (f", peak RSS {summary['peak_rss_gib']:.2f} GiB" if summary.get("peak_rss_gib") else "")
            + (f", on {summary['device']}" if summary.get("device") else "")
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), help="schemes to run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key in every run, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON and table go")
    parser.add_argument("--tag", default="", help="suffix of the result files (keeps experiments apart)")
    parser.add_argument("--peers", default="", metavar="NAMES",
                        help="peer methods run next to CBQ on the same samples and windows, from "
                        "gptq,gptq-tuned,autoround,autoround-light")
    parser.add_argument("--peers-only", action="store_true",
                        help="run only the peers and add them to the existing record of each scheme "
                        "(same recipe and overrides as that record; FP, RTN and CBQ are not rerun)")
    parser.add_argument("--ablation", action="append", nargs="+", default=[], metavar="NAME KEY=VALUE",
                        help="an extra CBQ run per scheme with these overrides, shown in the ablation table "
                        "(repeatable), e.g. --ablation lowrank10 extensions.correction.rank_fraction=0.1")
    parser.add_argument("--ablations-only", action="store_true",
                        help="run only the --ablation runs and add them to each scheme's existing record")
    parser.add_argument("--no-paper", action="store_true",
                        help="skip the CBQ (paper settings) run of each scheme (configs/paper/<scheme>.yaml's method on the recipe)")
    parser.add_argument("--paper-only", action="store_true",
                        help="run only CBQ (paper settings) and add it to each scheme's existing record")
    parser.add_argument("--cbq-only", action="store_true",
                        help="run only CBQ (shipped recipe), and CBQ w/o CFP for activation schemes, and replace "
                        "them in each scheme's existing record (after a recipe change; FP, RTN, the paper settings "
                        "and the peers are kept)")
    parser.add_argument("--peer-records", nargs="+", type=Path, default=[], metavar="FILE",
                        help="add peer records written by `python -m benchmarks.peers --output FILE` elsewhere (e.g. "
                        "on a GPU machine) to the record of the scheme whose recipe they ran; nothing runs")
    parser.add_argument("--cbq-runs", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                        help="add finished `cbq quantize` outputs of a scheme's recipe (made elsewhere, or with "
                        "other seeds) to its record: the recipe's seed fills the CBQ cell, every seed the spread; "
                        "nothing runs")
    parser.add_argument("--redraw", action="store_true",
                        help="only rewrite quality.md and redraw quality.png from the records in --output "
                        "(after copying in records of separate runs); nothing runs")
    args = parser.parse_args(argv)
    suffix = f"_{args.tag}" if args.tag else ""
    invocation = shlex.join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    if args.peer_records:
        _import_peers(args.peer_records, args, invocation, suffix)
    if args.cbq_runs:
        _import_cbq_runs(args.cbq_runs, args, invocation, suffix)
    if args.redraw or args.peer_records or args.cbq_runs:
        _write_table(args.output, suffix)
        _draw(args.output, suffix)
        return 0

    from benchmarks.peers.job import parse_peers

    peers = parse_peers(args.peers)
    if args.peers_only and not peers:
        raise SystemExit("--peers-only needs --peers (e.g. --peers gptq-tuned,autoround)")
    ablations = _parse_ablations(args.ablation)
    if args.ablations_only and not ablations:
        raise SystemExit("--ablations-only needs --ablation NAME KEY=VALUE ...")
    if sum((args.ablations_only, args.peers_only, args.paper_only, args.cbq_only)) > 1:
        raise SystemExit("--ablations-only, --peers-only, --paper-only and --cbq-only: run them one after the other")
    flags = _overrides(args.set)
    recipes = {scheme: _recipe(scheme) for scheme in args.schemes}
    args.output.mkdir(parents=True, exist_ok=True)
    if args.paper_only:
        _add_paper(recipes, args, invocation, suffix)
    elif args.cbq_only:
        _replace_cbq(recipes, args, invocation, suffix)
    elif args.peers_only:
        _add_peers(recipes, peers, args, invocation, suffix)
    elif args.ablations_only:
        _add_ablations(recipes, ablations, args, invocation, suffix)
    else:
        _run_all(recipes, peers, flags, args, invocation, suffix, ablations)
    _write_table(args.output, suffix)
    _draw(args.output, suffix)
    return 0


def _write_table(folder: Path, suffix: str) -> None:
    """Write (and print) ``quality{suffix}.md`` from the latest records in ``folder``, if there are any."""
    if not _latest_records(folder, suffix):
        print(f"table skipped: no quality_*{suffix}.json records in {folder}", flush=True)
        return
    table = _combined_table(folder, suffix)
    (folder / f"quality{suffix}.md").write_text(table)
    print(table)


def _run_all(recipes: dict[str, Path], peers: list[str], flags: list[str], args: argparse.Namespace,
             invocation: str, suffix: str, ablations: dict[str, list[str]] | None = None) -> None:
    """FP once, then per scheme RTN, (CBQ w/o CFP,) CBQ, the ablations and the peers; one record per scheme."""
    from cbq_lightning.provenance import versions as versions_now

    with tempfile.TemporaryDirectory(prefix="cbq-quality-") as tmp:
        workdir = Path(tmp)
        fp = _fp_reference(next(iter(recipes.values())), workdir, flags)
        for scheme, recipe in recipes.items():
            rtn = _quantize(recipe, "rtn", workdir / scheme, [*PLAIN_RTN, *flags], cfp=False)
            ablation = None
            if _quantizes_activations(scheme):
                ablation = _quantize(recipe, "cbq", workdir / scheme, flags, cfp=False, name="cbq_no_cfp")
            paper = None if args.no_paper else _quantize(
                recipe, "cbq", workdir / scheme, [*flags, *paper_flags(scheme)], name="cbq_paper")
            cbq = _quantize(recipe, "cbq", workdir / scheme, flags)
            peer_records = {
                name: _peer(recipe, name, workdir / scheme, flags) for name in peers
            }
            ablation_flags = {name: [*flags, *_overrides(settings)] for name, settings in (ablations or {}).items()}
            ablation_runs = {
                name: _quantize(recipe, "cbq", workdir / scheme, ran, name=f"ablation_{name}")
                for name, ran in ablation_flags.items()
            }
            row = _row(scheme, fp, rtn, cbq, ablation, peer_records, paper)
            _mark_settings(row, recipe, flags, cbq, ablation)
            if ablation_runs:
                row["ablations"] = {
                    name: _ablation_summary(name, ablations[name], run, row["cbq"],
                                            _settings_fingerprint(recipe, ablation_flags[name]))
                    for name, run in ablation_runs.items()
                }
            record = {
                "benchmark": "quality",
                "row": row,
                "recipe": str(recipe.relative_to(ROOT)),
                "overrides": args.set,
                "invocation": invocation,
                "commands": {
                    "fp": fp["command"], "rtn": rtn["command"], "cbq": cbq["command"],
                    **({"cbq_paper": paper["command"]} if paper else {}),
                    **({"cbq_no_cfp": ablation["command"]} if ablation else {}),
                    **{f"peer_{name}": peer["command"] for name, peer in peer_records.items()},
                    **{f"ablation_{name}": run["command"] for name, run in ablation_runs.items()},
                },
                "cbq_report": cbq["report"],
                "recipe_deviations": {k: list(v) for k, v in recipe_deviations(recipe).items()},
                # RTN's per-block errors on the same calibration rows (the plot's right panel)
                "rtn_block_errors": rtn["report"].get("block_errors"),
                **({"peers": peer_records} if peer_records else {}),
                "device": cbq["report"]["device"],
                "cpu_count": os.cpu_count(),
                "machine": platform.platform(),
                "versions": versions_now(),
                "git_commit": _git_commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            _write_record(args.output / f"quality_{scheme.lower()}{suffix}.json", record)


def _write_record(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)


def _attach_peer(record: dict, name: str, peer: dict) -> None:
    """Put peer ``name``'s record (with its ``command``) into a scheme record: the row's summary, the whole
    record and the command (a later peer of the same name replaces the earlier one)."""
    record["row"].setdefault("peers", {})[name] = _peer_summary(peer)
    record.setdefault("peers", {})[name] = peer
    record.setdefault("commands", {})[f"peer_{name}"] = peer["command"]


def _add_peers(recipes: dict[str, Path], peers: list[str], args: argparse.Namespace, invocation: str,
               suffix: str) -> None:
    """``--peers-only``: run the peers with each scheme's recorded recipe and overrides, add them to its record."""
    from cbq_lightning.provenance import versions as versions_now

    records = _existing_records(recipes, args, suffix, "--peers-only")
    for scheme, (_path, record) in records.items():
        if args.set and args.set != record.get("overrides", []):
            raise SystemExit(f"--peers-only: {scheme}'s record ran with --set {record.get('overrides')}, not "
                             f"{args.set}: the peers must calibrate like the record (drop --set).")
    with tempfile.TemporaryDirectory(prefix="cbq-quality-peers-") as tmp:
        for scheme, (path, record) in records.items():
            recipe = ROOT / record["recipe"]
            flags = _overrides(record.get("overrides", []))
            peer_records = {
                name: _peer(recipe, name, Path(tmp) / scheme, flags) for name in peers
            }
            for name, peer in peer_records.items():
                _attach_peer(record, name, peer)
            record["peer_run"] = {
                "invocation": invocation, "git_commit": _git_commit(), "versions": versions_now(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            _write_record(path, record)


#: flags that say where a peer ran, not how it calibrated: they may differ from the scheme's record
PLACEMENT_FLAGS = frozenset({"--trainer.accelerator", "--trainer.devices", "--data_dir"})


def _calibration_flags(flags: list[str]) -> list[str]:
    """``flags`` (``--key value`` pairs) without the placement ones."""
    pairs = list(zip(flags[::2], flags[1::2], strict=True))
    return [item for key, value in pairs if key not in PLACEMENT_FLAGS for item in (key, value)]


def _import_peers(files: list[Path], args: argparse.Namespace, invocation: str, suffix: str) -> None:
    """``--peer-records``: add each peer record (``python -m benchmarks.peers`` output, run elsewhere) to the
    record of the scheme whose recipe it ran, after checking it calibrated like that record."""
    by_recipe = {str(_recipe(scheme).relative_to(ROOT)): scheme for scheme in DEFAULT_SCHEMES}
    for file in files:
        if not file.is_file():
            raise SystemExit(f"--peer-records: no file {file}")
        peer = json.loads(file.read_text())
        scheme = by_recipe.get(peer.get("recipe", ""))
        if scheme is None or "peer" not in peer:
            raise SystemExit(f"--peer-records: {file} is not a peer record of a benchmark recipe "
                             f"(recipe {peer.get('recipe')!r}; write it with python -m benchmarks.peers)")
        (path, record), = _existing_records({scheme: _recipe(scheme)}, args, suffix, "--peer-records").values()
        expected = _overrides(record.get("overrides", []))
        if _calibration_flags(peer.get("overrides", [])) != expected:
            raise SystemExit(f"--peer-records: {file} ran with {peer.get('overrides')}, the {scheme} record with "
                             f"{expected}: the peer must calibrate like the record (only placement flags may differ)")
        peer.setdefault("command", shlex.join(["python", "-m", "benchmarks.peers", "--peer", peer["peer"], "--config",
                                               peer["recipe"], "--output", file.name, *peer.get("overrides", [])]))
        _attach_peer(record, peer["peer"], peer)
        record.setdefault("peer_imports", {})[peer["peer"]] = {
            "invocation": invocation, "file": file.name, "device": peer.get("device"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_record(path, record)
        print(f"{scheme}: {peer.get('label', peer['peer'])} added from {file}", flush=True)


def _add_ablations(recipes: dict[str, Path], ablations: dict[str, list[str]], args: argparse.Namespace,
                   invocation: str, suffix: str) -> None:
    """``--ablations-only``: run the ablations with each scheme's recorded recipe and overrides, add them to
    its record (a later run of the same name replaces the earlier one)."""
    from cbq_lightning.provenance import versions as versions_now

    records = _existing_records(recipes, args, suffix, "--ablations-only")
    with tempfile.TemporaryDirectory(prefix="cbq-quality-ablations-") as tmp:
        for scheme, (path, record) in records.items():
            recipe = ROOT / record["recipe"]
            flags = _overrides(record.get("overrides", []))
            for name, settings in ablations.items():
                ran = [*flags, *_overrides(settings)]
                run = _quantize(recipe, "cbq", Path(tmp) / scheme, ran, name=f"ablation_{name}")
                record["row"].setdefault("ablations", {})[name] = _ablation_summary(
                    name, settings, run, record["row"]["cbq"], _settings_fingerprint(recipe, ran))
                record.setdefault("commands", {})[f"ablation_{name}"] = run["command"]
                record.setdefault("ablation_runs", {})[name] = {
                    "invocation": invocation, "git_commit": _git_commit(), "versions": versions_now(),
                    "device": run["report"]["device"],
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                }
                _write_record(path, record)  # after each run: a long series keeps what it finished


def _existing_records(recipes: dict[str, Path], args: argparse.Namespace, suffix: str, mode: str) -> dict:
    """``{scheme: (path, record)}`` of the records a ``--*-only`` mode adds to (each must exist)."""
    records = {}
    for scheme in recipes:
        path = args.output / f"quality_{scheme.lower()}{suffix}.json"
        if not path.is_file():
            raise SystemExit(f"{mode}: no record {path} for {scheme}; run it without {mode} first.")
        records[scheme] = (path, json.loads(path.read_text()))
    return records


def _add_paper(recipes: dict[str, Path], args: argparse.Namespace, invocation: str, suffix: str) -> None:
    """``--paper-only``: run CBQ (paper settings) with each scheme's recorded recipe and overrides, add it to
    the record (replacing an earlier one)."""
    from cbq_lightning.provenance import versions as versions_now

    records = _existing_records(recipes, args, suffix, "--paper-only")
    with tempfile.TemporaryDirectory(prefix="cbq-quality-paper-") as tmp:
        for scheme, (path, record) in records.items():
            recipe = ROOT / record["recipe"]
            flags = _overrides(record.get("overrides", []))
            run = _quantize(recipe, "cbq", Path(tmp) / scheme, [*flags, *paper_flags(scheme)], name="cbq_paper")
            record["row"].update(_paper_summary(run))
            record.setdefault("commands", {})["cbq_paper"] = run["command"]
            record["paper_run"] = {
                "invocation": invocation, "git_commit": _git_commit(), "versions": versions_now(),
                "device": run["report"]["device"], "report": run["report"],
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            _write_record(path, record)


def _replace_cbq(recipes: dict[str, Path], args: argparse.Namespace, invocation: str, suffix: str) -> None:
    """``--cbq-only``: run CBQ (shipped recipe), and for activation schemes CBQ w/o CFP, with each scheme's
    recorded recipe and overrides, and replace them in the record. The recipe file is today's: that is the
    point (a changed recipe, the same samples and evaluation windows as the record's other columns)."""
    from cbq_lightning.provenance import versions as versions_now

    records = _existing_records(recipes, args, suffix, "--cbq-only")
    with tempfile.TemporaryDirectory(prefix="cbq-quality-cbq-") as tmp:
        for scheme, (path, record) in records.items():
            recipe = ROOT / record["recipe"]
            flags = _overrides(record.get("overrides", []))
            cbq = _quantize(recipe, "cbq", Path(tmp) / scheme, flags)  # the shipped figure first
            no_cfp = None
            if _quantizes_activations(scheme):
                no_cfp = _quantize(recipe, "cbq", Path(tmp) / scheme, flags, cfp=False, name="cbq_no_cfp")
            row = record["row"]
            row.update(_cbq_summary(cbq, row["fp"], row["rtn"], no_cfp))
            _mark_settings(row, recipe, flags, cbq, no_cfp)
            record["cbq_report"] = cbq["report"]
            record["recipe_deviations"] = {k: list(v) for k, v in recipe_deviations(recipe).items()}
            record.setdefault("commands", {}).update(
                {"cbq": cbq["command"], **({"cbq_no_cfp": no_cfp["command"]} if no_cfp else {})})
            record.pop("cbq_imports", None)  # the cells are this run's now
            record["cbq_run"] = {
                "invocation": invocation, "git_commit": _git_commit(), "versions": versions_now(),
                "device": cbq["report"]["device"],
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            _write_record(path, record)


#: config keys that say where or how a run was placed and shown, not what it computed: a run imported with
#: ``--cbq-runs`` may differ from the recipe in these (its seed is compared separately)
PLACEMENT_KEYS = ("output_dir", "data_dir", "resume", "keep_checkpoints", "seed", "trainer.accelerator", "trainer.devices",
                  "trainer.strategy", "advanced.trainer.num_nodes", "advanced.trainer.enable_progress_bar",
                  "advanced.trainer.log_every_n_steps", "eval.fp_reference", "advanced.eval.batch_size", "advanced.monitor",
                  "advanced.cache", "export",
                  "extensions.end_to_end.evaluate_before")


def _flat(value: object, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}`` (lists and tuples alike, as YAML reads them back)."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): list(value) if isinstance(value, tuple) else value}


#: extension sections and keys added after the committed records were made, with the value at which they compute
#: exactly what the runs before them computed (off): at that value one is left out of a run's settings and the
#: records' fingerprints stay valid; at any other, it is a setting like any other. Each one added later goes here.
LATER_KEYS = {"extensions.end_to_end": None, "extensions.end_to_end.norms": False}


#: keys that left the configuration after the committed records were made, with the value every one of those runs
#: had: put back into a run's settings where absent, so the records' fingerprints stay valid. ``model.tiny.*``: the
#: tiny model's shape moved into its name (``tiny-llama:num_layers=2``); no record is of a tiny model, so each ran
#: with the shape's defaults of the time, written out here so that a later change of those defaults leaves them be
RETIRED_KEYS = {
    "model.tiny.hidden_size": 64, "model.tiny.num_layers": 4, "model.tiny.num_heads": 4, "model.tiny.num_kv_heads": 2,
    "model.tiny.intermediate_size": 128, "model.tiny.init_std": 0.02, "model.tiny.tie_embeddings": False,
    "model.tiny.num_experts": 4, "model.tiny.experts_per_token": 2,
}


#: settings that do nothing for a run of a weight-only scheme and whose default changed after the committed records
#: were made: such a run is fingerprinted with the value those records had, since it computes the same bits either
#: way. ``extensions.end_to_end.activation_clip`` (true until the W4A4 measurements, false since) touches only
#: activation quantizers.
INERT_WITHOUT_ACTIVATIONS = {"extensions.end_to_end.activation_clip": True}


def today_key(key: str) -> str:
    """``key`` under today's name: a key that moved (:data:`~cbq_lightning.moved_keys.MOVED_KEYS`) is read from a run
    or a record made before the move under its new name."""
    from cbq_lightning.moved_keys import moved_to

    return moved_to(key) or key


def _recorded_key(key: str) -> str:
    """``key`` under the name the committed records were fingerprinted with (the inverse of :func:`today_key`)."""
    from cbq_lightning.moved_keys import old_name

    return old_name(key)


def run_settings(config: dict) -> dict:
    """What decides a run's result: its resolved configuration (``config.yaml``) flattened under today's key names,
    without :data:`PLACEMENT_KEYS` and without the :data:`LATER_KEYS` that are off, with the
    :data:`RETIRED_KEYS` and, for a weight-only scheme, the :data:`INERT_WITHOUT_ACTIVATIONS` as recorded."""
    flat = {**RETIRED_KEYS, **{today_key(key): value for key, value in _flat(config).items()}}
    if "quant.scheme" in flat and not _quantizes_activations(str(flat["quant.scheme"])):
        flat.update({key: value for key, value in INERT_WITHOUT_ACTIVATIONS.items() if key in flat})
    return {key: value for key, value in flat.items()
            if not any(key == p or key.startswith(p + ".") for p in PLACEMENT_KEYS)
            and not (key in LATER_KEYS and value == LATER_KEYS[key])}


def recipe_settings(recipe: Path, flags: list[str]) -> tuple[dict, int]:
    """:func:`run_settings` of ``recipe`` with ``flags`` as ``cbq quantize`` resolves them, and its seed."""
    from benchmarks.peers.job import load_recipe

    config = load_recipe(recipe, flags)
    resolved = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return run_settings(resolved), int(config.seed)


def _fingerprint(settings: dict) -> str:
    """A short hash of ``settings``, taken under the key names the records were made with, so that renaming a key
    (moving it into ``extensions``) leaves every committed record's fingerprint valid."""
    recorded = {_recorded_key(key): value for key, value in settings.items()}
    return hashlib.sha256(json.dumps(recorded, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _settings_fingerprint(recipe: Path, flags: list[str]) -> str:
    """The fingerprint of what ``recipe`` with ``flags`` computes: how records say which settings a cell ran."""
    return _fingerprint(recipe_settings(recipe, flags)[0])


def _note_seed(row: dict, settings: dict, seed: int, ppl: float) -> None:
    """Add a seed's perplexity to the row's spread; a spread of other settings (an earlier recipe) is dropped."""
    fingerprint = _fingerprint(settings)
    seeds = row.get("cbq_seeds")
    if not seeds or seeds.get("settings") != fingerprint:
        seeds = row["cbq_seeds"] = {"settings": fingerprint, "ppl": {}}
    seeds["ppl"][str(seed)] = ppl


def _seed_spread(row: dict) -> str:
    """`` (seeds 0, 1, 2: 61.90 ± 0.45)`` when at least two seeds of the cell's own settings were measured."""
    seeds = row.get("cbq_seeds") or {}
    values = seeds.get("ppl") or {}
    if len(values) < 2 or seeds.get("settings") != row.get("cbq_settings"):
        return ""
    seeds = sorted(values, key=int)
    ppl = [values[seed] for seed in seeds]
    return f" (seeds {', '.join(seeds)}: {statistics.mean(ppl):.2f} ± {statistics.stdev(ppl):.2f})"


def _mark_settings(row: dict, recipe: Path, flags: list[str], cbq: dict, no_cfp: dict | None) -> None:
    """After the benchmark ran the CBQ cell (and w/o CFP): which settings they belong to, and the seed's figure."""
    shipped, seed = recipe_settings(recipe, flags)
    row["cbq_settings"] = _fingerprint(shipped)
    row["cbq_no_cfp_settings"] = _fingerprint(shipped) if no_cfp is not None else None
    _note_seed(row, shipped, seed, cbq["report"]["eval"][0]["ppl"])


def _ablations_current(record: dict) -> dict[str, bool | None]:
    """Per ablation of the record: whether today's recipe with the record's and the ablation's overrides
    resolves to the settings the ablation ran (None: not recorded, or the recipe is gone)."""
    from cbq_lightning.errors import ConfigError

    recipe = ROOT / record.get("recipe", "")
    flags = _overrides(record.get("overrides", []))
    current: dict[str, bool | None] = {}
    for name, entry in (record["row"].get("ablations") or {}).items():
        if entry.get("settings") is None or not recipe.is_file():
            current[name] = None
            continue
        try:
            current[name] = entry["settings"] == _settings_fingerprint(recipe, [*flags, *_overrides(entry["overrides"])])
        except ConfigError:  # an option the recipe no longer takes (the parser's one-line error)
            current[name] = False
    return current


def _cell_is_current(record: dict) -> bool | None:
    """Whether the record's CBQ cell ran today's recipe (with the record's overrides); None when the record does
    not say which settings its cell ran (records made before ``cbq_settings``) or the recipe is gone."""
    recorded = record["row"].get("cbq_settings")
    recipe = ROOT / record.get("recipe", "")
    if recorded is None or not recipe.is_file():
        return None
    return recorded == _settings_fingerprint(recipe, _overrides(record.get("overrides", [])))


def _differences(run: dict, expected: dict, limit: int = 4) -> str:
    keys = sorted(set(run) | set(expected), key=str)
    diff = [f"{k} {run.get(k, '(absent)')!r} (recipe {expected.get(k, '(absent)')!r})" for k in keys
            if run.get(k, "(absent)") != expected.get(k, "(absent)")]
    return ", ".join(diff[:limit]) + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def _import_cbq_runs(folders: list[Path], args: argparse.Namespace, invocation: str, suffix: str) -> None:
    """``--cbq-runs``: add finished ``cbq quantize`` outputs to the record of the scheme whose recipe they ran.

    Why: a recipe's seed spread, or a run on another machine, is a ``cbq quantize`` the benchmark did not start;
    its ``config.yaml`` says exactly what ran, so it is checked against the recipe (with the record's overrides)
    rather than trusted. A run of the recipe's seed replaces the ``CBQ (shipped recipe)`` cell (or ``CBQ w/o
    CFP``, run with CFP off), its wall time being the run's own, so that seed must be a whole run, not a resume
    (whose time and report cover only what ran after the kept windows); every shipped-settings seed joins the
    spread, resumed or not (a resume computes the same result as the whole run)."""
    import yaml

    from cbq_lightning.quant.scheme import parse_scheme

    by_scheme = {parse_scheme(scheme).name: scheme for scheme in DEFAULT_SCHEMES}
    for folder in folders:
        if not ((folder / "report.json").is_file() and (folder / "config.yaml").is_file()):
            raise SystemExit(f"--cbq-runs: {folder} is not a finished `cbq quantize` output (no report.json and "
                             "config.yaml)")
        report = json.loads((folder / "report.json").read_text())
        config = yaml.safe_load((folder / "config.yaml").read_text())
        scheme = by_scheme.get((report.get("scheme") or {}).get("name"))
        if scheme is None or report.get("method") != "cbq":
            raise SystemExit(f"--cbq-runs: {folder} is a {report.get('method')} run of "
                             f"{(report.get('scheme') or {}).get('name')}, not CBQ on a benchmark scheme")
        (path, record), = _existing_records({scheme: _recipe(scheme)}, args, suffix, "--cbq-runs").values()
        recipe = ROOT / record["recipe"]
        flags = _overrides(record.get("overrides", []))
        shipped, recipe_seed = recipe_settings(recipe, flags)
        got = run_settings(config)
        if got == shipped:
            cell = "cbq"
        elif _quantizes_activations(scheme) and got == recipe_settings(recipe, [*flags, *CFP_OFF])[0]:
            cell = "cbq_no_cfp"
        else:
            raise SystemExit(f"--cbq-runs: {folder} did not run {record['recipe']} with the record's overrides "
                             f"{record.get('overrides', [])}: {_differences(got, shipped)}")
        row, evaluation = record["row"], report["eval"][0]
        window = ("dataset", "seqlen", "windows")
        if any(evaluation.get(k) != row["eval"].get(k) for k in window if k in row["eval"]):
            raise SystemExit(f"--cbq-runs: {folder} was evaluated on {[evaluation.get(k) for k in window]}, the "
                             f"{scheme} record on {[row['eval'].get(k) for k in window]}")
        seed, ppl = int(config["seed"]), evaluation["ppl"]
        if seed == recipe_seed and report.get("resumed_after_window") is not None:
            raise SystemExit(f"--cbq-runs: {folder} resumed after window {report['resumed_after_window']}, so its "
                             f"time and report cover only what ran after it; the recipe's seed ({recipe_seed}) fills "
                             "the cell with its time, so import a whole run of that seed (resumed runs of other "
                             "seeds join the spread)")
        command = shlex.join(["cbq", "quantize", "--config", record["recipe"], *flags,
                              *(CFP_OFF if cell == "cbq_no_cfp" else []), "--seed", str(seed)])
        if cell == "cbq":
            _note_seed(row, shipped, seed, ppl)
        if seed == recipe_seed:
            run = {"report": report, "wall_s": report["wall_time_s"], "command": command}
            if cell == "cbq":
                # a w/o-CFP cell measured for other settings (an earlier recipe) no longer belongs to the row
                kept = row.get("cbq_no_cfp") if row.get("cbq_no_cfp_settings") == _fingerprint(shipped) else None
                row.update(_cbq_summary(run, row["fp"], row["rtn"], None))
                row["cbq_no_cfp"], row["cbq_settings"] = kept, _fingerprint(shipped)
                record["cbq_report"] = report
                record["recipe_deviations"] = {k: list(v) for k, v in recipe_deviations(recipe).items()}
                record.pop("cbq_run", None)  # the note of an earlier --cbq-only run no longer describes the cell
            else:
                row["cbq_no_cfp"], row["cbq_no_cfp_settings"] = ppl, _fingerprint(shipped)
            record.setdefault("commands", {})[cell] = command
            record.setdefault("cbq_imports", {})[cell] = {
                "invocation": invocation, "folder": str(folder), "device": report.get("device"),
                "versions": report.get("versions"), "git_commit": (report.get("versions") or {}).get("git"),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
        _write_record(path, record)
        if cell == "cbq" or seed == recipe_seed:
            print(f"{scheme}: {cell} seed {seed} ({ppl:.2f}) added from {folder}", flush=True)
        else:  # the w/o-CFP cell has no spread: only the recipe's seed fills it
            print(f"{scheme}: {folder} is CBQ w/o CFP at seed {seed}, not the recipe's {recipe_seed}: not used", flush=True)


def _latest_records(folder: Path, suffix: str) -> list[dict]:
    """The latest record of every scheme in ``folder`` (schemes may be run one at a time), in scheme order."""
    records = []
    for scheme in DEFAULT_SCHEMES + tuple(
        p.stem.removeprefix("quality_").removesuffix(suffix).upper() for p in sorted(folder.glob(f"quality_*{suffix}.json"))
    ):
        path = folder / f"quality_{scheme.lower()}{suffix}.json"
        if path.is_file() and all(r["row"]["scheme"] != scheme for r in records):
            records.append(json.loads(path.read_text()))
    return records


def _calibration_note(record: dict) -> str | None:
    """A line under the table when a row's cells calibrated on different rows (a recipe that changed its
    ``data`` after the other cells ran): each cell's ``samples x seqlen``, None when they all agree."""
    def rows(calibration: dict | None) -> str | None:
        return None if not calibration else f"{calibration.get('num_samples')} x {calibration.get('seqlen')}"

    cells = {"CBQ (shipped recipe)": rows((record.get("cbq_report") or {}).get("calibration")),
             "CBQ (paper settings)": rows(((record.get("paper_run") or {}).get("report") or {}).get("calibration"))}
    for name, peer in (record["row"].get("peers") or {}).items():
        settings = peer.get("settings") or {}
        if "samples" in settings:
            cells[name] = f"{settings['samples']} x {settings.get('seqlen')}"
    known = {cell: value for cell, value in cells.items() if value is not None}
    if len(set(known.values())) < 2:
        return None
    listed = ", ".join(f"{cell} {value}" for cell, value in known.items())
    return (f"  - calibration rows differ between cells: {listed} (the same seed draws the rows, so a smaller set is "
            "the first rows of a larger one)")


def _combined_table(folder: Path, suffix: str) -> str:
    """The table of the latest result of every scheme in ``folder``, followed by the command, commit,
    device and versions of each row (and the peers' packages, settings and times)."""
    records = _latest_records(folder, suffix)
    rows = [{**r["row"], "is_cbq": is_cbq(r.get("cbq_report") or {}),  # judged from the run's report
             "cbq_device": (r.get("cbq_report") or {}).get("device"), "cbq_current": _cell_is_current(r),
             "ablations_current": _ablations_current(r)}
            for r in records]
    lines = [_table(rows), ""]
    for record in records:
        versions = record["versions"]
        lines.append(
            f"- {record['row']['scheme']}: `{record['invocation']}` (git {record['git_commit']}, {record['device']}, "
            f"torch {versions['torch']}, transformers {versions['transformers']}, lightning {versions['lightning']}, "
            f"{record['date']})"
        )
        if "recipe_deviations" in record:
            changed = ", ".join(f"{today_key(k)} {paper} -> {mine}"
                                for k, (paper, mine) in record["recipe_deviations"].items())
            lines.append(f"  - shipped recipe, deviations from the paper settings: {changed or 'none'}")
        if "cbq_run" in record:
            run = record["cbq_run"]
            lines.append(f"  - CBQ (shipped recipe) re-run by `{run['invocation']}` (git {run['git_commit']}, "
                         f"{run['device']}, {run['date']})")
        for cell, run in (record.get("cbq_imports") or {}).items():
            label = "CBQ w/o CFP" if cell == "cbq_no_cfp" else "CBQ (shipped recipe)"
            lines.append(f"  - {label}: a `cbq quantize` run (git {run.get('git_commit') or 'not recorded'}, "
                         f"{run['device']}, torch {(run.get('versions') or {}).get('torch')}) added by "
                         f"`{run['invocation']}` ({run['date']}; its time is the run's own)")
        if "paper_run" in record:
            run = record["paper_run"]
            lines.append(f"  - paper settings added by `{run['invocation']}` (git {run['git_commit']}, {run['device']}, "
                         f"{run['date']})")
        if "peer_run" in record:
            run = record["peer_run"]
            lines.append(f"  - peers added by `{run['invocation']}` (git {run['git_commit']}, {run['date']})")
        for name, run in (record.get("peer_imports") or {}).items():
            lines.append(f"  - {name} run elsewhere ({run['device']}) and added by `{run['invocation']}` ({run['date']})")
        lines.extend(_peer_notes(record["row"]))
        if (note := _calibration_note(record)) is not None:
            lines.append(note)
    lines.append("")
    lines.append("CBQ (paper settings): the paper's method as stated in docs/method.md on the recipe's budget (RTN start, LoRA-Rounding trained "
                 "soft, K=2/O=1, MSE + KL on both branches, learnable clipping, CFP with weight truncation judged "
                 "by output error, lr 1e-3 / 5e-3): the method keys of `configs/paper/<scheme>.yaml`.")
    if any(r["row"].get("peers") for r in records):
        lines.append("")
        lines.append("Peer columns: `-` = not asked for in that scheme's run; a reason = asked for but not run.")
    if any(r["row"].get("ablations") for r in records):
        lines += ["", "Ablations (extra CBQ runs with the overrides shown; `/ CBQ` against the row's CBQ when the "
                  "ablation ran; a row marked (earlier recipe) applied its overrides to an earlier version of the "
                  "recipe):", "",
                  _ablation_table(rows), ""]
        for record in records:
            for name, run in (record.get("ablation_runs") or {}).items():
                lines.append(f"- {record['row']['scheme']} {name}: `{run['invocation']}` (git {run['git_commit']}, "
                             f"{run['device']}, {run['date']})")
    return "\n".join(lines) + "\n"


def _plot_module():
    """``quality_plot.py`` beside this script (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("quality_plot", Path(__file__).with_name("quality_plot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _draw(folder: Path, suffix: str) -> Path | None:
    """Draw ``quality{suffix}.png`` from the records in ``folder``; skipped, with the reason, when impossible."""
    plot = _plot_module()
    reason = plot.plot_unavailable()
    records = [{**r, "row": {**r["row"], "is_cbq": is_cbq(r.get("cbq_report") or {})}} for r in _latest_records(folder, suffix)]
    if reason is None and not records:
        reason = f"no quality_*{suffix}.json records in {folder}"
    if reason is None:
        try:
            path = plot.plot_quality(records, folder / f"quality{suffix}.png")
        except ValueError as error:
            reason = str(error)
        else:
            print(f"plot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
            return path
    print(f"plot skipped: {reason}", flush=True)
    return None


if __name__ == "__main__":
    sys.exit(main())

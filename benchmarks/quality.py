"""Quality benchmark (BENCHMARK.md): FP, RTN and CBQ perplexity per scheme, in one invocation.

For each scheme the recipe ``configs/smollm2_<scheme>.yaml`` is run as ``--method rtn`` (plain
round-to-nearest: CFP off) and ``--method cbq``, with the same seed, hence the same calibration samples
and the same evaluation windows; schemes that quantize activations also get a CBQ run without CFP (the
ablation of BENCHMARK.md). The full-precision model is evaluated once on those windows. Every run is its own ``cbq``
process, so its wall time and peak RSS are its own. Results go to ``benchmarks/results/`` as one JSON
per scheme plus ``quality.md`` (the markdown table, also printed).

    python benchmarks/quality.py                      # every scheme below (cpu-quick protocol)
    python benchmarks/quality.py --schemes W3A16G64 --set train.epochs=2   # quick look, overrides
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SCHEMES = ("W4A16", "W3A16G64", "W2A16G64", "W4A8", "W4A4")
#: flags that switch coarse-to-fine preprocessing off (the RTN baseline and the CFP ablation)
CFP_OFF = ["--cfp.weights", "false", "--cfp.activations", "false"]


def _run(command: list[str]) -> float:
    """Run a ``cbq`` command (output streamed), fail loudly; returns its wall time in seconds."""
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        # results written by earlier schemes of the same invocation do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


def _recipe(scheme: str) -> Path:
    path = ROOT / "configs" / f"smollm2_{scheme.lower()}.yaml"
    if not path.is_file():
        raise SystemExit(f"no recipe {path.relative_to(ROOT)} for scheme {scheme}: write one or drop the scheme.")
    return path


def _overrides(settings: list[str]) -> list[str]:
    """``key=value`` pairs as ``--key value`` flags of ``cbq quantize``."""
    flags = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"--set {setting!r}: write key=value, e.g. train.epochs=2")
        flags += [f"--{key}", value]
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
        "--data_dir", settings.get("--data_dir", config.get("data_dir", "../shared/data")),
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


def _quantizes_activations(scheme: str) -> bool:
    from cbq_lightning.quant.scheme import parse_scheme

    return parse_scheme(scheme).quantizes_activations


def _row(scheme: str, fp: dict, rtn: dict, cbq: dict, cbq_no_cfp: dict | None = None) -> dict:
    ppl_fp = fp["results"][0]["ppl"]
    ppl_rtn = rtn["report"]["eval"][0]["ppl"]
    ppl_cbq = cbq["report"]["eval"][0]["ppl"]
    gap = ppl_rtn - ppl_fp
    return {
        "scheme": scheme,
        "fp": ppl_fp,
        "rtn": ppl_rtn,
        "cbq": ppl_cbq,
        "cbq_no_cfp": None if cbq_no_cfp is None else cbq_no_cfp["report"]["eval"][0]["ppl"],
        "cbq_over_fp": ppl_cbq / ppl_fp,
        "gap_closed": (ppl_rtn - ppl_cbq) / gap if gap > 0 else None,
        "cbq_over_rtn": ppl_cbq / ppl_rtn,
        "cbq_time_s": cbq["wall_s"],
        "cbq_calibration_s": cbq["report"]["calibration_time_s"],
        "cbq_peak_rss_gib": cbq["report"]["peak_rss_gib"],
        "rtn_time_s": rtn["wall_s"],
        "eval": cbq["report"]["eval"][0] | {"ppl": None},
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| scheme | FP | RTN | CBQ w/o CFP | CBQ | gap closed | CBQ / RTN | CBQ / FP | CBQ time | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        closed = f"{100 * row['gap_closed']:.0f} %" if row["gap_closed"] is not None else "n/a"
        no_cfp = f"{row['cbq_no_cfp']:.2f}" if row.get("cbq_no_cfp") is not None else "-"
        lines.append(
            f"| {row['scheme']} | {row['fp']:.2f} | {row['rtn']:.2f} | {no_cfp} | {row['cbq']:.2f} | {closed} | "
            f"{row['cbq_over_rtn']:.2f} | {row['cbq'] / row['fp']:.2f} | "
            f"{row['cbq_time_s'] / 60:.1f} min | {row['cbq_peak_rss_gib']:.2f} GiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), help="schemes to run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key in every run, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON and table go")
    parser.add_argument("--tag", default="", help="suffix of the result files (keeps experiments apart)")
    args = parser.parse_args(argv)

    from cbq_lightning.runner import versions as versions_now

    flags = _overrides(args.set)
    recipes = {scheme: _recipe(scheme) for scheme in args.schemes}
    args.output.mkdir(parents=True, exist_ok=True)
    invocation = shlex.join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbq-quality-") as tmp:
        workdir = Path(tmp)
        fp = _fp_reference(next(iter(recipes.values())), workdir, flags)
        suffix = f"_{args.tag}" if args.tag else ""
        for scheme, recipe in recipes.items():
            rtn = _quantize(recipe, "rtn", workdir / scheme, flags, cfp=False)
            ablation = None
            if _quantizes_activations(scheme):
                ablation = _quantize(recipe, "cbq", workdir / scheme, flags, cfp=False, name="cbq_no_cfp")
            cbq = _quantize(recipe, "cbq", workdir / scheme, flags)
            row = _row(scheme, fp, rtn, cbq, ablation)
            rows.append(row)
            record = {
                "benchmark": "quality",
                "row": row,
                "recipe": str(recipe.relative_to(ROOT)),
                "overrides": args.set,
                "invocation": invocation,
                "commands": {
                    "fp": fp["command"], "rtn": rtn["command"], "cbq": cbq["command"],
                    **({"cbq_no_cfp": ablation["command"]} if ablation else {}),
                },
                "cbq_report": cbq["report"],
                "device": cbq["report"]["device"],
                "cpu_count": os.cpu_count(),
                "machine": platform.platform(),
                "versions": versions_now(),
                "git_commit": _git_commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            path = args.output / f"quality_{scheme.lower()}{suffix}.json"
            path.write_text(json.dumps(record, indent=2) + "\n")
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    table = _combined_table(args.output, suffix)
    (args.output / f"quality{suffix}.md").write_text(table)
    print(table)
    return 0


def _combined_table(folder: Path, suffix: str) -> str:
    """The table of the latest result of every scheme in ``folder`` (schemes may be run one at a time),
    followed by the command, commit, device and versions of each row."""
    records = []
    for scheme in DEFAULT_SCHEMES + tuple(
        p.stem.removeprefix("quality_").removesuffix(suffix).upper() for p in sorted(folder.glob(f"quality_*{suffix}.json"))
    ):
        path = folder / f"quality_{scheme.lower()}{suffix}.json"
        if path.is_file() and all(r["row"]["scheme"] != scheme for r in records):
            records.append(json.loads(path.read_text()))
    lines = [_table([r["row"] for r in records]), ""]
    for record in records:
        versions = record["versions"]
        lines.append(
            f"- {record['row']['scheme']}: `{record['invocation']}` (git {record['git_commit']}, {record['device']}, "
            f"torch {versions['torch']}, transformers {versions['transformers']}, lightning {versions['lightning']}, "
            f"{record['date']})"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

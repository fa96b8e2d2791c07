"""Lever sweep: several ``cbq quantize`` variants of one recipe, run side by side, one table of results.

Why: choosing a recipe means comparing many settings on the whole model (learning rates, rank, epochs,
windows). On a GPU each SmolLM2 run is short and leaves most of the card idle, so running several at once
turns a lent GPU's few minutes into a lever study; on a CPU use ``--parallel 1``. Every variant is its own
``cbq`` process with the recipe's seed, hence the same calibration samples and evaluation windows.

    python benchmarks/sweep.py --config configs/smollm2_w3a16g64.yaml --out runs/sweep --parallel 6 \
        --common trainer.accelerator=gpu \
        --variant base \
        --variant lr2e-2 train.lr_rounding=0.02 \
        --variant rank16 rounding.rank=16 \
        --variant w4 configs/smollm2_w4a16.yaml          # a variant may name its own recipe

Writes ``OUT/sweep.json`` (per variant: overrides, perplexity, relative final error, trainable parameters,
wall time, exit status) and prints a markdown table sorted by perplexity. It is a screen: the figures a
README states come from ``benchmarks/quality.py`` on the machine they name.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _flags(settings: list[str]) -> list[str]:
    """``KEY=VALUE`` pairs as ``--KEY VALUE`` flags (checked: each has one ``=``)."""
    flags: list[str] = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise SystemExit(f"{setting!r} is not KEY=VALUE (e.g. train.lr_rounding=0.01)")
        flags += [f"--{key}", value]
    return flags


def _summary(out: Path) -> dict:
    """What the table shows of a finished run's report (empty when the run left none)."""
    path = out / "report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    windows = report.get("windows") or []
    trainable: dict[str, int] = {}
    for window in windows:
        for kind, count in (window.get("trainable_parameters") or {}).items():
            trainable[kind] = max(trainable.get(kind, 0), count)
    evaluation = report.get("eval") or []
    return {
        "ppl": evaluation[0]["ppl"] if evaluation else None,
        "final_error": report.get("final_error"),
        "flip_fraction": [w.get("flip_fraction") for w in windows],
        "hardened_loss": [(w.get("loss_first"), w.get("loss_last")) for w in windows],
        "max_trainable_per_window": trainable,
    }


def _run(config: str, out: Path, name: str, settings: list[str]) -> dict:
    if settings and settings[0].endswith((".yaml", ".yml")):  # the variant's own recipe
        config, settings = settings[0], settings[1:]
    command = [sys.executable, "-m", "cbq_lightning.cli", "quantize", "--config", config,
               "--output_dir", str(out / name), "--resume", "false", "--advanced.trainer.enable_progress_bar", "false",
               *_flags(settings)]
    (out / name).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / name / "log.txt", "w") as log:
        status = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    return {"name": name, "overrides": settings, "status": status, "wall_s": time.perf_counter() - started,
            "command": shlex.join(command), **_summary(out / name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the recipe every variant starts from")
    parser.add_argument("--out", required=True, type=Path, help="one folder per variant, and sweep.json")
    parser.add_argument("--parallel", type=int, default=1, help="variants run at once")
    parser.add_argument("--common", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    parser.add_argument("--variant", nargs="+", action="append", required=True,
                        metavar="NAME [RECIPE.yaml] [KEY=VALUE ...]",
                        help="a variant: its name, optionally its own recipe, then its overrides (repeatable)")
    args = parser.parse_args(argv)
    variants = {spec[0]: spec[1:] for spec in args.variant}
    if len(variants) != len(args.variant):
        raise SystemExit("two variants share a name")
    for settings in [args.common, *variants.values()]:
        _flags([s for s in settings if not s.endswith((".yaml", ".yml"))])  # fail before anything runs
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    lock = threading.Lock()

    def record(row: dict) -> None:
        """Keep the table current as variants finish: a sweep stopped by a time limit keeps what ran."""
        with lock:
            results.append(row)
            (args.out / "sweep.json").write_text(json.dumps({"config": args.config, "common": args.common,
                                                             "variants": results}, indent=1))

    with ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
        futures = []
        for name, settings in variants.items():
            recipe = settings[:1] if settings and settings[0].endswith((".yaml", ".yml")) else []
            future = pool.submit(_run, args.config, args.out, name, [*recipe, *args.common, *settings[len(recipe):]])
            future.add_done_callback(lambda f: record(f.result()))
            futures.append(future)
        for future in futures:
            future.result()
    print("| variant | PPL | final relative error | wall | status |\n|---|---|---|---|---|")
    for row in sorted(results, key=lambda r: (r.get("ppl") is None, r.get("ppl") or 0.0)):
        ppl = f"{row['ppl']:.3f}" if row.get("ppl") is not None else "-"
        error = (row.get("final_error") or {}).get("cbq", "-")
        print(f"| {row['name']} | {ppl} | {error} | {row['wall_s']:.0f} s | {row['status']} |")
    return 0 if all(r["status"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU suite: the project's CUDA checks and 7B-shape timings in one command, for a briefly lent GPU.

A GPU is lent only to some tasks, for about 15 minutes of device time, on a machine that reaches no package
registry and returns at most eight files. So everything is prepared here (``prepare.sh`` downloads the
missing wheels into ``.whl/``) and this one command does the rest, writing into OUT_DIR one log per stage
and ``summary.json`` (device, versions, each stage's status, wall time and figures):

    bash benchmarks/gpu/run.sh OUT_DIR             # on the GPU machine (device tool: carry [".whl"])
    bash benchmarks/gpu/run.sh OUT_DIR --dry-run   # the same plumbing on CPU at tiny shapes (CI runs it)

Stages, each a subprocess with its own time limit (its process group is killed past it); a stage that fails
does not stop the next:

  stage        limit  what, and the expected time on an H100 machine (16 CPU cores)
  install       45 s  carried wheels -> a temporary site folder, unless the image has the package (~5 s)
  env           30 s  imports (the project from the repo root), device, torch / CUDA / NCCL / driver (~10 s)
  tests        210 s  ``pytest -m gpu tests/test_gpu.py``: the CPU reference run of the tiny recipe (~15 s),
                      the same on CUDA in float32 and bf16-mixed, 1-process DDP over NCCL, resume, export +
                      reload: seven tiny-recipe runs of ~5-15 s on the GPU (~2 min with start-up)
  speed_w4a16  190 s  ``benchmarks/speed.py --config configs/w4a16.yaml --shape llama3-8b``: the shipped W4A16
                      recipe on a random-weight Llama-3-8B shape of 4 blocks built on CPU (~20 s); window 1 of the
                      walk timed stage by stage (GPTQ start, clip search, CFP, teacher caching, steps, advancing) on
                      8 of the recipe's 128 x 2048 samples (per-sample stages scaled to 128), projected to 32 blocks
                      at the recipe's budget, with AutoRound (200 iterations) on the same blocks and token ids (~60 s)

Budget: the limits add up to 475 s (7.9 min), under the 8 minutes planned and inside the device tool's
10-minute command limit with a 2-minute margin. In ``--dry-run`` the install
is skipped (this machine has the project's dependencies), the GPU tests are collected and skip without
CUDA, and speed.py runs at the tiny shape on CPU: the whole rehearsal takes well under a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / ".whl"
#: stage -> time limit in seconds on the GPU machine (see the module docstring for the budget)
LIMITS = {"install": 45, "env": 30, "tests": 210, "speed_w4a16": 190}
#: speed stage -> (scheme, speed.py arguments on the GPU, the same path on CPU at the tiny shape for --dry-run)
SPEED_RUNS = {
    "speed_w4a16": ("W4A16",
                    ["--config", "configs/w4a16.yaml", "--shape", "llama3-8b", "--device", "cuda",
                     "--measure-samples", "8"],
                    ["--config", "configs/w4a16.yaml", "--shape", "tiny", "--device", "cpu", "--measure-samples", "4",
                     "--measure-epochs", "1", "--data.seqlen", "32", "--autoround", "off"]),
}
#: figures of a speed.py record that go into the summary
SPEED_KEYS = ("device", "precision", "recipe", "shape", "window_work_over_forward", "cbq_over_autoround",
              "peak_gpu_gib", "peak_rss_gib")


@dataclass
class Stage:
    """One step of the suite: a command, its time limit, and extra environment variables."""

    name: str
    command: list[str]
    limit_s: int
    env: dict[str, str] = field(default_factory=dict)
    preamble: str = ""


def run_stage(stage: Stage, out: Path, env: dict[str, str]) -> dict:
    """Runs ``stage`` with its output in ``OUT/<name>.log``; a timeout kills its whole process group
    (pytest's DDP or CLI subprocesses included), so a hung stage cannot eat the next stages' time."""
    log = out / f"{stage.name}.log"
    started = time.monotonic()
    with log.open("w") as handle:
        handle.write(stage.preamble + f"$ {shlex.join(stage.command)}\n")
        handle.flush()
        process = subprocess.Popen(stage.command, cwd=REPO, env={**env, **stage.env}, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = process.wait(timeout=stage.limit_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc, status = None, "timeout"
            handle.write(f"\n[killed after the stage's limit of {stage.limit_s} s]\n")
    wall = time.monotonic() - started
    print(f"{stage.name:<12} {status:<8} {wall:6.1f} s  (limit {stage.limit_s} s)  {log.name}", flush=True)
    if status != "ok":  # the device tool returns the output's tail even when files do not come back
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print("\n".join(f"    {line}" for line in tail), flush=True)
    return {"name": stage.name, "status": status, "rc": rc, "wall_s": round(wall, 1), "limit_s": stage.limit_s,
            "log": log.name, "command": shlex.join(stage.command)}


def skipped(name: str, reason: str) -> dict:
    print(f"{name:<12} {'skipped':<8} {reason}", flush=True)
    return {"name": name, "status": "skipped", "rc": None, "wall_s": 0.0, "limit_s": LIMITS[name], "log": None,
            "command": None, "note": reason}


def _newer_or_same(installed: str, carried: str) -> bool:
    from packaging.version import Version

    return Version(installed) >= Version(carried)


def wheels_to_install() -> tuple[list[Path], list[str]]:
    """The carried wheels the image needs: one whose package the image already has at the same or a newer
    version would only shadow it (everything on PYTHONPATH comes first). Also the lines saying why."""
    chosen, notes = [], []
    for wheel in sorted(WHEELS.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is not None and _newer_or_same(installed, version):
            notes.append(f"# {name} {version}: not installed, the image has {installed}")
        else:
            chosen.append(wheel)
            notes.append(f"# {name} {version}: installed" + (f" (the image has {installed})" if installed else ""))
    return chosen, notes


def junit_cases(path: Path) -> list[dict]:
    """Each test's outcome and time from pytest's JUnit XML."""
    outcomes = {"failure": "failed", "error": "error", "skipped": "skipped"}
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        entry = {"name": case.get("name"), "outcome": "passed", "time_s": round(float(case.get("time", 0)), 2)}
        for tag, outcome in outcomes.items():
            child = case.find(tag)
            if child is not None:
                entry["outcome"] = outcome
                entry["message"] = (child.get("message") or "")[:400]
        cases.append(entry)
    return cases


def speed_figures(folder: Path) -> dict | None:
    """The key figures of the one record speed.py wrote into ``folder``."""
    records = sorted(folder.glob("speed_*.json"))
    if not records:
        return None
    record = json.loads(records[0].read_text())
    figures = {key: record.get(key) for key in SPEED_KEYS}
    projected = record.get("projected", {})
    figures.update({key: projected.get(key) for key in ("window_s", "calibration_min", "total_min", "windows",
                                                        "steps_per_window", "step_s", "stages_s")})
    autoround = record.get("autoround", {})
    figures["autoround"] = {key: autoround.get(key) for key in ("status", "reason", "projected_min", "quantize_s")}
    figures["record"] = record
    return figures


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (the device tool's $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on CPU at tiny shapes (CI)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cbq-gpu-"))  # what does not go back: site folder, raw records
    site = work / "site"
    python = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # the carried packages first, then the project from the repository root (it is not pip-installed there)
    env["PYTHONPATH"] = os.pathsep.join(
        [*([] if args.dry_run else [str(site)]), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    summary: dict = {
        "suite": "cbq-lightning GPU suite (benchmarks/gpu/run.py)",
        "dry_run": args.dry_run,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "budget_s": {**LIMITS, "total": sum(LIMITS.values())},
        "device": None,
        "versions": None,
        "stages": [],
        "tests": None,
        "speed": {},
    }
    started = time.monotonic()
    print(f"GPU suite{' (dry run, CPU)' if args.dry_run else ''}: {len(LIMITS)} stages, "
          f"budget {sum(LIMITS.values())} s; output in {out}", flush=True)

    def write_summary() -> None:  # after every stage: a command killed from outside still leaves one
        summary["total_s"] = round(time.monotonic() - started, 1)
        # a skipped install is fine: where packages are missing, the env stage fails
        summary["ok"] = all(s["status"] in ("ok", "skipped") for s in summary["stages"]) and len(
            summary["stages"]) == len(LIMITS)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    # install
    wheels, notes = wheels_to_install()
    if args.dry_run:
        summary["stages"].append(skipped("install", "dry run: this machine has the project's dependencies"))
    elif not wheels:
        reason = "nothing to install" if notes else f"no wheels in {WHEELS} (run benchmarks/gpu/prepare.sh first)"
        summary["stages"].append(skipped("install", reason))
    else:
        command = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
        summary["stages"].append(run_stage(Stage("install", command, LIMITS["install"],
                                                 preamble="\n".join(notes) + "\n"), out, env))
    write_summary()

    # env
    env_json = work / "env.json"
    command = [python, str(REPO / "benchmarks" / "gpu" / "env_check.py"), str(env_json),
               *(["--dry-run"] if args.dry_run else [])]
    summary["stages"].append(run_stage(Stage("env", command, LIMITS["env"]), out, env))
    if env_json.is_file():
        record = json.loads(env_json.read_text())
        summary["device"], summary["versions"] = record["device"], record["versions"]
    write_summary()

    # tests
    junit, figures = work / "tests.xml", work / "figures.json"
    command = [python, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
               "--durations=0", f"--junitxml={junit}"]
    try:
        metadata.version("pytest-timeout")
        command += ["--timeout=150"]  # a hung test (NCCL, say) fails alone instead of taking the whole stage
    except metadata.PackageNotFoundError:
        pass
    # CUBLAS_WORKSPACE_CONFIG: deterministic cuBLAS, for the bit-for-bit resume check
    tests_env = {"CBQ_GPU_FIGURES": str(figures), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    summary["stages"].append(run_stage(Stage("tests", command, LIMITS["tests"], tests_env), out, env))
    if junit.is_file():
        cases = junit_cases(junit)
        summary["tests"] = {"counts": dict(Counter(case["outcome"] for case in cases)), "cases": cases,
                            "figures": json.loads(figures.read_text()) if figures.is_file() else {}}
    write_summary()

    # speed
    for name, (scheme, on_gpu, on_cpu) in SPEED_RUNS.items():
        folder = work / name
        command = [python, str(REPO / "benchmarks" / "speed.py"), *(on_cpu if args.dry_run else on_gpu),
                   "--output", str(folder)]
        summary["stages"].append(run_stage(Stage(name, command, LIMITS[name]), out, env))
        summary["speed"][scheme] = speed_figures(folder)
        write_summary()

    print(f"total {summary['total_s']:.0f} s; {'all stages ok' if summary['ok'] else 'NOT all stages ok'}; "
          f"summary in {out / 'summary.json'}", flush=True)
    for scheme, figures_ in summary["speed"].items():
        if figures_:
            gpu = "n/a" if figures_["peak_gpu_gib"] is None else f"{figures_['peak_gpu_gib']:.1f} GiB"
            print(f"  {scheme}: step {figures_['step_s']:.3f} s, window {figures_['window_s']:.0f} s, "
                  f"{figures_['windows']} windows {figures_['calibration_min']:.1f} min (with evaluation "
                  f"{figures_['total_min']:.1f} min), peak GPU {gpu}, caching + advancing "
                  f"{figures_['window_work_over_forward']:.2f} x a forward, CBQ / AutoRound "
                  f"{figures_['cbq_over_autoround']} (AutoRound {figures_['autoround']['status']})", flush=True)
    if summary["tests"]:
        print(f"  tests: {summary['tests']['counts']}; figures {json.dumps(summary['tests']['figures'])}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

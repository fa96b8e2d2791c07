"""GGUF benchmark against llama.cpp's own quantizer: perplexity, size and tensor types of each mix, measured by
llama.cpp itself on the same text, for llama-quantize (with and without an importance matrix) and for cbq exports.

Why llama.cpp measures every file: a cbq GGUF is only worth something if llama.cpp runs it as well as the files its
own quantizer writes; measuring both with ``llama-perplexity`` leaves no room for a difference in the harness.

What runs (every file in ``--work``; a rerun reuses what a finished step left there):

1. the reference: the recipe's model is a GGUF (SmolLM2's is Q4_1), so its *dequantized* weights are the full
   precision both sides start from: ``llama-quantize --allow-requantize SOURCE ref-F32.gguf F32`` (bit-exact: every
   tensor equals ``gguf``'s dequantization of the source, checked here); it is measured too (the ``FP`` row);
2. ``llama-quantize ref-F32.gguf llama-TYPE.gguf TYPE`` for each ``--types`` mix, no importance matrix;
3. ``llama-imatrix`` on exactly the token rows ``cbq quantize`` calibrates on (the recipe's ``data`` section and
   seed, :func:`cbq_lightning.data.calibration.calibration_ids`): the rows are decoded and written back to back in one
   file, read with ``-bf`` (no trailing newline dropped) and ``--no-escape``, cut with ``-c SEQLEN``, so each
   llama.cpp chunk is one calibration row. The tokenizer has ``add_bos_token`` false, so llama.cpp replaces no
   token by a BOS. Checked before use: the decoded rows re-tokenize (transformers, the tokenizer cbq uses) to the very
   rows, and llama.cpp's own tokenizer gives the same token count (probed with a context longer than half the text,
   where ``llama-imatrix`` stops and prints the count); then ``llama-quantize --imatrix``;
4. cbq GGUFs given as ``--cbq TYPE=PATH`` (``cbq export --format gguf``), whose per-tensor GGML types are compared
   with the llama-quantize file of the same TYPE (mismatches are listed, never hidden);
5. ``llama-perplexity -m FILE -f TEST_TEXT -c 2048 --chunks 40`` on every file: the final PPL and its +/-.

The test text is WikiText-2 raw test as llama.cpp's ``wiki.test.raw``: the rows of the offline mirror
(``test.jsonl``, one row per line of the original file, whitespace-only lines stored as ``""``) written back line by
line, with ``" \\n"`` for the blank lines (the original file's). ``--test-text`` takes an existing file instead.

    python benchmarks/gguf_llamacpp.py                                  # Q4_K_M Q3_K_M Q2_K, no cbq files
    python benchmarks/gguf_llamacpp.py --types Q4_K_M --cbq Q4_K_M=runs/smollm2-q4km/model-Q4_K_M.gguf \\
        --out benchmarks/results/gguf_smollm2.json

The record (``--out``, default ``WORK/gguf_bench.json``) holds the machine, the versions, every command with its
wall time, and the results; a markdown table is printed at the end. Timings are wall times on a machine that may be
shared: the load average at the start and the end is recorded beside them.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the package sits beside the benchmarks folder
    sys.path.insert(0, str(ROOT))

LOG = logging.getLogger("gguf_llamacpp")
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
DEFAULT_TYPES = ("Q4_K_M", "Q3_K_M", "Q2_K")
DEFAULT_RECIPE = ROOT / "configs" / "smollm2_w4a16.yaml"
DEFAULT_BIN = ROOT / "build" / "llama.cpp" / "bin"
BUILD_SCRIPT = "scripts/build_llama_cpp.sh"
#: the reference's storage type: F32 holds the dequantized Q4_1 weights exactly (F16 would round the Q8_0 embedding)
REFERENCE_TYPE = "F32"
_FINAL_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNKS = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks")
_TOKEN_COUNT = re.compile(r"tokenizes to only (\d+) tokens")
_FALLBACK = re.compile(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\).*"
                       r"falling back to\s+(\S+)")
_FALLBACK_SUMMARY = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")


class ToolError(RuntimeError):
    """A llama.cpp step failed; the message names the command and its log."""


# --- small helpers ----------------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when it lies inside it (records stay readable and portable)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file and a rename: a reader (or a rerun) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    _write_atomic(path, json.dumps(value, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def machine() -> dict[str, Any]:
    """What the timings ran on: the processor model, the cores this process may use, the load around it."""
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version()}


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(bin_dir: Path) -> dict[str, Any]:
    """The llama.cpp build (the llama-cpp-python sdist it was vendored from, its ``--version`` line) and the Python
    packages that read the files."""
    from cbq_lightning.provenance import source_commit

    sdists = sorted(p.name for p in (bin_dir.parent / "src").glob("llama_cpp_python-*") if p.is_dir())
    try:  # llama-perplexity (the common argument parser) knows --version; llama-quantize prints its usage
        shown = subprocess.run([str(bin_dir / "llama-perplexity"), "--version"], capture_output=True, text=True,
                               timeout=30)
        lines = (shown.stdout + shown.stderr).splitlines()
        llama_version = "; ".join(line.strip() for line in lines if line.startswith(("version:", "built with")))
    except (OSError, subprocess.SubprocessError) as error:
        llama_version = f"unknown ({error})"
    return {
        "llama_cpp_python_sdist": sdists[-1].split("-", 1)[1] if sdists else None,
        "llama_cpp": llama_version,
        "torch": _package_version("torch"), "transformers": _package_version("transformers"),
        "gguf": _package_version("gguf"), "cbq_lightning": _package_version("cbq-lightning"),
        "cbq_git": source_commit((".", ":!benchmarks/results")),
    }


def missing_tools(bin_dir: Path) -> list[str]:
    return [tool for tool in TOOLS if not os.access(bin_dir / tool, os.X_OK)]


# --- steps: one command, one log, reused when its outputs exist ---------------------------------------------------


class Steps:
    """Runs llama.cpp commands, each with its log under ``work/logs``, and keeps the record of every command.

    A step is skipped when its outputs and its ``.step.json`` (written after it succeeded) exist, the command is the
    same, and none of its inputs changed since (a cbq file exported again is measured again): a rerun then reuses the
    file and the wall time of the run that made it.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands: list[dict[str, Any]] = []

    def run(self, name: str, command: Sequence[str], inputs: Sequence[Path] = (), outputs: Sequence[Path] = (),
            renames: dict[Path, Path] | None = None, expect_failure: bool = False) -> dict[str, Any]:
        """Run ``command`` (its output to ``logs/NAME.log``) unless step ``name`` already finished on these ``inputs``.

        ``renames`` maps the partial files the command writes to the final ``outputs`` (moved after success).
        ``expect_failure``: the step's purpose is a message the tool prints when it refuses (the token count probe).
        """
        log = self.logs / f"{name}.log"
        marker = self.logs / f"{name}.step.json"
        shown = shlex.join(str(part) for part in command)
        if self._finished(marker, log, shown, inputs, outputs):
            step = json.loads(marker.read_text(encoding="utf-8"))
            step["reused"] = True
            LOG.info("%s: reusing the earlier run (%.1f s)", name, step["seconds"])
            self.commands.append(step)
            return step
        LOG.info("%s: $ %s", name, shown)
        started = time.perf_counter()
        with log.open("w", encoding="utf-8") as handle:
            handle.write(f"$ {shown}\n")
            handle.flush()
            result = subprocess.run([str(part) for part in command], stdout=handle, stderr=subprocess.STDOUT,
                                    cwd=ROOT, check=False)
        seconds = time.perf_counter() - started
        if (result.returncode != 0) != expect_failure:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise ToolError(f"{name}: `{shown}` exited with {result.returncode} (log {_shown(log)}):\n{tail}")
        for partial, final in (renames or {}).items():
            os.replace(partial, final)
        step = {"name": name, "command": shown, "seconds": round(seconds, 2), "returncode": result.returncode,
                "log": _shown(log), "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        _write_json(marker, step)
        LOG.info("%s: done in %.1f s", name, seconds)
        self.commands.append({**step, "reused": False})
        return {**step, "reused": False}

    @staticmethod
    def _finished(marker: Path, log: Path, shown: str, inputs: Sequence[Path], outputs: Sequence[Path]) -> bool:
        """Whether an earlier run of the same command succeeded after its inputs were last written."""
        if not (marker.is_file() and log.is_file() and all(Path(path).is_file() for path in outputs)):
            return False
        if json.loads(marker.read_text(encoding="utf-8")).get("command") != shown:
            return False
        finished = marker.stat().st_mtime
        return all(Path(path).stat().st_mtime <= finished for path in inputs)

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")


# --- inputs: the test text and the calibration rows ---------------------------------------------------------------


def write_test_text(data_dir: Path, path: Path) -> dict[str, Any]:
    """WikiText-2 raw test as llama.cpp's ``wiki.test.raw`` (see the module docstring), written once."""
    from cbq_lightning.data.text import read_jsonl_rows

    source = data_dir / "wikitext" / "wikitext-2-raw-v1" / "test.jsonl"
    if not path.is_file():
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: give --data-dir (the offline mirror) or --test-text.")
        rows = read_jsonl_rows(source)
        _write_atomic(path, "".join(row if row else " \n" for row in rows).encode("utf-8"))
    return {"path": _shown(path), "from": _shown(source), "bytes": path.stat().st_size, "sha256": _sha256(path),
            "layout": "wiki.test.raw: the mirror's rows written back line by line, ' \\n' for the blank rows"}


def calibration_text(recipe: Path, path: Path) -> dict[str, Any]:
    """The recipe's calibration rows (what ``cbq quantize`` draws with its seed), decoded and written back to back.

    Checked: each row decodes to text that re-tokenizes to exactly that row, and the whole file re-tokenizes to the
    rows concatenated (so no token merges across a row boundary). Returns what was checked, with the row count,
    the row length and the model's GGUF.
    """
    from benchmarks.peers.job import load_recipe
    from cbq_lightning.data.calibration import calibration_ids
    from cbq_lightning.models.loading import load_tokenizer, resolve_source

    config = load_recipe(recipe)
    source_dir, gguf_file = resolve_source(config.model)
    if gguf_file is None:
        raise ValueError(f"{recipe}: model {config.model.name_or_path!r} is not a GGUF; this benchmark starts from "
                         "a GGUF (llama.cpp's quantizer reads nothing else).")
    tokenizer = load_tokenizer(config.model, hub=config.advanced.model)
    ids = calibration_ids(config.data, tokenizer, config.seed, config.data_dir, config.advanced.data.text_field)
    rows = ids.tolist()
    texts = [tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False) for row in rows]
    encode = lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    row_round_trips = sum(encode(text) == row for text, row in zip(texts, rows, strict=True))
    joined = "".join(texts)
    flat = [token for row in rows for token in row]
    retokenized = encode(joined)
    first_difference = next((i for i, (a, b) in enumerate(zip(retokenized, flat, strict=False)) if a != b),
                            None if len(retokenized) == len(flat) else min(len(retokenized), len(flat)))
    if not path.is_file() or path.read_bytes() != joined.encode("utf-8"):
        _write_atomic(path, joined.encode("utf-8"))
    return {
        "path": _shown(path), "sha256": _sha256(path), "recipe": _shown(recipe),
        "data": {"source": config.data.source, "split": config.data.split, "num_samples": config.data.num_samples,
                 "seqlen": config.data.seqlen, "seed": config.seed, "data_dir": config.data_dir},
        "rows": len(rows), "seqlen": len(rows[0]), "tokens": len(flat),
        "rows_round_trip": row_round_trips, "file_retokenizes_to_rows": first_difference is None,
        "transformers_tokens_of_file": len(retokenized), "first_differing_token": first_difference,
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
        "model_gguf": str(Path(source_dir) / gguf_file),
    }


# --- reading the files --------------------------------------------------------------------------------------------


def tensor_types(path: Path) -> dict[str, str]:
    """GGML type of every tensor of a GGUF, by name."""
    import gguf

    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors}


def check_reference(source: Path, reference: Path) -> dict[str, Any]:
    """Whether every tensor of ``reference`` equals ``gguf``'s dequantization of ``source`` (bit for bit)."""
    import gguf
    import numpy as np

    originals = {tensor.name: tensor for tensor in gguf.GGUFReader(str(source)).tensors}
    converted = {tensor.name: tensor for tensor in gguf.GGUFReader(str(reference)).tensors}
    differing = []
    for name, tensor in converted.items():
        original = originals.get(name)
        if original is None:
            differing.append(name)
            continue
        expected = gguf.quants.dequantize(original.data, original.tensor_type)
        got = np.asarray(tensor.data, dtype=np.float32)
        if expected.size != got.size or not np.array_equal(expected.reshape(got.shape), got):
            differing.append(name)
    return {"tensors": len(converted), "same_names": set(originals) == set(converted),
            "types": dict(Counter(t.tensor_type.name for t in converted.values())),
            "bit_exact_dequantization": not differing and set(originals) == set(converted),
            "differing": differing[:20]}


def parse_fallbacks(log_text: str) -> dict[str, Any]:
    """The tensors llama-quantize demoted because their row length is not a multiple of the type's block."""
    tensors = [{"tensor": m[1], "ncols": int(m[2]), "block": int(m[3]), "wanted": m[4], "used": m[5]}
               for m in _FALLBACK.finditer(log_text)]
    lines = log_text.count("falling back to")
    summary = _FALLBACK_SUMMARY.search(log_text)
    return {"count": lines, "reported_total": int(summary[1]) if summary else 0,
            "by_change": dict(Counter(f"{t['wanted']}->{t['used']}" for t in tensors)), "tensors": tensors}


def parse_perplexity(log_text: str) -> dict[str, Any]:
    match = _FINAL_PPL.search(log_text)
    if match is None:
        raise ToolError("llama-perplexity printed no 'Final estimate' line")
    chunks = _CHUNKS.search(log_text)
    return {"ppl": float(match[1]), "ppl_err": float(match[2]), "chunks": int(chunks[1]) if chunks else None}


def compare_types(cbq: dict[str, str], llama: dict[str, str]) -> dict[str, Any]:
    """Per-tensor type differences between a cbq file and llama-quantize's file of the same mix."""
    differing = [{"tensor": name, "cbq": cbq.get(name), "llama_quantize": llama.get(name)}
                 for name in sorted(set(cbq) | set(llama)) if cbq.get(name) != llama.get(name)]
    return {"same": not differing, "mismatches": len(differing), "differing": differing}


# --- the benchmark --------------------------------------------------------------------------------------------------


def _parse_cbq(specs: Sequence[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for spec in specs:
        kind, sep, path = spec.partition("=")
        if not sep or not kind or not path:
            raise ValueError(f"--cbq {spec!r}: write TYPE=PATH, e.g. Q4_K_M=runs/x/model-Q4_K_M.gguf")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--cbq {spec!r}: {path} does not exist (write it with `cbq export --format gguf`)")
        files[kind.upper()] = Path(path)
    return files


class Benchmark:
    """One invocation: the steps, the measurements and the record written after each of them."""

    def __init__(self, args: argparse.Namespace, cbq_files: dict[str, Path]) -> None:
        self.args = args
        self.work: Path = args.work
        self.bin: Path = args.llama_bin
        self.threads = str(args.threads)
        self.cbq_files = cbq_files
        self.types = list(dict.fromkeys([*(t.upper() for t in args.types), *cbq_files]))
        self.steps = Steps(self.work)
        self.out: Path = args.out or self.work / "gguf_bench.json"
        self.record: dict[str, Any] = {
            "benchmark": "GGUF: cbq export against llama.cpp's llama-quantize (with and without imatrix)",
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "invocation": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": {**machine(), "loadavg_start": os.getloadavg()},
            "versions": versions(self.bin),
            "protocol": {"ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
                         "scored": "second half of each chunk (llama-perplexity)"},
            "complete": False, "commands": self.steps.commands, "results": [],
        }

    def tool(self, name: str) -> str:
        return str(self.bin / name)

    def save(self) -> None:
        _write_json(self.out, self.record)

    def measure(self, label: str, gguf_type: str, source: str, path: Path, extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """``llama-perplexity`` on ``path``, its size and tensor types; appended to the record, which is saved."""
        name = f"ppl-{label}"
        step = self.steps.run(name, [self.tool("llama-perplexity"), "-m", path, "-f", self.test_text, "-c",
                                     str(self.args.ctx), "--chunks", str(self.args.chunks), "-t", self.threads],
                              inputs=[path, self.test_text])
        result = {"type": gguf_type, "source": source, "file": _shown(path), "mib": round(_mib(path), 2),
                  **parse_perplexity(self.steps.log_text(name)), "perplexity_seconds": step["seconds"],
                  "tensor_types": tensor_types(path), **(extra or {})}
        result["type_counts"] = dict(Counter(result["tensor_types"].values()))
        if result["chunks"] is not None and result["chunks"] < self.args.chunks:
            LOG.warning("%s: only %d chunks of %d tokens in the test text", label, result["chunks"], self.args.ctx)
        LOG.info("%s: PPL %.4f +/- %.4f, %.2f MiB", label, result["ppl"], result["ppl_err"], result["mib"])
        self.record["results"].append(result)
        self.save()
        return result

    def quantize(self, label: str, gguf_type: str, reference: Path, imatrix: Path | None) -> tuple[Path, dict]:
        output = self.work / f"{label}.gguf"
        partial = self.work / f"{label}.partial.gguf"
        command = [self.tool("llama-quantize"), *(["--imatrix", imatrix] if imatrix else []), reference, partial,
                   gguf_type, self.threads]
        step = self.steps.run(f"quantize-{label}", command, inputs=[reference, *([imatrix] if imatrix else [])],
                              outputs=[output], renames={partial: output})
        return output, {"quantize_seconds": step["seconds"],
                        "fallbacks": parse_fallbacks(self.steps.log_text(f"quantize-{label}"))}

    def run(self) -> None:
        args = self.args
        self.work.mkdir(parents=True, exist_ok=True)
        if args.test_text:
            self.test_text = Path(args.test_text)
            self.record["test_text"] = {"path": _shown(self.test_text), "bytes": self.test_text.stat().st_size,
                                        "sha256": _sha256(self.test_text), "layout": "given with --test-text"}
        else:
            self.test_text = self.work / "wiki.test.raw"
            self.record["test_text"] = write_test_text(args.data_dir, self.test_text)

        LOG.info("calibration rows of %s", _shown(args.recipe))
        calibration = calibration_text(args.recipe, self.work / "calibration.txt")
        self.record["calibration"] = calibration
        if not (calibration["file_retokenizes_to_rows"] and calibration["rows_round_trip"] == calibration["rows"]):
            LOG.warning("the decoded calibration rows do not re-tokenize to the rows exactly: %s", calibration)
        source = Path(calibration["model_gguf"])
        self.record["model"] = {"gguf": str(source), "mib": round(_mib(source), 2)}
        self.save()

        # 1. the reference: the source's weights dequantized, stored as F32
        reference = self.work / f"ref-{REFERENCE_TYPE}.gguf"
        partial = self.work / f"ref-{REFERENCE_TYPE}.partial.gguf"
        self.steps.run("reference", [self.tool("llama-quantize"), "--allow-requantize", source, partial,
                                     REFERENCE_TYPE, self.threads],
                       inputs=[source], outputs=[reference], renames={partial: reference})
        self.record["reference"] = {"file": _shown(reference), "type": REFERENCE_TYPE,
                                    **check_reference(source, reference)}
        self.save()

        # 3a. llama.cpp's token count of the calibration file: a context longer than half the text makes
        # llama-imatrix stop before any work and print how many tokens it read
        tokens = calibration["tokens"]
        seqlen = calibration["seqlen"]
        self.steps.run("calibration-token-count",
                       [self.tool("llama-imatrix"), "-m", source, "-bf", self.work / "calibration.txt",
                        "--no-escape", "-c", str(tokens // 2 + 1), "-t", self.threads],
                       inputs=[source, self.work / "calibration.txt"], expect_failure=True)
        counted = _TOKEN_COUNT.search(self.steps.log_text("calibration-token-count"))
        calibration["llama_cpp_tokens_of_file"] = int(counted[1]) if counted else None
        calibration["llama_cpp_count_matches"] = calibration["llama_cpp_tokens_of_file"] == tokens
        if not calibration["llama_cpp_count_matches"]:
            LOG.warning("llama.cpp reads %s tokens from the calibration file, cbq's rows hold %d",
                        calibration["llama_cpp_tokens_of_file"], tokens)

        # 3b. the importance matrix on the reference, one chunk per calibration row
        imatrix = self.work / "imatrix.gguf"
        partial_imatrix = self.work / "imatrix.partial.gguf"
        step = self.steps.run("imatrix", [self.tool("llama-imatrix"), "-m", reference, "-bf",
                                          self.work / "calibration.txt", "--no-escape", "-c", str(seqlen),
                                          "--chunks", str(calibration["rows"]), "-t", self.threads,
                                          "-o", partial_imatrix],
                              inputs=[reference, self.work / "calibration.txt"], outputs=[imatrix],
                              renames={partial_imatrix: imatrix})
        chunks = _CHUNKS.search(self.steps.log_text("imatrix"))
        self.record["imatrix"] = {"file": _shown(imatrix), "seconds": step["seconds"],
                                  "chunks": int(chunks[1]) if chunks else None, "chunk_tokens": seqlen,
                                  **_imatrix_metadata(imatrix)}
        self.save()

        # 5. the reference first, then each mix: plain, with imatrix, cbq
        self.measure("FP", REFERENCE_TYPE, "reference (source GGUF dequantized)", reference)
        for gguf_type in self.types:
            plain, info = self.quantize(f"llama-{gguf_type}", gguf_type, reference, None)
            llama_types = self.measure(f"llama-{gguf_type}", gguf_type, "llama-quantize", plain, info)["tensor_types"]
            if not args.no_imatrix:
                weighted, info = self.quantize(f"llama-{gguf_type}-imatrix", gguf_type, reference, imatrix)
                info["types_vs_plain"] = compare_types(tensor_types(weighted), llama_types)
                self.measure(f"llama-{gguf_type}-imatrix", gguf_type, "llama-quantize --imatrix", weighted, info)
            cbq = self.cbq_files.get(gguf_type)
            if cbq is not None:
                comparison = compare_types(tensor_types(cbq), llama_types)
                if not comparison["same"]:
                    LOG.warning("cbq %s: %d tensors stored in another type than llama-quantize's: %s", gguf_type,
                                comparison["mismatches"], comparison["differing"][:5])
                self.measure(f"cbq-{gguf_type}", gguf_type, "cbq export", cbq,
                             {"types_vs_llama_quantize": comparison, "export_summary": _export_summary(cbq)})

        self.record["complete"] = True
        self.record["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.record["machine"]["loadavg_end"] = os.getloadavg()
        self.record["table_markdown"] = table(self.record["results"])
        self.save()


def _imatrix_metadata(path: Path) -> dict[str, Any]:
    """What the imatrix file says about itself (chunks, chunk size, entries)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items() if key.startswith("imatrix.")}
    return {"metadata": fields, "gguf_tensors": len(reader.tensors)}


def _export_summary(path: Path) -> dict[str, Any] | None:
    """The summary ``cbq export`` writes beside a GGUF, when it is there."""
    summary = path.with_suffix(".cbq_export.json")
    return json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else None


def table(results: Sequence[dict[str, Any]]) -> str:
    """The markdown table: one row per measured file."""
    lines = ["| type | source | PPL ± | file MiB | fallbacks | tensor types vs llama-quantize |",
             "|---|---|---|---:|---:|---|"]
    for row in results:
        fallbacks = row.get("fallbacks")
        comparison = row.get("types_vs_llama_quantize") or row.get("types_vs_plain")
        if comparison is None:
            same = "-"
        else:
            same = "same" if comparison["same"] else f"{comparison['mismatches']} differ"
        lines.append(f"| {row['type']} | {row['source']} | {row['ppl']:.4f} ± {row['ppl_err']:.4f} | "
                     f"{row['mib']:.2f} | {fallbacks['count'] if fallbacks else '-'} | {same} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gguf_llamacpp.py", allow_abbrev=False,
        description="Perplexity (llama-perplexity), size and tensor types of llama-quantize's mixes with and without "
        "an importance matrix on cbq's calibration rows, and of cbq GGUF exports, on the recipe's GGUF model.")
    parser.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES), help="llama.cpp mixes (default: %(default)s)")
    parser.add_argument("--cbq", nargs="*", default=[], metavar="TYPE=PATH",
                        help="cbq exports to measure, each beside llama-quantize's file of the same TYPE")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE,
                        help="the cbq recipe whose model and calibration rows are used (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "gguf-bench",
                        help="intermediate files, reused by a rerun (default: runs/gguf-bench)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON record (default: WORK/gguf_bench.json)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data",
                        help="offline WikiText-2 mirror holding wikitext/wikitext-2-raw-v1/test.jsonl")
    parser.add_argument("--test-text", type=Path, default=None, help="an existing wiki.test.raw instead")
    parser.add_argument("--ctx", type=int, default=2048, help="llama-perplexity context (default: %(default)s)")
    parser.add_argument("--chunks", type=int, default=40, help="llama-perplexity chunks (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="-t of every tool (default: the cores this process may use, %(default)s)")
    parser.add_argument("--no-imatrix", action="store_true", help="skip the importance-matrix files")
    parser.add_argument("--llama-bin", type=Path, default=DEFAULT_BIN,
                        help=f"where {BUILD_SCRIPT} put the tools (default: build/llama.cpp/bin)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    missing = missing_tools(args.llama_bin)
    if missing:
        print(f"gguf_llamacpp: error: {', '.join(missing)} not found in {_shown(args.llama_bin)}: build them with "
              f"{BUILD_SCRIPT} (about 6 minutes on 2 cores)", file=sys.stderr)
        return 2
    try:
        cbq_files = _parse_cbq(args.cbq)
    except (ValueError, FileNotFoundError) as error:
        print(f"gguf_llamacpp: error: {error}", file=sys.stderr)
        return 2
    benchmark = Benchmark(args, cbq_files)
    try:
        benchmark.run()
    except ToolError as error:
        benchmark.record["error"] = str(error)
        benchmark.save()
        print(f"gguf_llamacpp: error: {error}", file=sys.stderr)
        return 1
    print(benchmark.record["table_markdown"])
    print(f"record: {_shown(benchmark.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

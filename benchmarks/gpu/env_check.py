"""GPU suite, stage ``env``: can the later stages import what they need, and on what machine do they run?

Imports every package the GPU tests and the speed benchmark need (the carried wheels included) and the
project itself from the repository root, and writes a JSON record of the device and the versions (torch,
CUDA, cuDNN, NCCL, the driver, the Python packages). Fails (exit 1) when an import fails, or, unless
``--dry-run``, when torch sees no CUDA device: the later stages would then only fail or skip.

    python benchmarks/gpu/env_check.py OUTPUT.json [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

#: import name -> distribution name, for the version record
MODULES = {
    "torch": "torch",
    "lightning": "lightning",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "tensorboard": "tensorboard",
    "yaml": "PyYAML",
    "pytest": "pytest",
    # carried as wheels (benchmarks/gpu/wheels.txt)
    "jsonargparse": "jsonargparse",
    "docstring_parser": "docstring-parser",
    "typeshed_client": "typeshed-client",
    "compressed_tensors": "compressed-tensors",
    "pydantic": "pydantic",
    "loguru": "loguru",
    "typing_extensions": "typing-extensions",
    # the project, from the repository root (PYTHONPATH)
    "cbq_lightning.cli": None,
}


def _driver() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (torch does not report it)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def device_record() -> dict:
    import torch

    record: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "driver": _driver(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        record.update({
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "memory_gib": round(properties.total_memory / 1024**3, 1),
            "multiprocessors": properties.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None,
        })
    else:
        record["name"] = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="a CPU rehearsal: no CUDA device needed")
    args = parser.parse_args(argv)
    versions: dict[str, str | None] = {}
    missing: dict[str, str] = {}
    for module, distribution in MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure to import is what this stage reports
            missing[module] = f"{type(error).__name__}: {error}"
            continue
        if distribution:
            try:
                versions[distribution] = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                versions[distribution] = None
    # Lightning's CLI parser checks jsonargparse[signatures] through the installed metadata, not the imports
    if "lightning" not in missing:
        from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE

        if not _JSONARGPARSE_SIGNATURES_AVAILABLE:
            missing["jsonargparse[signatures]"] = str(_JSONARGPARSE_SIGNATURES_AVAILABLE)
    device = device_record() if "torch" not in missing else {}
    record = {"device": device, "versions": versions, "missing": missing, "executable": sys.executable}
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if missing:
        print(f"cannot import: {', '.join(missing)}", file=sys.stderr)
        return 1
    if not args.dry_run and not device.get("cuda_available"):
        print("torch sees no CUDA device", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

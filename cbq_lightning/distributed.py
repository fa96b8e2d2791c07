"""Calibration over several processes (DDP): who this process is, its shard, and agreeing statistics.

Lightning launches the other ranks at the first ``trainer.fit`` by re-running the same command, so every
rank runs the whole job: it loads the model, draws the same calibration samples (same seed) and keeps
only its shard of them - and of both input caches and the teacher targets. The window's gradients are
all-reduced by DDP; every statistic that decides a parameter outside the optimiser (CFP's channel
maxima, the clip search's input moments, a static activation step's initialisation, the divergence
check) is all-reduced here before use, so all ranks hold the same model at every moment; only rank 0
writes outputs.

Every helper is a no-op in a single process, so the same code runs with and without DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cbq_lightning.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """This process's place in the run: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1
    #: the process's index on its machine: its GPU under DDP
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows ``rank, rank + world, ...`` of ``tensor``: disjoint shards that together cover every row.

        Interleaving makes the union of the ranks' i-th batches the i-th contiguous batch of a
        single-process run with ``world`` times the batch size (without shuffling).
        """
        return tensor[self.rank :: self.world]

    def shard_indices(self, count: int) -> list[int]:
        return list(range(self.rank, count, self.world))


def _devices_per_node(devices: int | str | list[int]) -> int:
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str):
        if devices == "auto":
            return max(torch.cuda.device_count(), 1)
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    return int(devices)


def placement(strategy: str, devices: int | str | list[int], num_nodes: int) -> Placement:
    """The rank this process has (or will have once Lightning launches the others) and the world size.

    Known before any process group exists, from the configuration and the launcher's environment
    (``LOCAL_RANK`` / ``NODE_RANK`` set by Lightning's launcher, or ``RANK`` / ``WORLD_SIZE`` by torchrun).
    """
    if not strategy.startswith("ddp"):
        return Placement()
    per_node = _devices_per_node(devices)
    world = per_node * num_nodes
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Placement(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]), local_rank=local_rank)
    rank = int(os.environ.get("NODE_RANK", 0)) * per_node + local_rank
    return Placement(rank=rank, world=world, local_rank=local_rank)


def uses_cuda(accelerator: str) -> bool:
    """Whether a run with this ``trainer.accelerator`` computes on a CUDA GPU on this machine."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def compute_device(accelerator: str, place: Placement) -> torch.device:
    """The one device this process computes on, outside the fits and inside them: the process's GPU
    (``cuda:LOCAL_RANK``, the device Lightning's strategy gives the same process) when the accelerator allows
    CUDA and there is one, the CPU otherwise. ``validate`` has already refused a GPU accelerator without CUDA."""
    if uses_cuda(accelerator):
        return torch.device("cuda", place.local_rank)
    return torch.device("cpu")


def check_divisible(num_samples: int, world: int) -> None:
    """Equal shards: DDP needs the same number of steps on every rank."""
    if world > 1 and num_samples % world:
        raise ConfigError(
            f"data.num_samples={num_samples} does not split evenly over {world} processes: use a multiple of "
            f"{world} (e.g. {num_samples - num_samples % world or world})."
        )


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) across the ranks; returns ``tensor``. No-op alone.

    Runs on the tensor's device (gloo handles CPU tensors; NCCL needs CUDA ones).
    """
    if not active():
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":  # NCCL reduces CUDA tensors only
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=reduce_op)
        tensor.copy_(staged.to(tensor.device))
    else:
        dist.all_reduce(tensor, op=reduce_op)
    return tensor


def all_gather_objects(value: object) -> list[object]:
    """Every rank's ``value`` (a list of one element alone)."""
    if not active():
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def global_mean(value: float, device: torch.device | str = "cpu") -> float:
    """Mean of a float over the ranks (the value itself alone)."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    all_reduce_(tensor)
    return float(tensor) / dist.get_world_size()

"""Data-parallel runs: which process am I, and how the processes meet.

`torchrun` (also under `accelerate launch --multi_gpu`, which runs it, and across nodes with `--nnodes`) sets
RANK, WORLD_SIZE and LOCAL_RANK in each process; a plain `python -m captioner ...` has none and is rank 0 of 1.
Processes on GPUs take one GPU each (cuda:LOCAL_RANK) and meet over NCCL; processes on CPUs meet over gloo. They
exchange only bookkeeping (counts, per-item records); each one runs its own copy of the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(hours=24)  # a rank that finishes early waits this long for the others at the end


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's part of `items` (each item to exactly one rank): items rank, rank + world, ..."""
        return items[self.rank::self.world]


def start(device: str | None = None) -> tuple[Ranks, str | None]:
    """Join the process group when launched by torchrun; returns this process's ranks and the device its model
    should use (None: `captioner.load`'s default). A single process changes nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= local:
            raise RuntimeError(f"Process {rank} wants GPU {local}, but this node has {torch.cuda.device_count()}: "
                               "start at most one process per GPU (--nproc_per_node), or pass --device cpu.")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return Ranks(rank, world, local), device


def total(ranks: Ranks, *counts: int) -> list[int]:
    """Each count summed over all ranks (every rank must call this the same number of times)."""
    if ranks.world == 1:
        return list(counts)
    device = f"cuda:{ranks.local_rank}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(ranks: Ranks, obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)  # all_gather, not gather: gloo and NCCL both support it for objects
    return out if ranks.main else None


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def stop(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()

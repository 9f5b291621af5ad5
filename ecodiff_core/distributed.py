"""Data-parallel mask learning on ``torch.distributed`` (launched with ``torchrun``).

Every process holds the whole model and the same λ; the calibration prompts are sharded by index
(prompt ``i`` belongs to process ``i mod world_size``).  Each optimiser step takes the same chunk of
the epoch's permutation in every process; a process computes the gradients of the chunk's prompts it
owns, then the λ gradients and the reconstruction loss are summed over processes (``all_reduce``)
before the step.  Gate noise and starting latents are seeded per prompt, not per process, so N
processes take exactly the steps one process takes with the same accumulation (up to the order of
the float sums).  Rank 0 writes the mask; every process resumes from the same file.

Backends: NCCL when the processes use CUDA devices, gloo on CPU.  torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; several machines work as
torchrun arranges them (``--nnodes``, ``--rdzv-endpoint``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SettingsError


@dataclass
class DataParallel:
    """This process's place in a data-parallel run: ``rank`` of ``world_size`` processes."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether prompt ``index`` is computed by this process."""
        return index % self.world_size == self.rank

    def shard(self, count: int) -> list[int]:
        """The prompt indices of ``count`` that this process owns."""
        return [i for i in range(count) if self.owns(i)]

    def all_reduce(self, grads: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Sum ``grads`` (in place) and the 0-dim ``loss`` over all processes; returns the summed loss.
        One collective for all tensors (flattened into one float64 buffer, so sums keep their precision)."""
        flat = torch.cat([g.reshape(-1).double() for g in grads] + [loss.reshape(1).double()])
        if self.world_size > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1].to(loss.dtype)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for_rank(requested: str) -> torch.device:
    """``requested`` ("auto", "cpu", "cuda"); under torchrun a CUDA device is ``cuda:LOCAL_RANK``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError("--device cuda was given but no CUDA device is available; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun() else 0)
    return torch.device(requested)


def start(device: torch.device) -> DataParallel | None:
    """Join the torchrun process group (NCCL for CUDA devices, gloo otherwise); None when this is a
    single process.  Call :func:`stop` at the end."""
    if not launched_by_torchrun():
        return None
    if not dist.is_available():
        raise SettingsError("this torch build has no torch.distributed; run a single process")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size())


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

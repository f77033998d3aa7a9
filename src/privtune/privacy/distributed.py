"""One DP run across processes (torchrun, torch.distributed): what each replica does.

Every rank draws the same Poisson mask (the sampler's generator is seeded alike), so the
logical batch is exactly the single-process one; rank r processes the records at positions
r, r + W, r + 2W... of it. Each rank clips its own records' per-sample gradients; the clipped
sums are all-reduced and the per-sample norms all-gathered, so every rank then holds the
global sum and the global norms. The noise is drawn from the mechanism's generator, seeded
alike on every rank: each rank adds the same draw to the same global sum, i.e. the noise enters
the released gradient exactly once (opacus' DistributedDPOptimizer adds it on rank 0 before the
all-reduce instead; the result is the same, and every rank keeps its generator, DP counts and
controller observations identical). Rank 0 alone writes the ledger, MLflow and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from privtune.lifetime import stop_with_parent


@dataclass(frozen=True)
class Replica:
    """This process's place in the run: rank ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Replica:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's records of a logical batch (every rank sees the same batch)."""
        return indices[self.rank :: self.world_size] if self.distributed else indices

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """All-reduce (sum) the tensors in place, through one flat buffer."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(part.view_as(t))

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows (a variable number each), in rank order."""
        if not self.distributed:
            return rows
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, rows.cpu())
        return torch.cat(parts).to(rows.device)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value on every rank (so every rank applies the same admitted action)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@contextlib.contextmanager
def process_group_from_environment() -> Iterator[Replica]:
    """Join the process group torchrun describes (WORLD_SIZE > 1; gloo on CPU, nccl on CUDA)
    for the block, and leave it on the way out, also on an error: a process that exits still in
    its group makes NCCL warn of pending work and can abort in gloo's threads at exit. A group
    someone else joined (a test's spawned worker) is theirs to leave."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    joined = world > 1 and not dist.is_initialized()
    if joined:
        # torchrun's ranks run in a session of their own and outlived a `kill -9` of it,
        # training on unseen: SIGTERM when it dies stops a rank as an interrupt (its run
        # KILLED; the same command resumes it)
        stop_with_parent()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # NCCL reduces CUDA tensors only: the loss summary and the object collectives
            # (norms, the admitted action) are CPU tensors, which go through gloo
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    try:
        yield Replica.current()
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()

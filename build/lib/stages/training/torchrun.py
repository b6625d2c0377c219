"""This process's place in a `torchrun` job: every rank holds the same weights and draws the same random numbers,
takes its shard of every batch, and sums what must be global; only rank 0 writes files and prints."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Ranks:
    """Rank `rank` of `world` processes (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a batch of n (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (a no-op on one process)."""
        if self.world > 1:
            torch_dist.all_reduce(tensor)
        return tensor

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors, in one message."""
        if self.world > 1 and tensors:
            flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
            torch_dist.broadcast(flat, 0)
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                t.data.copy_(part.view_as(t))


def join(device: str) -> Ranks:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU), once."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(torch_dist.get_rank(), torch_dist.get_world_size())


def leave(ranks: Ranks) -> None:
    """End a torchrun job cleanly: wait for every rank (rank 0 has written its files), then close the group."""
    if ranks.world > 1 and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()

"""Sharing an evaluation among the ranks of a process group.

Rank r encodes the samples i with i % world_size == r; the per-rank results are then gathered (features, in
the global sample order) or summed (counts), so that every rank ends with what one process computes on the
whole set. World sizes that do not divide the set are fine: the shares then differ by one sample.

A sharded (FSDP2) model gathers its parameters inside every encode call, a collective, so every rank must make
the same number of calls: a rank whose share is used up encodes a blank input, and drops the result, until all
ranks are done (`lockstep`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class EvalRanks:
    rank: int = 0
    world_size: int = 1
    # Where tensors for collectives live: the CUDA device under NCCL, else the CPU (gloo).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    @classmethod
    def current(cls, device: torch.device | str = "cpu") -> EvalRanks:
        """The ranks of the default process group (a single rank when there is none). `device`: this rank's
        compute device, used for the collectives when the backend is NCCL."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        comm_device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), comm_device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: Iterable) -> Iterator:
        """This rank's share of `items`: those at positions i with i % world_size == rank."""
        return itertools.islice(items, self.rank, None, self.world_size)

    def lockstep(self, batches: Iterable, encode: Callable, blank: Callable[[], object]) -> Iterator:
        """encode(batch) for each of this rank's batches, then encode(blank()) with the result dropped for as
        long as another rank still has batches: the same number of encode calls on every rank."""
        if not self.distributed:
            yield from map(encode, batches)
            return
        batches = iter(batches)
        while True:
            batch = next(batches, None)
            if not self._any(batch is not None):
                return
            if batch is None:
                encode(blank())
            else:
                yield encode(batch)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (exact for counts: float64)."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.tolist()

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `local` (this rank's share, in order) as one tensor in the global order, on
        every rank, on the CPU. A rank with an empty share may pass a tensor of any shape with 0 rows."""
        if not self.distributed:
            return local.cpu()
        shapes: list = [None] * self.world_size
        dist.all_gather_object(shapes, (tuple(local.shape), local.dtype))
        counts = [shape[0] for shape, _ in shapes]
        total = sum(counts)
        expected = [len(range(r, total, self.world_size)) for r in range(self.world_size)]
        if counts != expected:
            raise ValueError(f"gather: per-rank row counts {counts} are not an i % world_size share of {total} rows")
        with_rows = [(shape, dtype) for shape, dtype in shapes if shape[0]]
        if not with_rows:
            return local.cpu()
        tail, dtype = with_rows[0][0][1:], with_rows[0][1]
        rows = max(counts)
        padded = torch.zeros((rows, *tail), dtype=dtype, device=self.device)
        if local.shape[0]:
            padded[: local.shape[0]] = local.to(self.device, dtype)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        # Row j of rank r is global row j * world_size + r: interleave, then drop the padding at the end.
        return torch.stack(parts, dim=1).reshape(rows * self.world_size, *tail)[:total].cpu()

    def _any(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

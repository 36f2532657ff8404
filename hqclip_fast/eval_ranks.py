"""Sharing an evaluation among the ranks of a process group.

Rank r encodes the samples i with i % world_size == r; the per-rank results are then gathered (features, in
the global sample order) or summed (counts), so that every rank ends with what one process computes on the
whole set. World sizes that do not divide the set are fine: the shares then differ by one sample.

Eval sets in shards are shared before decoding (hqclip_fast.data.build_eval_dataset with rank/world_size: whole
shards per rank where there are at least as many shards as ranks, else samples by tar position):
i counts the samples in the tar structure, so a damaged sample leaves a hole in its rank's share and the shares
of good samples may differ by more than one; their features are gathered by sample index (`gather(index=)`).

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

    def gather(self, local: torch.Tensor, index: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Every rank's rows of `local` as one tensor in the global order, on every rank, on the CPU.

        Without `index`, `local` holds this rank's i % world_size share in order (row j is global row
        j * world_size + rank). With `index` (one global sample index per row, e.g. from
        build_eval_dataset(..., with_index=True)), the shares may have any sizes and the rows come back sorted
        by index; an index held twice is an error (the ranks disagree on the sample order). A rank with no
        rows may pass a tensor of any shape with 0 rows."""
        if index is not None:
            index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
            if index.numel() != local.shape[0]:
                raise ValueError(f"gather: index has {index.numel()} entries for {local.shape[0]} rows")
        parts = self._gather_parts(local)
        counts = [part.shape[0] for part in parts]
        if index is None:
            total = sum(counts)
            expected = [len(range(r, total, self.world_size)) for r in range(self.world_size)]
            if counts != expected:
                raise ValueError(f"gather: per-rank row counts {counts} are not an i % world_size share of "
                                 f"{total} rows")
            indices = [torch.arange(count) * self.world_size + r for r, count in enumerate(counts)]
        else:
            indices = self._gather_parts(index)
        with_rows = [(part, part_index) for part, part_index in zip(parts, indices) if part.shape[0]]
        if not with_rows:
            return local.cpu()
        rows = torch.cat([part for part, _ in with_rows])
        order = torch.cat([part_index for _, part_index in with_rows])
        if order.unique().numel() != order.numel():
            raise ValueError("gather: a sample index is held by more than one row (do the ranks read the same "
                             "shards in the same order?)")
        return rows[order.argsort()]

    def _gather_parts(self, local: torch.Tensor) -> list[torch.Tensor]:
        """[rank 0's rows, rank 1's rows, ...] of `local` (each rank's own count), on the CPU."""
        if not self.distributed:
            return [local.cpu()]
        shapes: list = [None] * self.world_size
        dist.all_gather_object(shapes, (tuple(local.shape), local.dtype))
        counts = [shape[0] for shape, _ in shapes]
        with_rows = [(shape, dtype) for shape, dtype in shapes if shape[0]]
        if not with_rows:
            return [local.cpu() for _ in shapes]
        tail, dtype = with_rows[0][0][1:], with_rows[0][1]
        padded = torch.zeros((max(counts), *tail), dtype=dtype, device=self.device)
        if local.shape[0]:
            padded[: local.shape[0]] = local.to(self.device, dtype)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [part[:count].cpu() for part, count in zip(parts, counts)]

    def _any(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

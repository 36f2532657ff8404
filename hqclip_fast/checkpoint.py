"""Sharded, atomic, resumable training checkpoints (torch.distributed.checkpoint).

Layout of a checkpoint folder `<dir>/step_00000100/`:
- the DCP shards and `.metadata` of {"model": ..., "optim": ...} (sharded under FSDP2: each rank writes its part);
- `rank{r}`: one byte blob per rank with what differs between ranks and is not a tensor to reshard: the
  learning-rate schedule, the data loader's position, the RNG states and the step.

Atomicity: every rank writes into `<dir>/.tmp-step_00000100/`; once all ranks are done, rank 0 renames it to
`step_00000100`. A folder named `step_*` is therefore always complete, and a run killed mid-write (SIGKILL
included) leaves only a `.tmp-*` folder, which the next run deletes. Only the last `keep_last` are kept.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_and_world() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dcp_save(state: dict, path: Path) -> None:
    with warnings.catch_warnings():  # DCP warns that a single process is assumed: that is our intent
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        dcp.save(state, checkpoint_id=str(path), no_dist=not _distributed())


def _dcp_load(state: dict, path: Path, *, no_dist: bool) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_bytes(obj: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _from_bytes(buffer: io.BytesIO) -> Any:
    buffer.seek(0)
    # Our own blob (schedule, loader position, RNG states: plain Python and numpy objects), not user input.
    return torch.load(buffer, weights_only=False)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    match = STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"checkpoint path must end in step_XXXXXXXX, got {path}")
    return int(match.group(1))


class Checkpointer:
    """Saves and restores model, optimizer and per-rank trainer state under `directory`."""

    def __init__(self, directory: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank, self.world_size = _rank_and_world()
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(TMP_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        """Write a checkpoint for `step` (collective: every rank calls it). Returns the final folder."""
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f"{TMP_PREFIX}{final.name}"
        model_sd, optim_sd = get_state_dict(model, optimizer)
        per_rank = {"step": step, "world_size": self.world_size, "rng": rng_state(), **trainer_state}
        state = {"model": model_sd, "optim": optim_sd, f"rank{self.rank}": _to_bytes(per_rank)}
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        _dcp_save(state, tmp)
        _barrier()
        if self.rank == 0:
            if final.exists():  # a previous run saved this step already; ours is just as complete
                shutil.rmtree(final)
            tmp.rename(final)
            for old in list_checkpoints(self.directory)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore model and optimizer in place, set the RNG states, and return this rank's trainer state."""
        path = Path(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        key = f"rank{self.rank}"
        state = {"model": model_sd, "optim": optim_sd, key: io.BytesIO()}
        saved_ranks = _saved_world_size(path)
        if saved_ranks != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {saved_ranks} ranks; resuming it exactly needs the same "
                f"world size, got {self.world_size}"
            )
        _dcp_load(state, path, no_dist=not _distributed())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        per_rank = _from_bytes(state[key])
        set_rng_state(per_rank.pop("rng"))
        return per_rank


def _saved_world_size(path: Path) -> int:
    """Number of per-rank blobs in a checkpoint's metadata."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return sum(1 for key in metadata.state_dict_metadata if re.fullmatch(r"rank\d+", key))


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load only the model part of a training checkpoint into a plain (unsharded) model, on one process."""
    state = {"model": get_model_state_dict(model)}
    _dcp_load(state, Path(path), no_dist=True)
    set_model_state_dict(model, state["model"])

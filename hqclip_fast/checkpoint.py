"""Sharded, atomic, resumable training checkpoints (torch.distributed.checkpoint).

Layout of a checkpoint folder `<dir>/step_00000100/`:
- the DCP shards and `.metadata` of {"model": ..., "optim": ...} (sharded under FSDP2: each rank writes its part);
- `rank{r}.json`: per rank, what differs between ranks and is not a tensor to reshard: the learning-rate
  schedule, the data loader's position, the RNG states (ints, floats and base64 bytes: they round-trip
  exactly) and the step.

A checkpoint loads on another world size too: DCP reshards model and optimizer, and the loader redistributes
the saved ranks' unread data (hqclip_fast.data.loader.TrainLoader.load_elastic).

Loading runs no code from the folder: DCP unpickles `.metadata` and the optimizer's non-tensor entries with
plain pickle, so `.metadata` is first read with only DCP's own metadata classes allowed, and the non-tensor
entries are checked with `weights_only=True` (hqclip_fast.serialization); a refused file is an UnsafeFileError.

Atomicity: every rank writes into `<dir>/.tmp-step_00000100/`; once all ranks are done, rank 0 renames it to
`step_00000100`. A folder named `step_*` is therefore always complete, and a run killed mid-write (SIGKILL
included) leaves only a `.tmp-*` folder, which the next run deletes. Only the last `keep_last` are kept.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from hqclip_fast.serialization import UnsafeFileError, restricted_load, weights_only_load

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
# What DCP's `.metadata` pickle may name: its own metadata classes, torch.Size, dtypes, layouts, paths.
_METADATA_GLOBALS = frozenset(
    {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    | {(module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "WindowsPath")}
    | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
)


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


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that a non-tensor entry (the optimizer's hyperparameters) must load with
    weights_only=True before DCP unpickles it (DCP itself allows any object there)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        weights_only_load(value, f"checkpoint entry {read_item.dest_index.fqn}")
        value.seek(0)
        super().load_bytes(read_item, value)


def _check_metadata(path: Path) -> None:
    """Refuse a `.metadata` that names anything but DCP's metadata types (DCP reads it with plain pickle)."""
    try:
        with open(path / ".metadata", "rb") as f:
            restricted_load(f, _METADATA_GLOBALS, f"{path / '.metadata'}")
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} has no .metadata: not a complete DCP checkpoint") from None


def _dcp_load(state: dict, path: Path, *, no_dist: bool) -> None:
    _check_metadata(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        try:
            dcp.load(state, checkpoint_id=str(path), planner=_WeightsOnlyLoadPlanner(), no_dist=no_dist)
        except CheckpointException as err:  # DCP wraps each rank's error; a refusal should read as one
            refused = [exc for exc, _ in err.failures.values() if isinstance(exc, UnsafeFileError)]
            if refused:
                raise refused[0] from None
            raise


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _tensor_to_text(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _text_to_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """The Python, numpy, torch (and CUDA) RNG states as JSON values that restore them exactly."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"])}
    state = {"python": [version, list(internal), gauss], "numpy": numpy_state,
             "torch": _tensor_to_text(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _tensor_to_text(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": np.array(numpy_state["state"]["key"], dtype=np.uint32),
                                                  "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(_text_to_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_text_to_tensor(state["cuda"]))


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank{rank}.json"


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
        per_rank = json.dumps({"step": step, "world_size": self.world_size, "rng": rng_state(), **trainer_state})
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        _dcp_save({"model": model_sd, "optim": optim_sd}, tmp)
        _rank_file(tmp, self.rank).write_text(per_rank + "\n")
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
        """Restore model and optimizer in place and return this rank's trainer state, with its RNG states set.

        Another world size (an elastic resume) is allowed: DCP reshards model and optimizer to this run's
        layout; the trainer state returned is then rank 0's (step and schedule are the same on every rank) and
        the RNG states are not set (there is no saved rank to take them from; the generators keep this run's
        seeding). `saved_states` gives every saved rank's trainer state (the loader resumes from all of them)."""
        path = Path(path)
        saved_ranks = self._saved_ranks(path)
        same_world = saved_ranks == self.world_size
        per_rank = json.loads(_rank_file(path, self.rank if same_world else 0).read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        _dcp_load(state, path, no_dist=not _distributed())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = per_rank.pop("rng")
        if same_world:
            set_rng_state(rng)
        return per_rank

    def saved_states(self, path: str | Path) -> Iterator[dict]:
        """Every saved rank's trainer state (RNG states left out), in rank order, read one at a time."""
        path = Path(path)
        for rank in range(self._saved_ranks(path)):
            state = json.loads(_rank_file(path, rank).read_text())
            state.pop("rng")
            yield state

    @staticmethod
    def _saved_ranks(path: Path) -> int:
        saved_ranks = sum(1 for p in path.iterdir() if re.fullmatch(r"rank\d+\.json", p.name))
        if saved_ranks == 0:
            raise ValueError(f"checkpoint {path} has no rank*.json trainer state: not a checkpoint of this "
                             "version of hqclip-fast (older ones kept that state in a pickle, no longer loaded)")
        return saved_ranks


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load only the model part of a training checkpoint into a plain (unsharded) model, on one process."""
    state = {"model": get_model_state_dict(model)}
    _dcp_load(state, Path(path), no_dist=True)
    set_model_state_dict(model, state["model"])

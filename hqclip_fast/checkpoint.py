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

The folder `<dir>` may be a local path or any fsspec URL (`s3://bucket/run/checkpoints`, `gs://...`,
`file://...`, `memory://...`): file operations go through fsspec, the shards through DCP's FsspecWriter /
FsspecReader (a local path keeps DCP's FileSystemWriter / Reader).

Atomicity without renaming folders (object stores cannot rename one atomically): every rank writes its
`rank{r}.json` into `step_00000100/`, then the DCP shards; DCP's coordinator writes `.metadata` last, once
every rank has reported its shards written, as one atomic file creation. A `step_*` folder counts as a
checkpoint only when it holds `.metadata`, so a run killed mid-write (SIGKILL included) leaves a folder that is
never picked, and that the next run deletes (with any `.tmp-*` folder of older versions). Only the last
`keep_last` are kept.

Asynchronous saves (`asynchronous=True`): `save` copies the state to CPU memory (DCP's stager), writes the
small per-rank JSON, and returns while a background thread writes the shards (`dcp.async_save`, its
collectives on a gloo group of their own so they never interleave with the training's); training goes on.
The checkpoint is complete when its `.metadata` appears; rank 0 then drops the oldest ones at the next
`poll()` (the trainer calls it every step), the next `save` (a second save first waits for the first) or
`wait()`.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
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


Location = Path | str  # a local folder, or an fsspec URL


def as_location(directory: str | Path) -> Location:
    """A local folder as a Path; an fsspec URL ("s3://...", "file://...") as the URL string."""
    text = str(directory)
    return text.rstrip("/") if "://" in text else Path(text)


def _join(base: Location, name: str) -> Location:
    return base / name if isinstance(base, Path) else f"{base}/{name}"


def _fs(location: Location):
    return fsspec.core.url_to_fs(str(location))[0]


def _exists(location: Location) -> bool:
    return _fs(location).exists(str(location))


def _remove(location: Location) -> None:
    if _exists(location):
        _fs(location).rm(str(location), recursive=True)


def _names(directory: Location) -> list[str]:
    """Names of the entries of `directory` ([] when it does not exist)."""
    if not _exists(directory):
        return []
    return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in _fs(directory).ls(str(directory), detail=False)]


def _write_text(location: Location, text: str) -> None:
    with _fs(location).open(str(location), "w") as f:
        f.write(text)


def _read_text(location: Location) -> str:
    with _fs(location).open(str(location), "r") as f:
        return f.read()


def _dcp_save(state: dict, path: Location, *, asynchronous: bool = False, group=None):
    """dcp.save, or dcp.async_save returning its Future."""
    writer = FileSystemWriter(path) if isinstance(path, Path) else FsspecWriter(path)
    with warnings.catch_warnings():  # DCP warns that a single process is assumed: that is our intent
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        if asynchronous:
            return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=not _distributed())
        dcp.save(state, storage_writer=writer, no_dist=not _distributed())
        return None


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that a non-tensor entry (the optimizer's hyperparameters) must load with
    weights_only=True before DCP unpickles it (DCP itself allows any object there)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        weights_only_load(value, f"checkpoint entry {read_item.dest_index.fqn}")
        value.seek(0)
        super().load_bytes(read_item, value)


def _check_metadata(path: Location) -> None:
    """Refuse a `.metadata` that names anything but DCP's metadata types (DCP reads it with plain pickle)."""
    metadata = _join(path, ".metadata")
    try:
        with _fs(metadata).open(str(metadata), "rb") as f:
            restricted_load(f, _METADATA_GLOBALS, str(metadata))
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} has no .metadata: not a complete DCP checkpoint") from None


def _dcp_load(state: dict, path: Location, *, no_dist: bool) -> None:
    _check_metadata(path)
    reader = FileSystemReader(path) if isinstance(path, Path) else FsspecReader(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        try:
            dcp.load(state, storage_reader=reader, planner=_WeightsOnlyLoadPlanner(), no_dist=no_dist)
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


def _rank_file(path: Location, rank: int) -> Location:
    return _join(path, f"rank{rank}.json")


def _step_folders(directory: Location) -> list[Location]:
    return [_join(directory, name) for name in _names(directory) if STEP_DIR.match(name)]


def list_checkpoints(directory: str | Path) -> list[Location]:
    """Complete checkpoints in `directory` (a path or an fsspec URL), oldest first: step folders with
    `.metadata` (see the module docstring)."""
    found = [p for p in _step_folders(as_location(directory)) if _exists(_join(p, ".metadata"))]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(directory: str | Path) -> Location | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    match = STEP_DIR.match(str(path).rstrip("/").rsplit("/", 1)[-1])
    if match is None:
        raise ValueError(f"checkpoint path must end in step_XXXXXXXX, got {path}")
    return int(match.group(1))


class Checkpointer:
    """Saves and restores model, optimizer and per-rank trainer state under `directory` (a path or an fsspec
    URL)."""

    def __init__(self, directory: str | Path, keep_last: int = 2, *, asynchronous: bool = False):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = as_location(directory)
        self.keep_last = keep_last
        self.asynchronous = asynchronous
        self.rank, self.world_size = _rank_and_world()
        self._in_flight = None  # (future, tmp folder, final folder) of an asynchronous save
        # Collective on every rank, here where all ranks are: the background writes' own CPU group.
        self._group = dist.new_group(backend="gloo") if asynchronous and _distributed() else None
        if self.rank == 0:  # what a killed run left: incomplete step folders, and older versions' tmp folders
            _fs(self.directory).makedirs(str(self.directory), exist_ok=True)
            complete = set(map(str, list_checkpoints(self.directory)))
            for name in _names(self.directory):
                stale = _join(self.directory, name)
                if name.startswith(TMP_PREFIX) or (STEP_DIR.match(name) and str(stale) not in complete):
                    _remove(stale)
        _barrier()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict) -> Location:
        """Write a checkpoint for `step` (collective: every rank calls it). Returns its folder, complete on
        return, or once `wait()` returns when asynchronous."""
        self.wait()
        folder = _join(self.directory, f"step_{step:08d}")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        per_rank = json.dumps({"step": step, "world_size": self.world_size, "rng": rng_state(), **trainer_state})
        if self.rank == 0:
            _remove(folder)  # a previous run saved this step already; ours is just as complete
            _fs(folder).makedirs(str(folder), exist_ok=True)
        _barrier()
        _write_text(_rank_file(folder, self.rank), per_rank + "\n")  # before the shards: .metadata comes last
        future = _dcp_save({"model": model_sd, "optim": optim_sd}, folder, asynchronous=self.asynchronous,
                           group=self._group)
        if future is not None:
            self._in_flight = future
            return folder
        if self.rank == 0:
            self._drop_old()
        _barrier()
        return folder

    def _drop_old(self) -> None:
        """Rank 0: the oldest complete checkpoints beyond keep_last go."""
        for old in list_checkpoints(self.directory)[: -self.keep_last]:
            _remove(old)

    def poll(self) -> None:
        """Finish an asynchronous save whose write is done; never blocks (not collective)."""
        if self._in_flight is not None and self._in_flight.done():
            self.wait()

    def wait(self) -> None:
        """Block until an asynchronous save in flight is complete (a write error is raised here)."""
        if self._in_flight is None:
            return
        future, self._in_flight = self._in_flight, None
        future.result()
        if self.rank == 0:
            self._drop_old()

    def load(self, path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore model and optimizer in place and return this rank's trainer state, with its RNG states set.

        Another world size (an elastic resume) is allowed: DCP reshards model and optimizer to this run's
        layout; the trainer state returned is then rank 0's (step and schedule are the same on every rank) and
        the RNG states are not set (there is no saved rank to take them from; the generators keep this run's
        seeding). `saved_states` gives every saved rank's trainer state (the loader resumes from all of them)."""
        path = as_location(path)
        saved_ranks = self._saved_ranks(path)
        same_world = saved_ranks == self.world_size
        per_rank = json.loads(_read_text(_rank_file(path, self.rank if same_world else 0)))
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
        path = as_location(path)
        for rank in range(self._saved_ranks(path)):
            state = json.loads(_read_text(_rank_file(path, rank)))
            state.pop("rng")
            yield state

    @staticmethod
    def _saved_ranks(path: Location) -> int:
        saved_ranks = sum(1 for name in _names(path) if re.fullmatch(r"rank\d+\.json", name))
        if saved_ranks == 0:
            raise ValueError(f"checkpoint {path} has no rank*.json trainer state: not a checkpoint of this "
                             "version of hqclip-fast (older ones kept that state in a pickle, no longer loaded)")
        return saved_ranks


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load only the model part of a training checkpoint into a plain (unsharded) model, on one process."""
    state = {"model": get_model_state_dict(model)}
    _dcp_load(state, as_location(path), no_dist=True)
    set_model_state_dict(model, state["model"])

"""Reading files that others hand you without running their code.

Weights files (exports, `model.pretrained`, `hqclip-eval --pretrained`) are safetensors files or state dicts
written by `torch.save`; the latter are read with `weights_only=True`, which refuses a pickle that names anything
but tensors and plain containers. Pickled metadata that is not weights (DCP's `.metadata`) is read by
`restricted_load`, which resolves only the classes it is given. Either way a refused file is an UnsafeFileError
and nothing in it has run.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Collection
from pathlib import Path
from typing import IO, Any

import torch

SAFETENSORS_SUFFIX = ".safetensors"
DDP_PREFIX = "module."  # DistributedDataParallel's name prefix in open_clip_train checkpoints


class UnsafeFileError(ValueError):
    """A file holds a pickle that could run code when loaded; it was not loaded."""


def weights_only_load(source: str | Path | IO[bytes], what: str) -> Any:
    """torch.load(weights_only=True), with a refusal raised as UnsafeFileError naming `what`."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is long advice on loading it anyway; keep only what it found.
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", str(err))
        reason = found.group(1).strip() if found else str(err).splitlines()[0]
        raise UnsafeFileError(f"refusing to load {what}: it is not plain tensors and containers, and loading it "
                              f"could run code (weights_only=True: {reason})") from None
    except RuntimeError as err:
        if "TorchScript" not in str(err):
            raise
        raise UnsafeFileError(f"refusing to load {what}: it is a TorchScript (JIT) archive, whose loading runs its "
                              "code; use the same weights as a state dict (open_clip's pretrained tags load OpenAI's "
                              "weights from their Hugging Face copies, which are)") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a `torch.save` file (read with weights_only=True): a bare state
    dict, or an open_clip_train checkpoint (`epoch_N.pt`: {"epoch", "name", "state_dict", "optimizer", ...}, whose
    weights are taken and whose DDP `module.` prefix is dropped)."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        return load_file(path)
    state = weights_only_load(path, str(path))
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors) or an open_clip training checkpoint "
                         f"(a dict with 'state_dict'), got {type(state).__name__}")
    if state and all(key.startswith(DDP_PREFIX) for key in state):
        state = {key[len(DDP_PREFIX):]: value for key, value in state.items()}
    return state


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as safetensors (by the `.safetensors` suffix) or with torch.save."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], allowed: Collection[tuple[str, str]], what: str):
        super().__init__(file)
        self.allowed, self.what = allowed, what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafeFileError(f"refusing to load {self.what}: its pickle refers to {module}.{name}, which is "
                                  "not one of the types this file may hold, and loading it could run code")
        return super().find_class(module, name)


def restricted_load(file: IO[bytes], allowed: Collection[tuple[str, str]], what: str) -> Any:
    """Unpickle `file`, resolving only the (module, name) globals in `allowed` (the restricted-globals recipe of
    Python's pickle documentation): a pickle naming any other callable is refused before anything runs."""
    return _RestrictedUnpickler(file, allowed, what).load()

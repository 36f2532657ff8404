"""Where `model.pretrained` points, resolved the way open_clip resolves `--pretrained`, and the weights loaded.

A spec is one of:
- a weights file: `.safetensors`, a bare state dict or an open_clip_train checkpoint (`epoch_N.pt`), read
  without running code (hqclip_fast.serialization);
- a folder holding one (an `hqclip-export` folder, a Hugging Face snapshot folder), `local-dir:` optional;
  open_clip's file-name preference picks among several;
- `hf-hub:org/name` (or `hf-hub:org/name/file.bin`): the Hugging Face cache first (`cache_dir`, else the hub's
  default cache), then a download through open_clip, unless the hub is offline (HF_HUB_OFFLINE=1);
- an open_clip pretrained tag for the model name (`openai`, `laion2b_s32b_b82k`, ...): open_clip's table gives
  its Hugging Face repository (every tag of the model names we build has one), then as `hf-hub:`.
Anything not found is one FileNotFoundError naming every place looked at.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from torch import nn

from hqclip_fast.model import load_open_clip_state_dict
from hqclip_fast.serialization import load_weights

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
# open_clip's preference among the weights files of one folder (open_clip.factory, 3.3.0).
PREFERRED_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                   "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                   "pytorch_model.bin", "pytorch_model.pth", "model.pth")
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise ValueError("model.pretrained: hf-hub: names and open_clip pretrained tags are resolved by open_clip: "
                         "pip install 'hqclip-fast[openclip]' (or point model.pretrained at a weights file)") from None
    return open_clip


def weights_in_folder(folder: Path) -> Path:
    """The weights file of a folder: open_clip's preferred names first, else the only weights file."""
    for name in PREFERRED_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
    if len(found) != 1:
        raise FileNotFoundError(f"model.pretrained: folder {folder} holds {len(found)} weights files "
                                f"({[p.name for p in found]}), none of open_clip's names {list(PREFERRED_FILES)}; "
                                "name the file")
    return found[0]


def hub_file_names(filename: str | None) -> list[str]:
    """The files open_clip tries in a Hugging Face repository, safetensors first (open_clip's
    download_pretrained_from_hf): the default pair, or a named file with its .safetensors twin."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def resolve_hub(repo_and_file: str, cache_dir: str | None) -> Path:
    """`org/name` or `org/name/file`: from the Hugging Face cache, else downloaded through open_clip."""
    import_open_clip()  # brings huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub import try_to_load_from_cache

    parts = repo_and_file.strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"model.pretrained: hf-hub:{repo_and_file} must be hf-hub:org/name[/file]")
    repo_id, filename = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    names = hub_file_names(filename)
    for name in names:
        cached = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached)
    cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
    looked = f"looked for {names} of {repo_id} in the Hugging Face cache {cache}"
    if huggingface_hub.is_offline_mode():
        raise FileNotFoundError(f"model.pretrained: {looked}: not there, and the hub is offline (HF_HUB_OFFLINE); "
                                "download it where there is a network or point model.pretrained at the file")
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        return Path(download_pretrained_from_hf(repo_id, filename=names[-1], cache_dir=cache_dir))
    except Exception as err:  # open_clip wraps every hub failure (network, missing repo) the same way
        raise FileNotFoundError(f"model.pretrained: {looked}: not there, and downloading failed: {err}") from None


def resolve_pretrained(spec: str, model_name: str, cache_dir: str | None = None) -> Path:
    """The weights file that `spec` names for a model called `model_name` (see the module docstring)."""
    if spec.startswith(HF_HUB_PREFIX):
        return resolve_hub(spec[len(HF_HUB_PREFIX):], cache_dir)
    path = Path(spec[len(LOCAL_DIR_PREFIX):] if spec.startswith(LOCAL_DIR_PREFIX) else spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return weights_in_folder(path)
    open_clip = import_open_clip()
    tag_cfg = open_clip.get_pretrained_cfg(model_name, spec)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise FileNotFoundError(f"model.pretrained={spec!r}: no such file or folder, not hf-hub:org/name, and not "
                                f"an open_clip pretrained tag of {model_name} (its tags: {tags})")
    if not tag_cfg.get("hf_hub"):
        raise FileNotFoundError(f"model.pretrained={spec!r}: open_clip's tag for {model_name} has no Hugging Face "
                                f"copy (only {tag_cfg.get('url')}); download it and point model.pretrained at it")
    return resolve_hub(tag_cfg["hf_hub"], cache_dir)


def load_pretrained(model: nn.Module, spec: str, model_name: str, cache_dir: str | None = None) -> Path:
    """Resolve `spec`, load its weights into `model` strictly, positional embeddings resized to the model's image
    size and context length as open_clip does. Returns the file read."""
    path = resolve_pretrained(spec, model_name, cache_dir)
    is_tag = not (Path(spec).exists() or spec.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)))
    tag_cfg = import_open_clip().get_pretrained_cfg(model_name, spec) if is_tag else {}
    if tag_cfg and tag_cfg.get("quick_gelu", False) != model.config.quick_gelu:  # open_clip warns the same
        warnings.warn(f"pretrained tag {spec!r} was trained with quick_gelu={tag_cfg.get('quick_gelu', False)} but "
                      f"the model has quick_gelu={model.config.quick_gelu}: use the -quickgelu twin name or the "
                      "plain one to match", stacklevel=2)
    log.info("loading pretrained weights from %s", path)
    load_open_clip_state_dict(model, load_weights(path), resize_positional=True)
    return path

"""Streaming raw shards in webdataset layout: ``KEY.jpg`` (or png/webp/...) with its alt-text in ``KEY.txt``
(img2dataset), or in ``KEY.json``: its ``alt_text`` field (this project's shards: ``hqclip-data synthetic`` and
``join`` write the annotation record) or its ``caption`` field (img2dataset's metadata).

Samples are yielded with their raw image bytes; decoding is the runner's job, so an unreadable image becomes
an error record there instead of stopping the stream.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class RawSample:
    key: str
    image: bytes | None  # None when the shard has no image member for this key
    alt_text: str
    alt_text_error: str | None = None  # why no alt-text could be read, e.g. a broken .json


def expand_shards(pattern: str | list[str]) -> list[str]:
    """Brace patterns (``shard-{000000..000009}.tar``) and globs, expanded, de-duplicated and sorted."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    paths = set()
    for item in patterns:
        for path in braceexpand.braceexpand(item):
            if glob.has_magic(path):
                paths.update(glob.glob(path))
            else:
                paths.add(path)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"input names files that do not exist: {sorted(missing)[:5]}")
    if not paths:
        raise ValueError(f"input {pattern!r} matches no shard")
    return sorted(paths)


def shard_name(path: str) -> str:
    """The output name of a shard: its file name without ``.tar``."""
    name = os.path.basename(path)
    return name[: -len(".tar")] if name.endswith(".tar") else name


def _split_member(name: str) -> tuple[str, str]:
    # webdataset convention: the key is everything before the first dot of the file name.
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, ext.lower()


JSON_ALT_TEXT_FIELDS = ("alt_text", "caption")  # the first one present is the alt-text


def _alt_text(members: dict[str, bytes]) -> tuple[str, str | None]:
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace").strip(), None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return "", f"unreadable .json: {exc}"
        if not isinstance(meta, dict):
            return "", f".json holds a {type(meta).__name__}, not an object"
        field = next((f for f in JSON_ALT_TEXT_FIELDS if meta.get(f) is not None), None)
        if field is None:
            return "", None
        if not isinstance(meta[field], str):
            return "", f".json field {field!r} is a {type(meta[field]).__name__}, not a string"
        return meta[field].strip(), None
    return "", None


def _to_sample(key: str, members: dict[str, bytes]) -> RawSample:
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    alt_text, alt_error = _alt_text(members)
    return RawSample(key, members[image_ext] if image_ext else None, alt_text, alt_error)


def iter_shard(path: str) -> Iterator[RawSample]:
    """The samples of one tar shard in file order. Members of one sample must be adjacent, as webdataset
    writers (img2dataset included) produce them."""
    key, members = None, {}
    with tarfile.open(path, "r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, ext = _split_member(info.name)
            if member_key != key and key is not None:
                yield _to_sample(key, members)
                members = {}
            key = member_key
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield _to_sample(key, members)

"""Evaluation sets in clip_benchmark's webdataset layout: what its `wds/<name>` datasets read, what DataComp's
evaluation downloads and what `clip_benchmark_export_wds` writes.

    <root>/classnames.txt                         classification: the name of class i on line i
    <root>/zeroshot_classification_templates.txt  classification: one prompt per line, the class name as {c}
    <root>/dataset_type.txt                       "retrieval" for image-caption sets (absent: classification)
    <root>/<split>/nshards.txt                    n, the number of shards <split>/0.tar .. <split>/{n-1}.tar
    a sample: an image (webp, png, jpg or jpeg) and `cls` (its label, as text) or `txt` (its captions, one a
    line; a newline inside a caption is written as a literal backslash-n, as clip_benchmark's converter does);
    WILDS's and the fairness sets also `npy` (the sample's metadata, a 1-D integer array)

Text files are read as clip_benchmark reads them: split into lines, each stripped.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .synthetic import (
    ZEROSHOT_TEMPLATES,
    add_tar_member,
    make_association_example,
    make_retrieval_sample,
    make_zeroshot_sample,
    zeroshot_classnames,
)
from .winogavil import write_association_set

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
KINDS = ("classification", "retrieval")
# clip_benchmark's default --num_workers. Its webdataset gives each DataLoader worker its own shards and stops
# with "No samples found" when one gets none, so a set read with its defaults needs at least this many shards.
CLIP_BENCHMARK_WORKERS = 4


@dataclass(frozen=True)
class BenchmarkSet:
    root: str
    split: str
    kind: str  # "classification" | "retrieval"
    shards: str  # brace pattern of the split's tar files
    classnames: list[str] | None = None
    templates: list[str] | None = None


def _lines(path: Path, what: str) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if not lines:
        raise ValueError(f"{what}: {path} is empty")
    if "" in lines:
        raise ValueError(f"{what}: {path} has a blank line {lines.index('') + 1}")
    return lines


def read_benchmark_set(root: str | Path, split: str = "test") -> BenchmarkSet:
    """The set under `root`. FileNotFoundError when the split or one of its shards is not there; ValueError
    when the set is there but cannot be evaluated (a multi-label set, missing class names or templates)."""
    root = Path(root)
    nshards = root / split / "nshards.txt"
    if not nshards.is_file():
        raise FileNotFoundError(f"{root}: no {split}/nshards.txt (not a clip_benchmark webdataset set, or no "
                                f"'{split}' split)")
    count = int(nshards.read_text().strip())
    missing = [f"{i}.tar" for i in range(count) if not (root / split / f"{i}.tar").is_file()]
    if count < 1 or missing:
        raise FileNotFoundError(f"{root}: {split}/nshards.txt lists {count} shards, missing "
                                f"{', '.join(missing[:3]) or 'all'}{' ...' if len(missing) > 3 else ''}")
    kind = (root / TYPE_FILE).read_text().strip().lower() if (root / TYPE_FILE).is_file() else "classification"
    if kind not in KINDS:
        raise ValueError(f"{root}: {TYPE_FILE} says {kind!r}; only {' and '.join(KINDS)} sets are evaluated")
    shards = str(root / split / (f"{{0..{count - 1}}}.tar" if count > 1 else "0.tar"))
    if kind == "retrieval":
        return BenchmarkSet(str(root), split, kind, shards)
    for name in (CLASSNAMES_FILE, TEMPLATES_FILE):
        if not (root / name).is_file():
            raise ValueError(f"{root}: a classification set needs {name}")
    return BenchmarkSet(str(root), split, kind, shards, _lines(root / CLASSNAMES_FILE, "classnames"),
                        _lines(root / TEMPLATES_FILE, "templates"))


def write_benchmark_set(root: str | Path, samples: Iterable[tuple], *,
                        split: str = "test", classnames: Sequence[str] | None = None,
                        templates: Sequence[str] | None = None, shard_size: int = 10_000) -> BenchmarkSet:
    """Write (image bytes, image extension, label or captions[, metadata array]) samples under `root`: a
    classification set when `classnames` and `templates` (class name as {c}) are given, else a retrieval set."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if (classnames is None) != (templates is None):
        raise ValueError("a classification set needs both classnames and templates")
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    if classnames is None:
        (root / TYPE_FILE).write_text("retrieval\n")
    else:
        (root / CLASSNAMES_FILE).write_text("".join(f"{name}\n" for name in classnames))
        (root / TEMPLATES_FILE).write_text("".join(f"{template}\n" for template in templates))
    count, tar = 0, None
    for index, (image, extension, target, *metadata) in enumerate(samples):
        if index % shard_size == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(root / split / f"{count}.tar", "w", format=tarfile.USTAR_FORMAT)
            count += 1
        key = f"s{index:07d}"
        add_tar_member(tar, f"{key}.{extension}", image)
        if isinstance(target, int):
            add_tar_member(tar, f"{key}.cls", str(target).encode())
        else:
            add_tar_member(tar, f"{key}.txt", "\n".join(c.replace("\n", "\\n") for c in target).encode())
        if metadata:
            add_tar_member(tar, f"{key}.npy", _npy_bytes(metadata[0]))
    if tar is None:
        raise ValueError("write_benchmark_set: no samples")
    tar.close()
    (root / split / "nshards.txt").write_text(f"{count}\n")
    return read_benchmark_set(root, split)


def _npy_bytes(array) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()


def write_synthetic_benchmark(out_dir: str | Path, *, num_zeroshot: int = 600, num_retrieval: int = 500,
                              num_association: int = 40, seed: int = 0, image_size: int = 64,
                              shard_size: int | None = None) -> dict[str, str]:
    """The synthetic zero-shot set (lossless WebP images, as clip_benchmark's converter writes them) and the
    synthetic retrieval set (JPEG) as clip_benchmark sets under out_dir/zeroshot and out_dir/retrieval, and a
    WinoGAViL-style set in hqclip_fast.data.winogavil's layout under out_dir/winogavil (PNG images).
    shard_size None: each set in CLIP_BENCHMARK_WORKERS shards, so that clip_benchmark's defaults read it."""
    out_dir = Path(os.path.abspath(out_dir))
    sizes = {name: shard_size or max(1, -(-count // CLIP_BENCHMARK_WORKERS))
             for name, count in (("zeroshot", num_zeroshot), ("retrieval", num_retrieval))}
    zeroshot = write_benchmark_set(
        out_dir / "zeroshot",
        ((image, "webp", label) for image, label in
         (make_zeroshot_sample(i, seed, image_size, "webp") for i in range(num_zeroshot))),
        classnames=zeroshot_classnames(), templates=[t.replace("{}", "{c}") for t in ZEROSHOT_TEMPLATES],
        shard_size=sizes["zeroshot"])
    retrieval = write_benchmark_set(
        out_dir / "retrieval",
        ((image, "jpg", captions) for image, captions in
         (make_retrieval_sample(i, seed, image_size) for i in range(num_retrieval))),
        shard_size=sizes["retrieval"])
    association = write_association_set(
        out_dir / "winogavil", (make_association_example(i, seed, image_size) for i in range(num_association)))
    return {"zeroshot": zeroshot.root, "retrieval": retrieval.root, "winogavil": association["root"]}

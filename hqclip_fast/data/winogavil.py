"""WinoGAViL (DataComp's 38th task) as a local folder the eval suite reads, and its converter from Hugging Face.

An example is a cue word, 5 to 12 candidate images named by words, and the candidates that go with the cue (its
associations). The layout (written by `hqclip-data winogavil --out ROOT`):

    <root>/dataset_type.txt   "association"
    <root>/<split>.jsonl      one example a line: {"cue": str, "candidates": [str, ...],
                              "associations": [str, ...] (among the candidates), "images": [path, ...]
                              (one per candidate, relative to root)}
    <root>/images/            the candidate images, each named by the SHA-1 of its bytes (a picture that
                              several examples share is stored once)

DataComp reads the Hugging Face set nlphuji/winogavil, split "test" (3,563 examples), with `datasets` at
evaluation time; here it is converted once, so that evaluation needs neither the network nor `datasets`.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

TYPE_FILE = "dataset_type.txt"
KIND = "association"
IMAGES_DIR = "images"
FIELDS = ("cue", "candidates", "associations", "images")
HF_NAME = "nlphuji/winogavil"


@dataclass(frozen=True)
class AssociationExample:
    cue: str
    candidates: tuple[str, ...]
    associated: tuple[bool, ...]  # per candidate: is it one of the cue's associations
    images: tuple[str, ...]  # per candidate: the image file's absolute path


@dataclass(frozen=True)
class AssociationSet:
    root: str
    split: str
    examples: list[AssociationExample]


def is_association_root(root: str | Path) -> bool:
    """Whether `root`'s dataset_type.txt says it holds this layout."""
    path = Path(root) / TYPE_FILE
    return path.is_file() and path.read_text().strip().lower() == KIND


def _names(value, field: str, where: str) -> list[str]:
    """A list of non-empty distinct strings; a string holding a list literal (the set card's "string" fields,
    e.g. "['bison', 'beard']") is parsed."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: `{field}` is a string that is not a list: {value[:80]!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: `{field}` must be a list of non-empty strings, got {value!r:.120}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: `{field}` names a candidate twice: {value!r}")
    return list(value)


def _checked(record, where: str) -> tuple[str, list[str], list[str]]:
    """(cue, candidates, associations) of a record, or a ValueError that says what is wrong."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: an example must be a JSON object, got {type(record).__name__}")
    if missing := [f for f in FIELDS[:3] if f not in record]:
        raise ValueError(f"{where}: missing field(s) {missing} (an example has {', '.join(FIELDS)})")
    cue = record["cue"]
    if not isinstance(cue, str) or not cue.strip():
        raise ValueError(f"{where}: `cue` must be a non-empty string, got {cue!r}")
    candidates = _names(record["candidates"], "candidates", where)
    associations = _names(record["associations"], "associations", where)
    if len(candidates) < 2:
        raise ValueError(f"{where}: needs at least 2 candidates, got {candidates}")
    if not associations:
        raise ValueError(f"{where}: `associations` is empty (nothing to select)")
    if strangers := [a for a in associations if a not in candidates]:
        raise ValueError(f"{where}: associations {strangers} are not among the candidates {candidates}")
    return cue, candidates, associations


def read_association_set(root: str | Path, split: str = "test") -> AssociationSet:
    """The examples of `<root>/<split>.jsonl`. FileNotFoundError when the file is not there; ValueError naming
    the line of a malformed example or of a missing image file."""
    root = Path(root)
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {split}.jsonl (write the set with `hqclip-data winogavil --out "
                                f"{root}`)")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            where = f"{path}:{number}"
            if not line.strip():
                raise ValueError(f"{where}: blank line")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON: {err}") from None
            cue, candidates, associations = _checked(record, where)
            images = record.get("images")
            if not isinstance(images, list) or len(images) != len(candidates) or \
                    not all(isinstance(i, str) and i and not os.path.isabs(i) for i in images):
                raise ValueError(f"{where}: `images` must list one path relative to {root} per candidate "
                                 f"({len(candidates)}), got {images!r:.200}")
            if missing := [i for i in images if not (root / i).is_file()]:
                raise ValueError(f"{where}: missing image file(s) {missing} under {root}")
            examples.append(AssociationExample(cue, tuple(candidates), tuple(c in associations for c in candidates),
                                               tuple(str(root / i) for i in images)))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return AssociationSet(str(root), split, examples)


def _image_bytes(image, where: str) -> bytes:
    """The encoded bytes of a candidate image as a Hugging Face row gives it: a decoded PIL image (saved as
    PNG, losslessly), a {"bytes", "path"} dict (the bytes, else the file at path) or a file path."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, Mapping) and image.get("bytes") is not None:
        return bytes(image["bytes"])
    path = image.get("path") if isinstance(image, Mapping) else image
    if not isinstance(path, (str, os.PathLike)) or not path:
        raise ValueError(f"{where}: expected a PIL image, a {{'bytes', 'path'}} dict or a path, got "
                         f"{type(image).__name__}")
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{where}: cannot read {path}: {err}") from None


def _extension(data: bytes, where: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            image_format = img.format
    except Exception as err:  # PIL raises many kinds of errors for undecodable data
        raise ValueError(f"{where}: not a readable image: {err}") from None
    return {"JPEG": "jpg"}.get(image_format, image_format.lower())


def write_association_set(root: str | Path, rows: Iterable[Mapping], split: str = "test") -> dict:
    """Write rows shaped like nlphuji/winogavil's (cue, candidates, associations, candidate_images: one image per
    candidate) in this module's layout; returns counts. A malformed row stops the conversion with a ValueError
    naming it, and no <split>.jsonl is left behind."""
    root = Path(root)
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    target = root / f"{split}.jsonl"
    partial = target.with_name(target.name + ".partial")
    examples = images_written = 0
    with partial.open("w", encoding="utf-8") as out:
        for index, row in enumerate(rows):
            where = f"row {index}"
            cue, candidates, associations = _checked(row, where)
            if "candidate_images" not in row:
                raise ValueError(f"{where}: missing field candidate_images")
            images = row["candidate_images"]
            if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or \
                    len(images) != len(candidates):
                raise ValueError(f"{where}: `candidate_images` must hold one image per candidate "
                                 f"({len(candidates)})")
            paths = []
            for candidate, image in zip(candidates, images):
                data = _image_bytes(image, f"{where}, image of {candidate!r}")
                name = f"{IMAGES_DIR}/{hashlib.sha1(data).hexdigest()}." \
                       f"{_extension(data, f'{where}, image of {candidate!r}')}"
                if not (root / name).is_file():
                    (root / name).write_bytes(data)
                    images_written += 1
                paths.append(name)
            out.write(json.dumps({"cue": cue, "candidates": candidates, "associations": associations,
                                  "images": paths}) + "\n")
            examples += 1
    if not examples:
        partial.unlink()
        raise ValueError("write_association_set: no rows")
    partial.replace(target)
    (root / TYPE_FILE).write_text(f"{KIND}\n")
    return {"root": str(root), "split": split, "examples": examples, "images_written": images_written}


def _keep_encoded_images(dataset):
    """The dataset with its candidate images as {"bytes", "path"} (their original files) rather than decoded."""
    import datasets

    feature = dataset.features.get("candidate_images")
    if isinstance(feature, list) and len(feature) == 1 and isinstance(feature[0], datasets.Image):
        return dataset.cast_column("candidate_images", [datasets.Image(decode=False)])
    if isinstance(getattr(feature, "feature", None), datasets.Image):  # Sequence / List of Image
        return dataset.cast_column("candidate_images", type(feature)(datasets.Image(decode=False)))
    return dataset


def convert_hf_winogavil(out: str | Path, *, from_disk: str | None = None, split: str = "test",
                         cache_dir: str | None = None, progress: bool = True) -> dict:
    """nlphuji/winogavil (loaded with `datasets` as DataComp does, or a copy saved with save_to_disk) written
    in this module's layout under `out`."""
    try:
        import datasets
    except ImportError:
        raise ValueError("reading the Hugging Face set needs the `datasets` package, which is not installed: "
                         "pip install datasets") from None
    from tqdm import tqdm

    if from_disk:
        dataset = datasets.load_from_disk(from_disk)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{from_disk} has splits {sorted(dataset)}, not {split!r}")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(HF_NAME, split=split, cache_dir=cache_dir)
    dataset = _keep_encoded_images(dataset)
    return write_association_set(out, tqdm(dataset, desc="winogavil", unit="example", disable=not progress), split)

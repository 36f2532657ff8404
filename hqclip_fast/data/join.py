"""`hqclip-data join`: merge annotation records into image shards by sample key.

Annotations come as jsonl (the recaptioner's output: one record per line, keyed by `key`) or as JSON files
(a list of records, or an object mapping id -> record, e.g. VLM-150M style keyed by `uid`), with an optional
field mapping from their names to ours. Several files, folders (every .jsonl/.json inside, e.g. the
recaptioner's output folder) and glob patterns may be given. Records the recaptioner marked with `error` are
counted (`annotation_recaptioner_error`), never joined. Every image sample is written out (an unmatched one keeps what it had);
unmatched keys on both sides are reported and listed in files beside the output shards.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections import Counter

from .records import RECORD_FIELDS, RecordError, check_record, parse_record
from .shards import expand_sources, iter_tar_samples
from .synthetic import add_tar_member


def annotation_files(paths: list[str] | str) -> list[str]:
    """Files, folders and glob patterns -> sorted file list; an empty match is an error. A folder gives its .jsonl
    files, the recaptioner's output (its .json files are run summaries, not annotations); a .json annotation
    file is named by path or pattern."""
    files: list[str] = []
    for path in [paths] if isinstance(paths, str) else paths:
        if os.path.isdir(path):
            found = glob.glob(os.path.join(path, "*.jsonl"))
        else:
            found = glob.glob(path) if glob.has_magic(path) else [path]
        if not found:
            raise ValueError(f"annotations: nothing matches {path!r}")
        files.extend(sorted(found))
    return files


def load_annotations(path: str, key_field: str = "key", field_map: dict[str, str] | None = None,
                     stats: Counter | None = None) -> dict[str, dict]:
    """key -> record with our field names; malformed lines/records are counted in `stats`, not raised."""
    stats = stats if stats is not None else Counter()
    field_map = field_map or {}
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".jsonl"):
        items = []
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                items.append(parse_record(line))
            except RecordError as e:
                stats[f"annotation_{e.reason}"] += 1
    else:
        loaded = json.loads(data.decode("utf-8"))
        items = list(loaded.values()) if isinstance(loaded, dict) else list(loaded)
        if isinstance(loaded, dict):
            for k, v in loaded.items():
                if isinstance(v, dict):
                    v.setdefault(key_field, k)
    out: dict[str, dict] = {}
    for item in items:
        if not isinstance(item, dict) or item.get(key_field) is None:
            stats["annotation_missing_key"] += 1
            continue
        if item.get("error"):
            stats["annotation_recaptioner_error"] += 1
            continue
        record = {ours: item[theirs] for ours, theirs in field_map.items() if theirs in item}
        record.update({k: v for k, v in item.items() if k in RECORD_FIELDS and k not in record})
        try:
            check_record(record, ())
        except RecordError as e:
            stats[f"annotation_{e.reason}"] += 1
            continue
        key = str(item[key_field])
        if key in out:
            stats["annotation_duplicate_key"] += 1
        record["key"] = key
        out[key] = record
    return out


def join_shards(pattern: str, annotations: list[str] | str, out_dir: str, *, key_field: str = "key",
                field_map: dict[str, str] | None = None) -> dict:
    """Write out_dir/<shard name> for every input shard; return a report (counts and unmatched examples)."""
    stats: Counter = Counter()
    records: dict[str, dict] = {}
    for path in annotation_files(annotations):
        loaded = load_annotations(path, key_field, field_map, stats)
        duplicates = len(records.keys() & loaded.keys())
        if duplicates:
            stats["annotation_duplicate_key"] += duplicates
        records.update(loaded)
    os.makedirs(out_dir, exist_ok=True)
    matched: set[str] = set()
    unmatched_images: list[str] = []
    samples = 0
    for url in (u for source in expand_sources(pattern) for u in source):
        with tarfile.open(os.path.join(out_dir, os.path.basename(url)), "w", format=tarfile.USTAR_FORMAT) as tar:
            for raw in iter_tar_samples(url, stats):
                samples += 1
                key = raw["__key__"]
                base_key = os.path.basename(key)
                annotation = records.get(key) or records.get(base_key)
                members = {ext: data for ext, data in raw.items() if not ext.startswith("__")}
                if annotation is None:
                    unmatched_images.append(key)
                else:
                    matched.add(annotation["key"])
                    record = _existing_record(members, stats)
                    if "alt_text" not in record and "txt" in members:
                        record["alt_text"] = members["txt"].decode("utf-8", errors="replace")
                    record.update(annotation)
                    record["key"] = key
                    members["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
                for ext, data in members.items():
                    add_tar_member(tar, f"{key}.{ext}", data)
    unmatched_annotations = sorted(set(records) - matched)
    for name, keys in (("unmatched_images.txt", unmatched_images), ("unmatched_annotations.txt", unmatched_annotations)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(k + "\n" for k in keys)
    return {"samples": samples, "annotations": len(records), "matched": len(matched),
            "unmatched_images": len(unmatched_images), "unmatched_annotations": len(unmatched_annotations),
            "unmatched_images_examples": unmatched_images[:5],
            "unmatched_annotations_examples": unmatched_annotations[:5], "problems": dict(stats)}


def _existing_record(members: dict, stats: Counter) -> dict:
    if "json" not in members:
        return {}
    try:
        return parse_record(members["json"])
    except RecordError as e:
        stats[f"image_json_{e.reason}"] += 1
        return {}

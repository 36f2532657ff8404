"""`hqclip-data join`: image shards rewritten with each sample's annotation in its .json, matched by sample id
(hqclip_fast.data.annotations: the sample .json's `uid`, else the tar key).

Annotations: a folder of files named after the shards (X.tar <-> X.json / X.jsonl / X.parquet), an index
(`hqclip-data annotations index`, .sqlite), or a global set (files, folders of .jsonl/.parquet, glob patterns),
which is first indexed into OUT/annotations.sqlite so that memory stays bounded whatever its size. Every image
sample is written out (an unmatched one unchanged, with its alt-text). The report has, per shard, the samples,
matched and unmatched ones and (per-shard files) the annotations no sample used; the unmatched ids on both sides
are written to OUT/unmatched_images.txt and OUT/unmatched_annotations.txt, the report to OUT/join_report.json.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tarfile
from collections import Counter

from .annotations import AnnotationIndex, PerShardFolder, annotation_files, build_index, open_annotations
from .shards import expand_sources, iter_tar_samples
from .synthetic import add_tar_member


def _source(annotations: list[str], urls: list[str], out_dir: str, *, id_field, key_field, field_map,
            progress: bool) -> tuple[PerShardFolder | AnnotationIndex, dict | None]:
    """The annotations as a per-shard folder or an index; a global set is indexed into out_dir first."""
    if len(annotations) == 1:
        path = annotations[0]
        is_folder_of_shards = os.path.isdir(path) and PerShardFolder(path).covers(urls)
        if is_folder_of_shards or path.endswith((".sqlite", ".db")):
            return open_annotations(path, urls, id_field=id_field, field_map=field_map, key_field=key_field,
                                    stats=Counter()), None
    index_path = os.path.join(out_dir, "annotations.sqlite")
    if os.path.exists(index_path):  # ours, from an earlier join into this folder
        os.remove(index_path)
    built = build_index(annotation_files(annotations), index_path, field_map=field_map, key_field=key_field,
                        progress=progress)
    return AnnotationIndex(index_path, id_field=id_field), built


def join_shards(pattern: str, annotations: list[str] | str, out_dir: str, *, id_field: str = "uid",
                key_field: str | None = None, field_map: dict[str, str] | None = None,
                progress: bool = False) -> dict:
    """Write out_dir/<shard name> for every input shard; return the report (also in out_dir/join_report.json)."""
    urls = [u for source in expand_sources(pattern) for u in source]
    os.makedirs(out_dir, exist_ok=True)
    annotations = [annotations] if isinstance(annotations, str) else list(annotations)
    source, built = _source(annotations, urls, out_dir, id_field=id_field, key_field=key_field,
                            field_map=field_map, progress=progress)
    problems: Counter = Counter(built["problems"] if built else {})
    # Matched ids of an index, kept on disk (a global set may hold more than memory) to list the unused ones.
    matched_db = sqlite3.connect(os.path.join(out_dir, ".matched.sqlite")) if isinstance(source, AnnotationIndex) \
        else None
    if matched_db is not None:
        matched_db.execute("DROP TABLE IF EXISTS matched")
        matched_db.execute("CREATE TABLE matched (id TEXT PRIMARY KEY) WITHOUT ROWID")
    shards, totals = {}, Counter()
    with open(os.path.join(out_dir, "unmatched_images.txt"), "w") as unmatched_images, \
            open(os.path.join(out_dir, "unmatched_annotations.txt"), "w") as unmatched_annotations:
        for url in urls:
            shard = source.for_shard(url)
            samples = 0
            with tarfile.open(os.path.join(out_dir, os.path.basename(url)), "w", format=tarfile.USTAR_FORMAT) as tar:
                for raw in iter_tar_samples(url, problems):
                    samples += 1
                    for ext, data in shard.annotate(raw).items():
                        if not ext.startswith("__"):
                            add_tar_member(tar, f"{raw['__key__']}.{ext}", data)
            unused = shard.unused()
            unmatched_images.writelines(i + "\n" for i in shard.unmatched)
            unmatched_annotations.writelines(i + "\n" for i in unused)
            if matched_db is not None:
                matched_db.executemany("INSERT OR IGNORE INTO matched VALUES (?)", ((i,) for i in shard.matched))
            counts = {"samples": samples, "matched": samples - len(shard.unmatched), "unmatched": len(shard.unmatched)}
            if shard.records is not None:
                counts["unused_annotations"] = len(unused)
            shards[os.path.basename(url)] = counts
            totals.update(counts)
            problems.update(shard.problems)
        if matched_db is not None:
            matched_db.commit()
            matched_db.execute("ATTACH DATABASE ? AS idx", (source.path,))
            unused_rows = matched_db.execute(
                "SELECT id FROM idx.annotations WHERE id NOT IN (SELECT id FROM matched) ORDER BY id")
            for (record_id,) in unused_rows:
                unmatched_annotations.write(record_id + "\n")
                totals["unused_annotations"] += 1
            matched_db.close()
            os.remove(os.path.join(out_dir, ".matched.sqlite"))
    if isinstance(source, PerShardFolder):
        problems.update(source.reader.stats)
    report = {"samples": totals["samples"], "matched": totals["matched"], "unmatched_images": totals["unmatched"],
              "unmatched_annotations": totals["unused_annotations"],
              "layout": "per_shard" if isinstance(source, PerShardFolder) else "index",
              "shards": shards, "problems": dict(problems)}
    with open(os.path.join(out_dir, "join_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report

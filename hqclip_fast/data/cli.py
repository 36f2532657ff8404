"""`hqclip-data` console script: synthetic | synthetic-benchmark | winogavil | validate | join | annotations index |
tags build | index."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter

from .config import DataConfig
from .records import RecordError, parse_record
from .shards import expand_sources, iter_tar_samples
from .tags import TagVocab


def _synthetic(args) -> int:
    from .synthetic import write_synthetic

    manifest = write_synthetic(args.out, args.num_samples, args.shard_size, args.seed, args.image_size,
                               num_zeroshot=args.num_zeroshot, num_hardneg=args.num_hardneg)
    print(json.dumps(manifest))
    return 0


def _synthetic_benchmark(args) -> int:
    from .benchmark_sets import write_synthetic_benchmark

    roots = write_synthetic_benchmark(args.out, num_zeroshot=args.num_zeroshot, num_retrieval=args.num_retrieval,
                                      num_association=args.num_association, seed=args.seed,
                                      image_size=args.image_size, shard_size=args.shard_size)
    print(json.dumps(roots))
    return 0


def _winogavil(args) -> int:
    from .winogavil import convert_hf_winogavil

    try:
        report = convert_hf_winogavil(args.out, from_disk=args.from_disk, split=args.split, cache_dir=args.cache_dir,
                                      progress=not args.no_progress)
    except ValueError as err:  # no `datasets`, or a malformed row: the message says which
        raise SystemExit(f"hqclip-data winogavil: {err}") from None
    print(json.dumps(report))
    return 0


def _validate(args) -> int:
    from .validate import validate_shards

    cfg = DataConfig(use_negatives=not args.plain, required_fields=list(args.required or []))
    result = validate_shards(args.pattern, cfg, progress=not args.no_progress)
    print(json.dumps(result))
    readable = result["samples_ok"] + result["samples_skipped"] > 0
    return 0 if readable else 1


def _join(args) -> int:
    from .join import join_shards

    report = join_shards(args.shards, args.annotations, args.out, id_field=args.id_field, key_field=args.key_field,
                         field_map=_field_map(args.map), progress=not args.no_progress)
    print(json.dumps(report))
    return 0


def _field_map(items: list[str] | None) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in items or []]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--map takes OURS=THEIRS pairs, got {items}")
    return dict(pairs)


def _annotations_index(args) -> int:
    from .annotations import annotation_files, build_index

    report = build_index(annotation_files(args.files), args.out, field_map=_field_map(args.map),
                         key_field=args.key_field, batch_rows=args.batch_rows, progress=not args.no_progress)
    print(json.dumps(report))
    return 0


def _tags_build(args) -> int:
    stats: Counter = Counter()
    urls = [u for source in expand_sources(args.pattern) for u in source]
    annotations = None
    if args.annotations:  # the texts the loader's data.annotations gives: the same matcher
        from .annotations import open_annotations

        annotations = open_annotations(args.annotations, urls, id_field=args.id_field, field_map=_field_map(args.map),
                                       key_field=args.key_field)

    def tag_lists():
        for url in urls:
            shard = annotations.for_shard(url) if annotations is not None else None
            for raw in iter_tar_samples(url, stats):
                raw = shard.annotate(raw) if shard is not None else raw
                try:
                    tags = parse_record(raw["json"]).get("positive_tags") if "json" in raw else None
                except RecordError:
                    continue
                if isinstance(tags, list):
                    yield [t for t in tags if isinstance(t, str)]

    vocab = TagVocab.build(tag_lists(), size=args.size, min_count=args.min_count)
    vocab.save(args.out)
    print(json.dumps({"tags": len(vocab), "out": args.out, "top": vocab.tags[:10], "problems": dict(stats)}))
    return 0 if len(vocab) else 1


def _index_shard(task: tuple[str, str | None]) -> dict:
    from .dali import dali_index_path, write_dali_index

    url, out_dir = task
    out = dali_index_path(url, out_dir)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    return write_dali_index(url, out)


def _index(args) -> int:
    from tqdm import tqdm

    tasks = [(url, args.out_dir) for source in expand_sources(args.pattern) for url in source]
    jobs = max(1, min(args.jobs, len(tasks)))
    reasons, indexed, start = Counter(), 0, time.perf_counter()
    with tqdm(total=len(tasks), unit="shard", disable=args.no_progress, dynamic_ncols=True) as bar, \
            multiprocessing.Pool(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        # shards are independent: each worker writes its own shard's files; the counts are summed here
        for sidecar in pool.imap_unordered(_index_shard, tasks) if pool else map(_index_shard, tasks):
            reasons.update(sidecar["reasons"])
            indexed += sidecar["samples_indexed"]
            bar.update(1)
            bar.set_postfix(images_s=f"{indexed / (time.perf_counter() - start):.0f}", refresh=False)
    print(json.dumps({"index_files": len(tasks), "samples_indexed": indexed, "jobs": jobs,
                      "seconds": round(time.perf_counter() - start, 3), "reasons": dict(sorted(reasons.items()))}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hqclip-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthetic", help="write the synthetic compositional-scene data set")
    p.add_argument("--out", required=True)
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-zeroshot", type=int, default=600)
    p.add_argument("--num-hardneg", type=int, default=500)
    p.set_defaults(func=_synthetic)

    p = sub.add_parser("synthetic-benchmark", help="write the synthetic zero-shot and retrieval sets in "
                                                   "clip_benchmark's webdataset layout (OUT/zeroshot, OUT/retrieval) "
                                                   "and a WinoGAViL-style set (OUT/winogavil)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-zeroshot", type=int, default=600)
    p.add_argument("--num-retrieval", type=int, default=500)
    p.add_argument("--num-association", type=int, default=40, help="WinoGAViL-style examples (5, 6, 10 and 12 "
                                                                    "candidates in turn)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="samples per shard (default: each set in 4 shards, one for each of clip_benchmark's "
                        "default 4 workers; fewer shards than workers stops it with 'No samples found')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.set_defaults(func=_synthetic_benchmark)

    p = sub.add_parser("winogavil", help="convert DataComp's WinoGAViL set (Hugging Face nlphuji/winogavil; needs "
                                         "`pip install -e '.[winogavil]'`) into the local layout `hqclip-eval --suite` reads")
    p.add_argument("--out", required=True)
    p.add_argument("--from-disk", help="a copy saved with datasets' save_to_disk (default: load_dataset from the "
                                       "Hub, as DataComp does)")
    p.add_argument("--split", default="test")
    p.add_argument("--cache-dir", help="datasets' cache folder for load_dataset")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_winogavil)

    p = sub.add_parser("validate", help="stream shards through the training decode path and count skips")
    p.add_argument("pattern")
    p.add_argument("--plain", action="store_true", help="plain CLIP shards: no negative text needed")
    p.add_argument("--required", nargs="*", help="record fields that must be present and non-empty")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_validate)

    p = sub.add_parser("join", help="write the shards again with each sample's annotation (matched by uid) in its "
                                    ".json")
    p.add_argument("shards")
    p.add_argument("annotations", nargs="+",
                   help="a folder of files named after the shards (X.tar <-> X.json/.jsonl/.parquet), an index "
                        "(.sqlite, from `annotations index`), or a global set: .jsonl/.json/.parquet files, folders "
                        "of .jsonl/.parquet (e.g. the recaptioner's output) or glob patterns, indexed into OUT first")
    p.add_argument("--out", required=True)
    p.add_argument("--id-field", default="uid",
                   help="field of each sample's .json holding its id (default: uid; the tar key when absent)")
    p.add_argument("--key-field", default=None,
                   help="annotation field holding the id (default: the first of uid, key, id, sample_id)")
    p.add_argument("--map", nargs="*", metavar="OURS=THEIRS",
                   help="field names beyond the known synonyms, e.g. positive_description=long_caption")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_join)

    p = sub.add_parser("annotations", help="annotation tools")
    annotations = p.add_subparsers(dest="annotations_command", required=True)
    a = annotations.add_parser("index", help="stream a global annotation set into a SQLite index keyed by id, for "
                                             "`join` and the training loader's data.annotations")
    a.add_argument("files", nargs="+", help=".jsonl/.json/.parquet files, folders of .jsonl/.parquet, glob patterns")
    a.add_argument("--out", required=True, help="the index file to write (.sqlite)")
    a.add_argument("--key-field", default=None,
                   help="annotation field holding the id (default: the first of uid, key, id, sample_id)")
    a.add_argument("--map", nargs="*", metavar="OURS=THEIRS",
                   help="field names beyond the known synonyms, e.g. positive_description=long_caption")
    a.add_argument("--batch-rows", type=int, default=10_000, help="records held in memory at most")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=_annotations_index)

    p = sub.add_parser("tags", help="tag vocabulary tools")
    tags = p.add_subparsers(dest="tags_command", required=True)
    b = tags.add_parser("build", help="frequency-ranked vocabulary of normalized positive tags")
    b.add_argument("pattern")
    b.add_argument("--out", required=True)
    b.add_argument("--size", type=int, default=1000)
    b.add_argument("--min-count", type=int, default=1)
    b.add_argument("--annotations", help="raw shards with annotations matched while reading, as data.annotations: "
                                         "a folder of per-shard files or an index (.sqlite)")
    b.add_argument("--id-field", default="uid", help="with --annotations: as in join")
    b.add_argument("--key-field", default=None, help="with --annotations: as in join")
    b.add_argument("--map", nargs="*", metavar="OURS=THEIRS", help="with --annotations: as in join")
    b.set_defaults(func=_tags_build)

    p = sub.add_parser("index", help="write DALI index files (one .idx per shard) listing only samples DALI reads "
                                     "without raising, and a .skipped.json per shard counting the rest")
    p.add_argument("pattern")
    p.add_argument("--out-dir", default=None, help="default: beside each shard")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes, each indexing whole shards (default: the usable cores)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Annotations matched to image samples by id, the way VLM-150M / VLM-1B are shipped: records that match DFN /
DataComp samples by uid. One matcher serves both ways of using them: `hqclip-data join` (the shards rewritten with
each sample's annotation in its .json) and the training loader's `data.annotations` (looked up while reading, no
shard rewritten); both call `ShardAnnotations.annotate`, so they give the trainer the same texts.

Sample id: the field `id_field` (default `uid`) of the sample's .json, as img2dataset writes it for DataComp / DFN
shards (whose tar keys are positional: 000000123), else the tar key.

Where the records come from (`open_annotations`):
- a folder of per-shard files: for shard X.tar, X.json (an object id -> record, or a list of records), X.jsonl
  (one record a line) or X.parquet (one row a record), read when the shard is: one shard's records in memory;
- an index (`hqclip-data annotations index FILES --out annotations.sqlite`): global files of any size streamed
  once into SQLite, keyed by id (its B-tree is the partition by id); a sample is one lookup, no record in memory.

Records: our field names (records.py), the synonyms of FIELD_SYNONYMS in any case, or a `field_map` (ours ->
theirs); tags as a list or one delimited string ("dog, red ball; grass"). A record the recaptioner marked with
`error`, or one with a field of the wrong type, is counted and never joined. An unmatched sample is left as it is
(its alt-text stays).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator

from .records import TAG_FIELDS, RecordError, check_record, parse_record

ANNOTATION_EXTENSIONS = (".jsonl", ".json", ".parquet")
ID_FIELDS = ("uid", "key", "id", "sample_id")  # an annotation's id, the first one present (unless key_field)

# Field names met in the wild -> ours; compared lowercased with '-' and ' ' as '_'.
FIELD_SYNONYMS = {
    "alt_text": ("alt_text", "alttext", "caption", "original_caption", "raw_caption", "text", "txt"),
    "positive_description": ("positive_description", "long_positive_description", "long_positive",
                             "positive_long_description", "long_description", "long_caption", "description",
                             "pos_description"),
    "negative_description": ("negative_description", "long_negative_description", "long_negative",
                             "negative_long_description", "hard_negative", "neg_description"),
    "positive_tags": ("positive_tags", "short_positive_tags", "short_positive_description", "short_positive",
                      "positive_short_description", "pos_tags", "tags"),
    "negative_tags": ("negative_tags", "short_negative_tags", "short_negative_description", "short_negative",
                      "negative_short_description", "neg_tags"),
}
_TAG_SEPARATORS = re.compile(r"[,;|\n]")


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("annotations: reading .parquet files needs pyarrow (pip install 'hqclip-fast[parquet]')") \
            from None
    return pq


def read_annotation_file(path: str, batch_rows: int = 10_000) -> Iterator[tuple[str | None, object]]:
    """(id from the file's structure or None, raw item) for every item of a .jsonl, .json or .parquet file.
    .jsonl and .parquet are streamed (at most `batch_rows` rows at a time); a .json file is one document."""
    if path.endswith(".parquet"):
        for batch in _parquet().ParquetFile(path).iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield None, row
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    try:
                        yield None, parse_record(line)
                    except RecordError as e:
                        yield None, e
    elif path.endswith(".json"):
        with open(path, "rb") as f:
            try:
                loaded = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"annotations: {path} is not a JSON document: {e}") from None
        yield from (loaded.items() if isinstance(loaded, dict) else ((None, item) for item in loaded))
    else:
        raise ValueError(f"annotations: {path} is not one of {ANNOTATION_EXTENSIONS}")


class RecordReader:
    """Raw annotation items -> (id, record with our field names), counting what it refuses in `stats`."""

    def __init__(self, field_map: dict[str, str] | None = None, key_field: str | None = None,
                 stats: Counter | None = None):
        unknown = set(field_map or {}) - {*FIELD_SYNONYMS, "key"}
        if unknown:
            raise ValueError(f"annotations: --map names unknown fields {sorted(unknown)} (ours: "
                             f"{sorted(FIELD_SYNONYMS)}, and key for the id)")
        self.stats = stats if stats is not None else Counter()
        self.key_field = (field_map or {}).get("key", key_field)
        # canonical source name -> our field; the user's map first, then the synonyms.
        self.names = {_canonical(theirs): ours for ours, theirs in (field_map or {}).items() if ours != "key"}
        for ours, synonyms in FIELD_SYNONYMS.items():
            if ours not in (field_map or {}):
                for name in synonyms:
                    self.names.setdefault(name, ours)

    def read(self, structural_id: str | None, item, stats: Counter | None = None) -> tuple[str, dict] | None:
        """(id, record), or None for an item it refuses, counted in `stats` (default: its own)."""
        stats = self.stats if stats is None else stats
        if isinstance(item, RecordError):
            stats[f"annotation_{item.reason}"] += 1
            return None
        if not isinstance(item, dict):
            stats["annotation_not_an_object"] += 1
            return None
        if item.get("error"):
            stats["annotation_recaptioner_error"] += 1
            return None
        ids = (self.key_field,) if self.key_field else ID_FIELDS
        record_id = next((item[f] for f in ids if item.get(f) is not None), structural_id)
        if record_id is None:
            stats["annotation_missing_key"] += 1
            return None
        record = {}
        for name, value in item.items():
            ours = self.names.get(_canonical(name))
            if ours is not None and ours not in record and value is not None:
                record[ours] = _tags(value) if ours in TAG_FIELDS else value
        if not record:  # an id and nothing we know: a naming we do not guess (--map says it)
            stats["annotation_no_known_field"] += 1
            return None
        try:
            check_record(record, ())
        except RecordError as e:
            stats[f"annotation_{e.reason}"] += 1
            return None
        return str(record_id), record


def _tags(value):
    """A delimited string of tags -> list; anything else as it is (a list, or a wrong type check_record reports)."""
    if isinstance(value, str):
        return [t.strip() for t in _TAG_SEPARATORS.split(value) if t.strip()]
    return value


def sample_id(raw: dict, id_field: str) -> str:
    """The id of a raw tar sample: `id_field` of its .json when present, else its tar key (without folders)."""
    if id_field and "json" in raw:
        try:
            value = parse_record(raw["json"]).get(id_field)
        except RecordError:
            value = None
        if value is not None:
            return str(value)
    return os.path.basename(raw["__key__"])


class ShardAnnotations:
    """The annotations of one shard's samples, and the counts of the matching. With `stats` (the training
    loader's counts) each sample is also counted there as annotation_matched or annotation_unmatched."""

    def __init__(self, lookup, id_field: str, records: dict[str, dict] | None = None, stats: Counter | None = None):
        self._lookup, self.id_field = lookup, id_field
        self.records = records  # the per-shard file's records (None: looked up in an index)
        self.matched: set[str] = set()
        self.unmatched: list[str] = []
        self.problems: Counter = Counter() if stats is None else stats
        self._counts = stats

    def annotate(self, raw: dict) -> dict:
        """The raw sample with its annotation merged into its .json (alt-text from .txt kept), or unchanged when
        it has none."""
        sid = sample_id(raw, self.id_field)
        annotation = self._lookup(sid)
        if self._counts is not None:
            self._counts["annotation_unmatched" if annotation is None else "annotation_matched"] += 1
        if annotation is None:
            self.unmatched.append(sid)
            return raw
        self.matched.add(sid)
        record = {}
        if "json" in raw:
            try:
                record = parse_record(raw["json"])
            except RecordError as e:
                self.problems[f"annotation_image_json_{e.reason}"] += 1
        if not record.get("alt_text") and "txt" in raw:
            record["alt_text"] = raw["txt"].decode("utf-8", errors="replace")
        record.update(annotation)
        record["key"] = raw["__key__"]
        return {**raw, "json": json.dumps(record, ensure_ascii=False).encode("utf-8")}

    def unused(self) -> list[str]:
        """Ids of the shard's own annotation file that no sample matched ([] for an index)."""
        return sorted(set(self.records) - self.matched) if self.records is not None else []


def shard_stem(url: str) -> str:
    name = os.path.basename(url.rstrip("/"))
    return name[:-len(".tar")] if name.endswith(".tar") else os.path.splitext(name)[0]


class PerShardFolder:
    """Annotation files named after the shards: X.tar <-> X.json / X.jsonl / X.parquet."""

    def __init__(self, folder: str, *, id_field: str = "uid", field_map=None, key_field=None,
                 stats: Counter | None = None):
        self.folder, self.id_field = folder, id_field
        self.reader = RecordReader(field_map, key_field, stats)
        self.files = {shard_stem(name): os.path.join(folder, name) for name in sorted(os.listdir(folder))
                      if name.endswith(ANNOTATION_EXTENSIONS)}
        self.max_records_held = 0  # the most records in memory at once: one shard's

    def covers(self, urls: Iterable[str]) -> bool:
        return any(shard_stem(url) in self.files for url in urls)

    def for_shard(self, url: str, stats: Counter | None = None) -> ShardAnnotations:
        """The shard's annotations; with `stats`, the file's problems and the samples' matching are counted there
        (else in the folder's own counts)."""
        problems = self.reader.stats if stats is None else stats
        records: dict[str, dict] = {}
        path = self.files.get(shard_stem(url))
        if path is None:
            problems["annotation_file_missing_for_shard"] += 1
        else:
            for structural_id, item in read_annotation_file(path):
                read = self.reader.read(structural_id, item, problems)
                if read is not None:
                    if read[0] in records:
                        problems["annotation_duplicate_key"] += 1
                    records[read[0]] = read[1]
        self.max_records_held = max(self.max_records_held, len(records))
        return ShardAnnotations(records.get, self.id_field, records, stats)


class AnnotationIndex:
    """A SQLite file of (id, record JSON), built once by `build_index`; each process opens its own read-only
    connection on first use (a DataLoader worker cannot share its parent's)."""

    def __init__(self, path: str, *, id_field: str = "uid"):
        if not os.path.isfile(path):
            raise ValueError(f"annotations: no index at {path} (build one: hqclip-data annotations index)")
        self.path, self.id_field = path, id_field
        self._connection: sqlite3.Connection | None = None
        self._pid = None

    def _db(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            self._connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            self._pid = os.getpid()
        return self._connection

    def lookup(self, record_id: str) -> dict | None:
        row = self._db().execute("SELECT record FROM annotations WHERE id = ?", (record_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def __len__(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM annotations").fetchone()[0]

    def ids(self) -> Iterator[str]:
        for (record_id,) in self._db().execute("SELECT id FROM annotations ORDER BY id"):
            yield record_id

    def for_shard(self, url: str, stats: Counter | None = None) -> ShardAnnotations:
        return ShardAnnotations(self.lookup, self.id_field, stats=stats)

    def __getstate__(self):  # pickled into DataLoader workers without the connection
        return {**self.__dict__, "_connection": None, "_pid": None}


def build_index(files: list[str], out: str, *, field_map=None, key_field=None, batch_rows: int = 10_000,
                progress: bool = True) -> dict:
    """Stream annotation files into a new SQLite index at `out`; the first record of an id wins. Holds at most
    `batch_rows` records in memory (a .json document is read whole). Returns the counts."""
    from tqdm import tqdm

    if os.path.exists(out):
        raise ValueError(f"annotations index: {out} exists; remove it or choose another --out")
    stats: Counter = Counter()
    reader = RecordReader(field_map, key_field, stats)
    tmp = out + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    db = sqlite3.connect(tmp)
    db.execute("CREATE TABLE annotations (id TEXT PRIMARY KEY, record TEXT NOT NULL) WITHOUT ROWID")
    rows: list[tuple[str, str]] = []
    max_buffered = records = 0

    def flush():
        nonlocal records
        before = db.total_changes
        db.executemany("INSERT OR IGNORE INTO annotations VALUES (?, ?)", rows)
        added = db.total_changes - before
        if len(rows) > added:
            stats["annotation_duplicate_key"] += len(rows) - added
        records += added
        rows.clear()

    with tqdm(total=len(files), unit="file", desc="indexing annotations", disable=not progress) as bar:
        for path in files:
            for structural_id, item in read_annotation_file(path, batch_rows):
                read = reader.read(structural_id, item)
                if read is not None:
                    rows.append((read[0], json.dumps(read[1], ensure_ascii=False)))
                    max_buffered = max(max_buffered, len(rows))
                    if len(rows) >= batch_rows:
                        flush()
            bar.update(1)
            bar.set_postfix(records=records + len(rows))
    flush()
    db.commit()
    db.close()
    os.replace(tmp, out)
    return {"index": out, "files": len(files), "records": records, "max_records_buffered": max_buffered,
            "problems": dict(stats)}


def annotation_files(paths: list[str] | str) -> list[str]:
    """Files, folders and glob patterns -> sorted file list; nothing found is an error. A folder gives its .jsonl
    and .parquet files (the recaptioner's output folder: its .json files are run summaries); a .json annotation
    file is named by path or pattern."""
    import glob

    files: list[str] = []
    for path in [paths] if isinstance(paths, str) else paths:
        if os.path.isdir(path):
            found = [os.path.join(path, n) for n in os.listdir(path) if n.endswith((".jsonl", ".parquet"))]
        else:
            found = glob.glob(path) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
        if not found:
            raise ValueError(f"annotations: nothing matches {path!r}")
        files.extend(sorted(found))
    return files


def open_annotations(path: str, urls: list[str], *, id_field: str = "uid", field_map=None, key_field=None,
                     stats: Counter | None = None) -> PerShardFolder | AnnotationIndex:
    """The annotations at `path` for the shards `urls`: a folder with files named after the shards, or an index
    (.sqlite). Anything else is an error that says what to do."""
    if os.path.isdir(path):
        folder = PerShardFolder(path, id_field=id_field, field_map=field_map, key_field=key_field, stats=stats)
        if folder.covers(urls):
            return folder
        raise ValueError(f"annotations: no file in {path} is named after a shard (X.tar <-> X.json/.jsonl/"
                         f".parquet); for one global set, build an index: hqclip-data annotations index")
    if path.endswith((".sqlite", ".db")):
        return AnnotationIndex(path, id_field=id_field)
    raise ValueError(f"annotations: {path} is neither a folder of per-shard files nor an index (.sqlite)")


def load_time_annotations(cfg, urls: list[str]) -> PerShardFolder | AnnotationIndex | None:
    """The training loader's annotations (DataConfig.annotations), checked against its shards; None without."""
    if not cfg.annotations:
        return None
    try:
        return open_annotations(cfg.annotations, urls, id_field=cfg.annotation_id_field,
                                field_map=dict(cfg.annotation_map), key_field=cfg.annotation_key_field)
    except ValueError as err:
        raise ValueError(f"data.{err}") from None  # "data.annotations: ..."

"""Annotations matched to img2dataset shards by uid: `hqclip-data join` (shards rewritten) and the loader's
`data.annotations` (joined while reading) on 3 shards of 1,000 samples in img2dataset's exact layout (positional
keys; .jpg, .txt and a .json with uid, url, caption, key, status, width, height; a parquet beside each tar), with
annotations in three layouts: per-shard JSON (uid -> record), per-shard JSONL, one global parquet (indexed)."""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from data_helpers import write_tar
from PIL import Image

from hqclip_fast.data import DataConfig, build_train_loader
from hqclip_fast.data.annotations import (
    AnnotationIndex,
    PerShardFolder,
    build_index,
    open_annotations,
    sample_id,
)
from hqclip_fast.data.cli import main
from hqclip_fast.data.tags import TagVocab

SHARDS, PER_SHARD = 3, 1000
NO_ANNOTATION = 97  # every 97th sample has no annotation (it keeps its alt-text)
EXTRA = 5  # annotations per shard that match no sample


def uid(n: int) -> str:
    return hashlib.md5(str(n).encode()).hexdigest()  # DataComp's uids are 32 hex digits


def annotation(n: int) -> dict:
    """VLM-150M-like names in mixed case, tags as a list or a delimited string."""
    tags = f"tag{n % 5}, tag{n % 7}; tag{n % 11}" if n % 2 else [f"tag{n % 5}", f"tag{n % 7}", f"tag{n % 11}"]
    return {"uid": uid(n), "Long_Positive_Description": f"a long description of image {n}",
            "long_negative_description": f"a wrong description of image {n}", "short_positive_tags": tags,
            "Short_Negative_Tags": [f"wrong{n % 3}"]}


def _jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 255 - shade, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2dataset")
    shards, per_json, per_jsonl = root / "shards", root / "per_shard_json", root / "per_shard_jsonl"
    for folder in (shards, per_json, per_jsonl):
        folder.mkdir()
    images = [_jpeg(s) for s in range(0, 256, 16)]
    everything = []
    for s in range(SHARDS):
        members, rows, records = [], [], {}
        for i in range(PER_SHARD):
            n, key = s * PER_SHARD + i, f"{s:05d}{i:04d}"
            meta = {"uid": uid(n), "url": f"https://example.com/{n}.jpg", "caption": f"alt text {n}", "key": key,
                    "status": "success", "error_message": None, "width": 8, "height": 8}
            members += [(f"{key}.jpg", images[n % len(images)]), (f"{key}.txt", meta["caption"].encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
            rows.append(meta)
            if n % NO_ANNOTATION:
                records[uid(n)] = annotation(n)
        for extra in range(EXTRA):
            records[uid(10**6 + s * EXTRA + extra)] = annotation(10**6 + s * EXTRA + extra)
        write_tar(str(shards / f"{s:05d}.tar"), members)
        _write_parquet(rows, shards / f"{s:05d}.parquet")  # img2dataset's metadata, beside the tar
        (per_json / f"{s:05d}.json").write_text(json.dumps({u: {k: v for k, v in r.items() if k != "uid"}
                                                            for u, r in records.items()}))
        (per_jsonl / f"{s:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
        everything += records.values()
    _write_parquet(everything, root / "vlm_global.parquet")
    return {"root": root, "shards": str(shards / "{00000..00002}.tar"), "per_json": str(per_json),
            "per_jsonl": str(per_jsonl), "global": str(root / "vlm_global.parquet")}


def _write_parquet(rows: list[dict], path) -> None:
    """Needs pyarrow (the 'parquet' extra); without it, the parquet files are simply not written."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    tags = [r.get("short_positive_tags") for r in rows]
    if any(t is not None for t in tags):  # one column, one type: the parquet layout holds tags as strings
        rows = [{**r, "short_positive_tags": t if isinstance(t, str) else ", ".join(t)} for r, t in zip(rows, tags)]
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def _needs_pyarrow():
    pytest.importorskip("pyarrow", reason="the global parquet layout needs pyarrow (the 'parquet' extra)")


def _read(path: str) -> dict[str, dict[str, bytes]]:
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _joined(out) -> dict[str, dict[str, bytes]]:
    return {k: v for s in range(SHARDS) for k, v in _read(os.path.join(out, f"{s:05d}.tar")).items()}


def _join(capsys, data, annotations, out, *extra) -> dict:
    assert main(["join", data["shards"], annotations, "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def joined_per_json(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("joined_json")
    assert main(["join", data["shards"], data["per_json"], "--out", str(out), "--no-progress"]) == 0
    return out


def test_join_matches_by_uid_and_loses_nothing(data, joined_per_json):
    report = json.loads((joined_per_json / "join_report.json").read_text())
    unmatched = [n for n in range(SHARDS * PER_SHARD) if n % NO_ANNOTATION == 0]
    assert report["layout"] == "per_shard" and report["samples"] == SHARDS * PER_SHARD
    assert report["unmatched_images"] == len(unmatched) and report["matched"] == SHARDS * PER_SHARD - len(unmatched)
    assert report["unmatched_annotations"] == SHARDS * EXTRA and report["problems"] == {}
    assert report["shards"]["00001.tar"] == {"samples": PER_SHARD, "matched": PER_SHARD - 10, "unmatched": 10,
                                             "unused_annotations": EXTRA}
    assert (joined_per_json / "unmatched_images.txt").read_text().split() == [uid(n) for n in unmatched]
    assert len((joined_per_json / "unmatched_annotations.txt").read_text().split()) == SHARDS * EXTRA

    raw = {k: v for s in range(SHARDS) for k, v in _read(data["shards"].replace("{00000..00002}", f"{s:05d}")).items()}
    joined = _joined(joined_per_json)
    assert joined.keys() == raw.keys()  # every sample written, under its positional key
    for key, sample in joined.items():
        n = int(key[:5]) * PER_SHARD + int(key[5:])
        assert sample["jpg"] == raw[key]["jpg"] and sample["txt"] == raw[key]["txt"]
        record = json.loads(sample["json"])
        if n % NO_ANNOTATION == 0:  # unmatched: unchanged, the alt-text kept
            assert sample["json"] == raw[key]["json"]
            continue
        assert record["uid"] == uid(n) and record["url"].endswith(f"/{n}.jpg")  # img2dataset's fields kept
        assert record["alt_text"] == f"alt text {n}"
        assert record["positive_description"] == f"a long description of image {n}"
        assert record["negative_description"] == f"a wrong description of image {n}"
        assert record["positive_tags"] == [f"tag{n % 5}", f"tag{n % 7}", f"tag{n % 11}"]  # list or string
        assert record["negative_tags"] == [f"wrong{n % 3}"]


def test_three_layouts_give_the_same_shards(data, joined_per_json, tmp_path, capsys):
    expected = _joined(joined_per_json)
    report = _join(capsys, data, data["per_jsonl"], tmp_path / "jsonl")
    assert report["layout"] == "per_shard" and report["matched"] == json.loads(
        (joined_per_json / "join_report.json").read_text())["matched"]
    assert _joined(tmp_path / "jsonl") == expected
    _needs_pyarrow()
    report = _join(capsys, data, data["global"], tmp_path / "global")  # indexed into OUT first
    assert report["layout"] == "index" and report["unmatched_annotations"] == SHARDS * EXTRA
    assert _joined(tmp_path / "global") == expected


def test_index_is_built_once_with_bounded_memory(data, tmp_path, capsys):
    _needs_pyarrow()
    index = tmp_path / "vlm.sqlite"
    assert main(["annotations", "index", data["global"], "--out", str(index), "--batch-rows", "256",
                 "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    annotated = SHARDS * PER_SHARD - 31  # 31 multiples of 97 below 3,000
    assert report["records"] == len(AnnotationIndex(str(index))) == annotated + SHARDS * EXTRA
    assert report["max_records_buffered"] <= 256  # never the whole set in memory
    with pytest.raises(ValueError, match="exists"):
        build_index([data["global"]], str(index))
    joined = _join(capsys, data, str(index), tmp_path / "via_index")
    assert joined["layout"] == "index" and joined["unmatched_images"] == 31


def test_tag_vocabulary_of_either_option_is_the_same(data, joined_per_json, tmp_path, capsys):
    assert main(["tags", "build", str(joined_per_json / "{00000..00002}.tar"), "--out", str(tmp_path / "a.json")]) == 0
    assert main(["tags", "build", data["shards"], "--annotations", data["per_jsonl"],
                 "--out", str(tmp_path / "b.json")]) == 0
    capsys.readouterr()
    assert TagVocab.load(str(tmp_path / "a.json")).tags == TagVocab.load(str(tmp_path / "b.json")).tags
    assert len(TagVocab.load(str(tmp_path / "a.json"))) == 11


def test_per_shard_files_hold_one_shard_in_memory(data):
    folder = open_annotations(data["per_jsonl"], [f"{s:05d}.tar" for s in range(SHARDS)])
    assert isinstance(folder, PerShardFolder)
    for s in range(SHARDS):
        folder.for_shard(f"{s:05d}.tar")
    assert folder.max_records_held <= PER_SHARD + EXTRA < SHARDS * PER_SHARD


def _batches(cfg: DataConfig, vocab: TagVocab, count: int) -> list[dict]:
    loader = build_train_loader(cfg, batch_size=100, seed=3, tag_vocab=vocab)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out
    raise AssertionError("loader ended")


@pytest.mark.parametrize("layout", ["per_json", "global"])
def test_load_time_join_gives_the_trainer_the_same_texts(data, joined_per_json, layout, tmp_path):
    """A whole epoch and a bit (32 batches of 100): the tokens, negatives, tag ids and keys the trainer gets from the
    rewritten shards equal those it gets from the raw shards with data.annotations."""
    annotations = data[layout]
    if layout == "global":
        _needs_pyarrow()
        annotations = str(tmp_path / "vlm.sqlite")
        build_index([data["global"]], annotations, progress=False)
    vocab = TagVocab([f"tag{i}" for i in range(11)])
    common = dict(image_size=16, workers=0, shuffle_buffer=50, p_description=0.5, p_neg_tags=0.5)
    rewritten = _batches(DataConfig(train_data=str(joined_per_json / "{00000..00002}.tar"), **common), vocab, 32)
    at_load = _batches(DataConfig(train_data=data["shards"], annotations=annotations, **common), vocab, 32)
    # use_negatives: a sample without an annotation has no negative text and is skipped (in both), so every
    # sample here got its texts from the annotations; 32 batches hold the epoch's 2,969 (and some of the next,
    # past the 50 of the shuffle buffer).
    keys = [k for b in at_load for k in b["keys"]]
    first_epoch = [k for b in at_load for k, epoch in zip(b["keys"], b["epochs"]) if epoch == 0]
    usable = SHARDS * PER_SHARD - 31
    # every usable sample once in the first epoch, less at most the shuffle buffer's last 50, still held
    assert len(set(keys)) <= usable and usable - 50 <= len(first_epoch) == len(set(first_epoch)) <= usable
    for ours, theirs in zip(at_load, rewritten):
        assert ours["keys"] == theirs["keys"]
        for name in ("pos_tokens", "neg_tokens", "tag_ids", "images"):
            assert torch.equal(ours[name], theirs[name]), name
    assert all(int(b["tag_ids"].max()) >= 0 for b in at_load)


def test_sample_id_is_the_json_uid_else_the_tar_key():
    assert sample_id({"__key__": "dir/000000001", "json": b'{"uid": "abc"}'}, "uid") == "abc"
    assert sample_id({"__key__": "dir/000000001", "json": b'{"caption": "x"}'}, "uid") == "000000001"
    assert sample_id({"__key__": "000000001", "json": b"{broken"}, "uid") == "000000001"


def test_load_time_join_errors_say_what_to_do(data, tmp_path):
    (tmp_path / "other.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="data.annotations: no file in .* is named after a shard.*annotations index"):
        build_train_loader(DataConfig(train_data=data["shards"], annotations=str(tmp_path), workers=0),
                           batch_size=4)
    with pytest.raises(ValueError, match="no index at"):
        build_train_loader(DataConfig(train_data=data["shards"], annotations=str(tmp_path / "x.sqlite"),
                                      workers=0), batch_size=4)
    with pytest.raises(ValueError, match="hqclip-data join"):
        DataConfig(train_data=data["shards"], annotations=data["per_json"], decoder="dali").validate()


@pytest.mark.parametrize("workers", [0, 2])
def test_load_time_join_survives_a_resume(data, workers):
    """A resumed loader reads its shuffle buffer's samples again from the raw shards: their annotations are merged
    in again, so the batches after the resume equal an uninterrupted run's (texts, negatives, tags)."""
    vocab = TagVocab([f"tag{i}" for i in range(11)])
    cfg = DataConfig(train_data=data["shards"], annotations=data["per_json"], image_size=16, workers=workers,
                     shuffle_buffer=200, p_description=0.5, p_neg_tags=0.5)
    make = lambda: build_train_loader(cfg, batch_size=50, seed=3, tag_vocab=vocab)  # noqa: E731
    uninterrupted = _take(make(), 12)
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(6)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = _take(resumed, 6)
    for ours, theirs in zip(head + tail, uninterrupted, strict=True):
        assert ours["keys"] == theirs["keys"]
        for name in ("pos_tokens", "neg_tokens", "tag_ids"):
            assert torch.equal(ours[name], theirs[name]), name


def _take(loader, count: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
def test_load_time_join_counts_unmatched_samples(data, workers):
    """The loader's stats count the samples read with and without an annotation (these keep their alt-text and
    are trained on, so they are not skipped samples). No shuffle buffer: the samples read are those batched."""
    cfg = DataConfig(train_data=data["shards"], annotations=data["per_json"], image_size=16, workers=workers,
                     shuffle_buffer=1, use_negatives=False, use_tags=False)
    loader = build_train_loader(cfg, batch_size=100, seed=0)
    keys = [k for b in _take(loader, 24) for k in b["keys"]]
    numbers = [int(k[:5]) * PER_SHARD + int(k[5:]) for k in keys]
    unmatched = sum(n % NO_ANNOTATION == 0 for n in numbers)
    stats = loader.stats()
    assert unmatched > 0 and stats["samples_unannotated"] == unmatched
    assert stats["reasons"]["annotation_matched"] == len(keys) - unmatched
    assert stats["samples_ok"] == len(keys) and stats["samples_skipped"] == 0
    plain = build_train_loader(DataConfig(train_data=data["shards"], image_size=16, workers=0, shuffle_buffer=1,
                                          use_negatives=False, use_tags=False), batch_size=100, seed=0)
    _take(plain, 1)
    assert "samples_unannotated" not in plain.stats()


def test_load_time_join_counts_a_shard_without_annotation_file(data, tmp_path):
    (tmp_path / "00000.jsonl").write_text((Path(data["per_jsonl"]) / "00000.jsonl").read_text())
    (tmp_path / "00001.jsonl").write_text('{"uid": "x", "long_positive_description": 3}\n')
    cfg = DataConfig(train_data=data["shards"], annotations=str(tmp_path), image_size=16, workers=0,
                     shuffle_buffer=1, use_negatives=False, use_tags=False)
    loader = build_train_loader(cfg, batch_size=100, seed=0)
    _take(loader, 30)  # the whole epoch: 3 shards
    reasons = loader.stats()["reasons"]
    assert reasons["annotation_file_missing_for_shard"] == 1  # 00002
    assert reasons["annotation_wrong_type"] == 1  # 00001's one record
    assert loader.stats()["samples_unannotated"] == 2 * PER_SHARD + sum(n % NO_ANNOTATION == 0
                                                                       for n in range(PER_SHARD))

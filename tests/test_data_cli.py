"""hqclip-data subcommands: synthetic, tags build, join (jsonl and uid-keyed JSON with a field map); tag vocab."""

import json
import os
from collections import Counter

import pytest
from data_helpers import good_members, write_tar

from hqclip_fast.data import TagVocab, normalize_tag
from hqclip_fast.data.cli import main
from hqclip_fast.data.shards import expand_sources, iter_tar_samples
from hqclip_fast.data.validate import validate_shards


def _samples(pattern):
    stats = Counter()
    return [s for url in expand_sources(pattern)[0] for s in iter_tar_samples(url, stats)]


def test_synthetic_command(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert main(["synthetic", "--out", out, "--num-samples", "50", "--shard-size", "20", "--image-size", "32",
                 "--num-zeroshot", "24", "--num-hardneg", "10"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["num_train"] == 50 and len(expand_sources(manifest["train"])[0]) == 3
    assert validate_shards(manifest["train"], progress=False)["samples_ok"] == 50


def test_tag_normalization_and_vocab(tmp_path):
    assert normalize_tag("  Red   CUBE. ") == "red cube" and normalize_tag("Ｒｅｄ") == "red"
    vocab = TagVocab.build([["red", "Cube"], ["red", "ball", "red"], ["ball", "sky"]], size=3)
    assert vocab.tags == ["ball", "red", "cube"]  # by frequency, ties alphabetical; "sky" cut by size
    assert vocab.encode(["RED", "unknown", "ball", "red "]) == [1, 0]
    vocab.save(str(tmp_path / "v.json"))
    assert TagVocab.load(str(tmp_path / "v.json")).tags == vocab.tags and len(vocab) == 3
    with pytest.raises(ValueError, match="size"):
        TagVocab.build([], size=0)


def test_tags_build_command(tmp_path):
    members = [m for i in range(5) for m in good_members(i)]
    shard = write_tar(str(tmp_path / "s.tar"), members)
    out = str(tmp_path / "tags.json")
    assert main(["tags", "build", shard, "--out", out, "--size", "4"]) == 0
    vocab = TagVocab.load(out)
    counts = {}
    for s in _samples(shard):
        for t in {normalize_tag(x) for x in json.loads(s["json"])["positive_tags"]}:
            counts[t] = counts.get(t, 0) + 1
    expected = sorted(counts, key=lambda t: (-counts[t], t))[:4]
    assert vocab.tags == expected


def test_tags_build_reads_globs_and_fails_on_no_tags(tmp_path, capsys):
    for i in range(2):
        write_tar(str(tmp_path / f"s-{i}.tar"), good_members(i))
    out = str(tmp_path / "tags.json")
    assert main(["tags", "build", str(tmp_path / "s-*.tar"), "--out", out]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == {}
    assert len(TagVocab.load(out)) == len({normalize_tag(t) for i in range(2)
                                           for t in json.loads(good_members(i)[1][1])["positive_tags"]})
    with pytest.raises(ValueError, match="matches no file"):
        main(["tags", "build", str(tmp_path / "typo-*.tar"), "--out", out])
    broken = write_tar(str(tmp_path / "broken.tar"), [])
    assert main(["tags", "build", broken, "--out", out]) == 1  # an empty vocabulary is a failure, with its reason
    assert json.loads(capsys.readouterr().out)["problems"] == {"empty_tar": 1}


def test_shard_globs_expand_sorted_per_source_and_leave_urls_alone(tmp_path):
    from hqclip_fast.data.shards import expand_sources

    for name in ("b-1.tar", "b-0.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    sources = expand_sources(f"{tmp_path}/b-*.tar::{tmp_path}/a.tar::pipe:cat x-*.tar::s3://bucket/x-*.tar")
    assert sources == [[f"{tmp_path}/b-0.tar", f"{tmp_path}/b-1.tar"], [f"{tmp_path}/a.tar"], ["pipe:cat x-*.tar"],
                       ["s3://bucket/x-*.tar"]]


def _image_shard(tmp_path, keys):
    jpg = good_members(0)[0][1]
    members = []
    for k in keys:
        members += [(f"{k}.jpg", jpg), (f"{k}.txt", f"alt for {k}".encode())]
    return write_tar(str(tmp_path / "images-0.tar"), members)


def test_join_jsonl(tmp_path, capsys):
    shard = _image_shard(tmp_path, ["a", "b", "c"])
    with open(tmp_path / "ann.jsonl", "w") as f:
        for k in ("a", "c", "zz"):
            f.write(json.dumps({"key": k, "positive_description": f"desc {k}", "negative_description": f"neg {k}",
                                "positive_tags": ["t"], "negative_tags": ["n"]}) + "\n")
        f.write("{not json\n")
    out = str(tmp_path / "joined")
    assert main(["join", shard, str(tmp_path / "ann.jsonl"), "--out", out]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matched"] == 2 and report["unmatched_images"] == 1 and report["unmatched_annotations"] == 1
    assert report["problems"] == {"annotation_invalid_json": 1}
    assert open(os.path.join(out, "unmatched_images.txt")).read() == "b\n"
    assert open(os.path.join(out, "unmatched_annotations.txt")).read() == "zz\n"
    samples = {s["__key__"]: s for s in _samples(os.path.join(out, "images-0.tar"))}
    assert set(samples) == {"a", "b", "c"}  # the unmatched image is kept, unchanged
    record = json.loads(samples["a"]["json"])
    assert record["alt_text"] == "alt for a" and record["positive_description"] == "desc a"
    assert "json" not in samples["b"] and samples["b"]["txt"] == b"alt for b"
    assert samples["a"]["jpg"] == samples["b"]["jpg"]


def test_join_recaptioner_folder_counts_error_records(tmp_path, capsys):
    """The recaptioner writes one jsonl per shard into a folder; its error records are counted, never joined."""
    shard = _image_shard(tmp_path, ["a", "b", "c"])
    folder = tmp_path / "captions"
    folder.mkdir()
    good = {"positive_description": "desc", "negative_description": "neg", "positive_tags": ["t"],
            "negative_tags": ["n"]}
    (folder / "raw-0.jsonl").write_text(json.dumps({"key": "a", **good}) + "\n")
    failed = {"key": "b", "positive_description": None, "negative_description": None, "positive_tags": None,
              "negative_tags": None, "error": "unreadable_image"}
    (folder / "raw-1.jsonl").write_text(json.dumps(failed) + "\n" + json.dumps({"key": "c", **good}) + "\n")
    # The recaptioner's run summary sits beside the records (its errors by kind look like a keyed record).
    (folder / "summary-rank0.json").write_text(json.dumps({"samples": 3, "errors": {"unreadable_image": 1}}))
    out = str(tmp_path / "joined")
    assert main(["join", shard, str(folder), "--out", out]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matched"] == 2 and report["unmatched_images"] == 1
    assert report["problems"] == {"annotation_recaptioner_error": 1}
    samples = {s["__key__"]: s for s in _samples(os.path.join(out, "images-0.tar"))}
    assert "json" not in samples["b"] and json.loads(samples["c"]["json"])["positive_description"] == "desc"


def test_join_missing_annotations_is_an_error(tmp_path):
    shard = _image_shard(tmp_path, ["a"])
    with pytest.raises(ValueError, match="annotations"):
        main(["join", shard, str(tmp_path / "nothing-*.jsonl"), "--out", str(tmp_path / "out")])


def test_join_uid_keyed_json_with_field_map(tmp_path, capsys):
    shard = _image_shard(tmp_path, ["u1", "u2"])
    annotations = {"u1": {"long_caption": "long one", "hard_negative": "wrong one", "tags": ["x"],
                          "neg_tags": ["y"]},
                   "u2": {"long_caption": 7}}  # wrong type: reported, not merged
    with open(tmp_path / "vlm.json", "w") as f:
        json.dump(annotations, f)
    out = str(tmp_path / "joined")
    assert main(["join", shard, str(tmp_path / "vlm.json"), "--out", out, "--key-field", "uid", "--map",
                 "positive_description=long_caption", "negative_description=hard_negative",
                 "positive_tags=tags", "negative_tags=neg_tags"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["matched"] == 1 and report["unmatched_images"] == 1
    assert report["problems"] == {"annotation_wrong_type": 1}
    samples = {s["__key__"]: s for s in _samples(os.path.join(out, "images-0.tar"))}
    record = json.loads(samples["u1"]["json"])
    assert record["positive_description"] == "long one" and record["negative_tags"] == ["y"]
    assert validate_shards(os.path.join(out, "images-0.tar"), progress=False)["samples_ok"] == 1

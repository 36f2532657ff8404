"""Synthetic data: manifest layout, determinism, record semantics, round trip through the shard reader."""

import difflib
import json
import os
from collections import Counter

import numpy as np
import pytest
from data_helpers import IMAGE_SIZE, NUM_TRAIN, SHARD_SIZE, small_synthetic

from hqclip_fast.data import TagVocab, build_eval_dataset
from hqclip_fast.data.records import RECORD_FIELDS
from hqclip_fast.data.shards import expand_sources, iter_tar_samples
from hqclip_fast.data.synthetic import COLOURS, SHAPES, _sample_scene, counterfactual, write_synthetic


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_synthetic(str(tmp_path_factory.mktemp("syn")))


def _records(pattern):
    stats = Counter()
    out = [raw for url in expand_sources(pattern)[0] for raw in iter_tar_samples(url, stats)]
    assert not stats
    return out


def test_manifest_layout(manifest):
    root = os.path.dirname(manifest["tags"])
    with open(os.path.join(root, "manifest.json")) as f:
        assert json.load(f) == manifest
    assert manifest["num_train"] == NUM_TRAIN
    assert len(expand_sources(manifest["train"])[0]) == NUM_TRAIN // SHARD_SIZE
    assert manifest["train"].endswith("train/shard-{000000..000005}.tar")
    assert len(manifest["classnames"]) >= 10 and all("{}" in t for t in manifest["templates"])
    assert len(TagVocab.load(manifest["tags"])) > 20


def test_round_trip_records(manifest):
    samples = _records(manifest["train"])
    assert [s["__key__"] for s in samples] == [f"train{i:08d}" for i in range(NUM_TRAIN)]
    words = set(COLOURS) | set(SHAPES) | {"small", "medium", "large"}
    for s in samples:
        record = json.loads(s["json"])
        assert set(RECORD_FIELDS) <= set(record) and record["key"] == s["__key__"]
        assert s["jpg"][:2] == b"\xff\xd8"
        pos, neg = record["positive_description"], record["negative_description"]
        # minimal edit: the same template with one or two attribute edits (each edit is one changed run of
        # at most 2 words, e.g. "bottom right" -> "left")
        edits = [op for op in difflib.SequenceMatcher(a=pos.split(), b=neg.split()).get_opcodes() if op[0] != "equal"]
        assert pos != neg and 1 <= len(edits) <= 2, (pos, neg)
        assert all(max(i2 - i1, j2 - j1) <= 4 for _, i1, i2, j1, j2 in edits), (pos, neg)
        assert set(record["positive_tags"]).isdisjoint(record["negative_tags"])
        assert any(w in words for w in record["positive_tags"])
    alt = Counter(json.loads(s["json"])["alt_text"] for s in samples)
    assert len(alt) > 20  # varied, not a copy of the description


def test_deterministic_by_seed(tmp_path):
    a = write_synthetic(str(tmp_path / "a"), 30, 16, seed=5, image_size=IMAGE_SIZE, num_zeroshot=12, num_hardneg=6)
    b = write_synthetic(str(tmp_path / "b"), 30, 16, seed=5, image_size=IMAGE_SIZE, num_zeroshot=12, num_hardneg=6)
    c = write_synthetic(str(tmp_path / "c"), 30, 16, seed=6, image_size=IMAGE_SIZE, num_zeroshot=12, num_hardneg=6)
    for split in ("train", "zeroshot", "hardneg"):
        for ua, ub, uc in zip(*(expand_sources(m[split])[0] for m in (a, b, c))):
            assert open(ua, "rb").read() == open(ub, "rb").read()
            assert open(ua, "rb").read() != open(uc, "rb").read()


def test_eval_sets(manifest):
    zeroshot = list(build_eval_dataset(manifest["zeroshot"], image_size=IMAGE_SIZE))
    labels = [label for _, _, label in zeroshot]
    assert len(zeroshot) == 48 and set(labels) == set(range(len(manifest["classnames"])))
    assert zeroshot[0][1].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    hardneg = list(build_eval_dataset(manifest["hardneg"], image_size=IMAGE_SIZE))
    assert len(hardneg) == 20
    for _, _, record in hardneg:
        assert record["positive_text"] != record["negative_text"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        write_synthetic(str(tmp_path), 0, 10)
    with pytest.raises(ValueError, match="image_size"):
        write_synthetic(str(tmp_path), 10, 10, image_size=8)


def _edited_attribute(before, after):
    (a,), (b,) = before.objects, after.objects
    return next(name for name in ("colour", "shape", "size", "position") if getattr(a, name) != getattr(b, name))


def test_counterfactual_follows_edit_weights():
    rng = np.random.default_rng(0)
    weights = {"colour": 0.1, "shape": 0.6, "size": 0.1, "position": 0.2}
    edited = Counter()
    for _ in range(2000):
        scene = _sample_scene(rng, 1)
        edited[_edited_attribute(scene, counterfactual(scene, rng, 1, tuple(weights), list(weights.values())))] += 1
    for name, weight in weights.items():
        assert abs(edited[name] / 2000 - weight) < 0.04, edited
    uniform = Counter(_edited_attribute(s, counterfactual(s, rng, 1))
                      for s in (_sample_scene(rng, 1) for _ in range(2000)))
    assert all(abs(n / 2000 - 0.25) < 0.04 for n in uniform.values()) and len(uniform) == 4, uniform


def test_demo_reuses_a_set_only_from_the_same_generator(tmp_path, monkeypatch):
    from hqclip_fast import demo

    first = demo.ensure_synthetic(tmp_path, num_samples=8, image_size=IMAGE_SIZE, seed=0)
    stamp = os.path.getmtime(tmp_path / "manifest.json")
    assert demo.ensure_synthetic(tmp_path, num_samples=8, image_size=IMAGE_SIZE, seed=0) == first
    assert os.path.getmtime(tmp_path / "manifest.json") == stamp  # reused, not rewritten
    monkeypatch.setattr(demo, "GENERATOR_VERSION", first["generator_version"] + 1)
    again = demo.ensure_synthetic(tmp_path, num_samples=8, image_size=IMAGE_SIZE, seed=0)
    assert again["generator_version"] == first["generator_version"]  # written by the current generator
    assert os.path.getmtime(tmp_path / "manifest.json") > stamp  # regenerated: the cached set was stale

"""clip_benchmark's webdataset layout (read and written) and `hqclip-eval --suite`: a suite file's sets, each
evaluated or reported as missing or failed. The numbers themselves are checked against clip_benchmark in
test_clip_benchmark.py."""

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from hqclip_fast.config import EvalConfig
from hqclip_fast.data import ClipTokenizer
from hqclip_fast.data.benchmark_sets import read_benchmark_set, write_benchmark_set, write_synthetic_benchmark
from hqclip_fast.eval import EvalSuite
from hqclip_fast.eval import cli as eval_cli
from hqclip_fast.eval_suite import load_suite, run_suite
from hqclip_fast.export import export_open_clip
from hqclip_fast.model import create_model

MODEL, SIZE = "hqclip-micro", 32
EXAMPLE_SUITE = Path(__file__).resolve().parent.parent / "configs" / "eval" / "datacomp.yaml"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return write_synthetic_benchmark(tmp_path_factory.mktemp("sets"), num_zeroshot=24, num_retrieval=16, seed=3,
                                     image_size=SIZE, shard_size=10)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(MODEL, image_size=SIZE).eval()


def test_synthetic_sets_in_clip_benchmark_layout(sets):
    zeroshot, retrieval = read_benchmark_set(sets["zeroshot"]), read_benchmark_set(sets["retrieval"])
    assert (zeroshot.kind, retrieval.kind) == ("classification", "retrieval")
    assert zeroshot.shards.endswith("test/{0..2}.tar") and len(zeroshot.classnames) == 12
    assert all("{c}" in t for t in zeroshot.templates)  # clip_benchmark formats templates with c=<name>
    assert (Path(sets["retrieval"]) / "dataset_type.txt").read_text() == "retrieval\n"


def test_layout_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no test/nshards.txt"):
        read_benchmark_set(tmp_path)
    root = tmp_path / "captions"
    write_benchmark_set(root, [(b"x", "jpg", ["one", "two\nlines"])], split="val")
    with tarfile.open(root / "val" / "0.tar") as tar:  # one caption a line; clip_benchmark's escape inside one
        assert tar.extractfile("s0000000.txt").read() == b"one\ntwo\\nlines"
    with pytest.raises(FileNotFoundError, match="no test/nshards.txt"):
        read_benchmark_set(root)
    (root / "val" / "nshards.txt").write_text("2\n")
    with pytest.raises(FileNotFoundError, match="missing 1.tar"):
        read_benchmark_set(root, "val")
    (root / "dataset_type.txt").write_text("multilabel\n")
    (root / "val" / "nshards.txt").write_text("1\n")
    with pytest.raises(ValueError, match="multilabel"):
        read_benchmark_set(root, "val")
    blank = write_benchmark_set(tmp_path / "blank", [(b"x", "jpg", 0)], classnames=["a", "b"], templates=["{c}"])
    (Path(blank.root) / "classnames.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match="blank line 2"):
        read_benchmark_set(blank.root)


def test_example_suite_lists_imagenet_and_the_retrieval_sets():
    sets = {s.name: s for s in load_suite(EXAMPLE_SUITE)}
    assert {"imagenet1k", "mscoco_captions", "flickr30k"} <= set(sets) and len(sets) >= 30
    assert sets["imagenet1k"].root == "/data/eval/wds_imagenet1k_test" and sets["imagenet1k"].split == "test"


@pytest.mark.parametrize("text,match", [
    ("sets: []\n", "non-empty list"),
    ("sets: [{name: a}]\n", "must have `name` and `root`"),
    ("sets: [{name: a, root: x}]\nroot: y\n", "unknown keys"),
    ("sets: [{name: a, root: x}, {name: a, root: y}]\n", "more than once"),
])
def test_suite_file_errors(tmp_path, text, match):
    (tmp_path / "suite.yaml").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_suite(tmp_path / "suite.yaml")


def test_suite_reports_every_set_and_matches_single_set_runs(sets, model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sets["zeroshot"], broken)
    (broken / "dataset_type.txt").write_text("multilabel\n")
    (tmp_path / "suite.yaml").write_text(
        f"root_dir: {Path(sets['zeroshot']).parent}\nsets:\n"
        "  - {name: zs, root: zeroshot}\n  - {name: gone, root: not_here}\n"
        f"  - {{name: broken, root: {broken}}}\n  - {{name: ret, root: retrieval}}\n")
    lines = []
    results = run_suite(load_suite(tmp_path / "suite.yaml"), model, ClipTokenizer(), "cpu", image_size=SIZE,
                        batch_size=8, report=lines.append)
    assert [r["status"] for r in results.values()] == ["ok", "missing", "error", "ok"]
    assert [line.split()[0] for line in lines] == ["zs", "gone", "broken", "ret"]
    assert "MISSING" in lines[1] and "ERROR" in lines[2] and "multilabel" in lines[2]
    assert results["zs"]["zeroshot_samples"] == 24 and results["ret"]["retrieval_samples"] == 16

    # The same sets through --zeroshot / --image-text roots give the same numbers.
    export_open_clip(model, MODEL, tmp_path / "export")
    eval_cli(["--model", MODEL, "--pretrained", str(tmp_path / "export" / "open_clip_pytorch_model.bin"),
              "--zeroshot", sets["zeroshot"], "--image-text", sets["retrieval"], "--batch-size", "8"])
    single = json.loads(capsys.readouterr().out)
    for key in ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall", "image_to_text_R@1"):
        assert single[key] == results["zs" if key.startswith("zeroshot") else "ret"][key], key
    # --amp autocasts as clip_benchmark does by default (bf16 here): the same set, rounding-level changes.
    eval_cli(["--model", MODEL, "--pretrained", str(tmp_path / "export" / "open_clip_pytorch_model.bin"),
              "--zeroshot", sets["zeroshot"], "--batch-size", "8", "--amp"])
    amp = json.loads(capsys.readouterr().out)
    assert amp["zeroshot_samples"] == 24 and abs(amp["zeroshot_top5"] - single["zeroshot_top5"]) <= 0.25
    with pytest.raises(ValueError, match="is a classification set, not a retrieval set"):
        EvalSuite.from_config(EvalConfig(image_text=sets["zeroshot"]), SIZE)

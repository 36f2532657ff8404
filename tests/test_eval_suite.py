"""clip_benchmark's webdataset layout (read and written) and `hqclip-eval --suite`: a suite file's sets, each
evaluated or reported as missing or failed. The numbers themselves are checked against clip_benchmark in
test_clip_benchmark.py."""

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hqclip_fast.config import EvalConfig
from hqclip_fast.data import ClipTokenizer
from hqclip_fast.data.benchmark_sets import read_benchmark_set, write_benchmark_set, write_synthetic_benchmark
from hqclip_fast.data.shards import expand_sources, iter_tar_samples
from hqclip_fast.eval import EvalSuite
from hqclip_fast.eval import cli as eval_cli
from hqclip_fast.eval_suite import format_average, load_suite, run_suite, suite_average
from hqclip_fast.export import export_open_clip
from hqclip_fast.model import create_model

MODEL, SIZE = "hqclip-micro", 32
EXAMPLE_SUITE = Path(__file__).resolve().parent.parent / "configs" / "eval" / "datacomp.yaml"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return write_synthetic_benchmark(tmp_path_factory.mktemp("sets"), num_zeroshot=24, num_retrieval=16,
                                     num_association=8, seed=3, image_size=SIZE, shard_size=10)


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


def test_example_suite_is_datacomps_38_tasks_with_their_main_metrics():
    sets = {s.name: s for s in load_suite(EXAMPLE_SUITE)}
    assert len(sets) == 38 and len({s.datacomp for s in sets.values()}) == 38
    assert sets["imagenet1k"].root == "/data/eval/wds_imagenet1k_test" and sets["imagenet1k"].split == "test"
    # DataComp's tasklist.yml: acc1 unless it names another main metric.
    named = {name: s.metric for name, s in sets.items() if s.metric != "acc1"}
    assert named == {
        "vtab/caltech101": "mean_per_class_recall", "fgvc_aircraft": "mean_per_class_recall",
        "vtab/flowers": "mean_per_class_recall", "vtab/pets": "mean_per_class_recall",
        "flickr30k": "mean_recall@1", "mscoco_captions": "mean_recall@1", "winogavil": "jaccard_score_10-12",
        "wilds/iwildcam": "F1-macro_all", "wilds/fmow": "acc_worst_region", "dollar_street": "acc_top5_wg",
        "geode": "acc_wg"}
    assert sets["wilds/fmow"].root.endswith("wds_wilds-fmow_test") and sets["geode"].root.endswith("wds_geode_test")


def test_worst_group_metric_reads_the_npy_metadata(sets, model, tmp_path):
    """A classification set whose samples carry WILDS-style metadata ([region, year]): acc_wg is the worst top-1
    over the regions; without the metadata the set is an error that says so."""
    zeroshot = read_benchmark_set(sets["zeroshot"])
    with_labels = [(s["webp"], "webp", int(s["cls"])) for s in _tar_samples(zeroshot.shards)]
    regions = [i % 3 for i in range(len(with_labels))]
    write_benchmark_set(tmp_path / "geo", [(*sample, [r, 2016]) for sample, r in zip(with_labels, regions)],
                        classnames=zeroshot.classnames, templates=zeroshot.templates, shard_size=10)
    (tmp_path / "suite.yaml").write_text(
        f"root_dir: {tmp_path}\nsets:\n  - {{name: geo, root: geo, metric: acc_wg}}\n"
        f"  - {{name: top5, root: geo, metric: acc_top5_wg}}\n"
        f"  - {{name: plain, root: {sets['zeroshot']}, metric: acc_worst_region}}\n")
    results = run_suite(load_suite(tmp_path / "suite.yaml"), model, ClipTokenizer(), "cpu", image_size=SIZE,
                        batch_size=8, report=lambda line: None)
    geo = results["geo"]
    assert geo["zeroshot_groups"] == 3 and geo["main_metric"] == geo["zeroshot_worst_group_top1"]
    assert geo["main_metric"] <= geo["zeroshot_top1"] and results["top5"]["main_metric"] == geo[
        "zeroshot_worst_group_top5"]
    assert results["plain"]["status"] == "error" and "no .npy metadata" in results["plain"]["reason"]


def _tar_samples(shards: str) -> list[dict]:
    return [raw for source in expand_sources(shards) for url in source for raw in iter_tar_samples(url, Counter())]


def test_datacomp_average_of_a_made_up_result_file(tmp_path):
    """Results as `hqclip-eval --suite ... --out` writes them, made up: ImageNet top-1 0.70, Caltech-101's
    per-class recall 0.80 (its top-1 0.90 must not count), MSCOCO R@1 0.60 image->text and 0.40 text->image
    (mean 0.50), CIFAR-10 missing, iWildCam unsupported, the other 33 tasks absent. By hand:
    (0.70 + 0.80 + 0.50) / 3 = 0.6667 over 3 of 38 tasks, partial."""
    made_up = {"sets": {
        "imagenet1k": {"status": "ok", "task": "classification", "zeroshot_top1": 0.70,
                       "zeroshot_mean_per_class_recall": 0.65},
        "vtab/caltech101": {"status": "ok", "task": "classification", "zeroshot_top1": 0.90,
                            "zeroshot_mean_per_class_recall": 0.80},
        "mscoco_captions": {"status": "ok", "task": "retrieval", "image_to_text_R@1": 0.60,
                            "text_to_image_R@1": 0.40},
        "cifar10": {"status": "missing", "reason": "no test/nshards.txt"},
        "wilds/iwildcam": {"status": "unsupported", "reason": "F1-macro_all"},
    }}
    (tmp_path / "results.json").write_text(json.dumps(made_up))
    average = suite_average(load_suite(EXAMPLE_SUITE), json.loads((tmp_path / "results.json").read_text())["sets"])
    assert average["average"] == pytest.approx((0.70 + 0.80 + 0.50) / 3, abs=1e-12)
    assert (average["tasks_scored"], average["tasks"], average["partial"]) == (3, 38, True)
    assert average["not_scored"]["cifar10"] == "missing" and average["not_scored"]["wilds/iwildcam"] == "unsupported"
    assert average["not_scored"]["sun397"] == "not run" and len(average["not_scored"]) == 35
    line = format_average(average)
    assert "0.6667" in line and "3 of 38 tasks" in line and "PARTIAL" in line and "cifar10 (missing)" in line

    complete = [s for s in load_suite(EXAMPLE_SUITE) if s.name in ("imagenet1k", "vtab/caltech101", "mscoco_captions")]
    whole = suite_average(complete, made_up["sets"])
    assert not whole["partial"] and "PARTIAL" not in format_average(whole)


def test_datacomp_average_of_all_38_tasks_made_up():
    """Every task of configs/eval/datacomp.yaml evaluated (made up): task i (in the file's order) scores
    (i + 1) / 100 in the field its main metric reads, WinoGAViL's jaccard_score_10-12 included. By hand:
    (0.01 + 0.38) / 2 = 0.195 over 38 of 38 tasks, not partial. WinoGAViL without examples of 10 or 12
    candidates has no score: 37 of 38, partial."""
    suite = load_suite(EXAMPLE_SUITE)
    fields = {"acc1": ["zeroshot_top1"], "mean_per_class_recall": ["zeroshot_mean_per_class_recall"],
              "F1-macro_all": ["zeroshot_macro_f1"], "acc_worst_region": ["zeroshot_worst_group_top1"],
              "acc_wg": ["zeroshot_worst_group_top1"], "acc_top5_wg": ["zeroshot_worst_group_top5"],
              "mean_recall@1": ["image_to_text_R@1", "text_to_image_R@1"],
              "jaccard_score_10-12": ["jaccard_score_10-12"]}
    made_up = {s.name: {"status": "ok", **dict.fromkeys(fields[s.metric], (i + 1) / 100)} for i, s in enumerate(suite)}
    average = suite_average(suite, made_up)
    assert average["average"] == pytest.approx(0.195, abs=1e-12)
    assert (average["tasks_scored"], average["tasks"], average["partial"]) == (38, 38, False)
    assert "38 of 38 tasks)" in format_average(average)
    made_up["winogavil"]["jaccard_score_10-12"] = None
    average = suite_average(suite, made_up)
    assert (average["tasks_scored"], average["partial"]) == (37, True)
    assert average["not_scored"] == {"winogavil": "no value for its main metric"}


def test_winogavil_in_the_suite_scores_as_datacomp(sets, model, tmp_path):
    """The synthetic WinoGAViL set (8 examples: 5, 6, 10, 12 candidates in turn) evaluated as DataComp's
    wino_eval.py does it, recomputed here from the model's embeddings with numpy's argsort and sklearn's
    jaccard_score; the same root without `metric` is recognised by its dataset_type.txt."""
    jaccard_score = pytest.importorskip("sklearn.metrics").jaccard_score
    from hqclip_fast.data.winogavil import read_association_set

    (tmp_path / "suite.yaml").write_text(f"root_dir: {Path(sets['winogavil']).parent}\nsets:\n"
                                         "  - {name: winogavil, root: winogavil, metric: jaccard_score_10-12}\n"
                                         "  - {name: plain, root: winogavil}\n")
    lines = []
    results = run_suite(load_suite(tmp_path / "suite.yaml"), model, ClipTokenizer(), "cpu", image_size=SIZE,
                        batch_size=16, report=lines.append)
    wino = results["winogavil"]
    assert wino["status"] == "ok" and wino["task"] == "association" and wino["association_samples"] == 8
    assert wino["main_metric"] == wino["jaccard_score_10-12"] and wino["main_metric_name"] == "jaccard_score_10-12"
    assert results["plain"]["avg_jaccard_score"] == wino["avg_jaccard_score"]
    assert lines[0].startswith("winogavil") and f"main: jaccard_score_10-12 {wino['main_metric']:.4f}" in lines[0]
    assert "(8 examples)" in lines[0] and "main:" not in lines[1]

    from PIL import Image

    from hqclip_fast.data.samples import eval_transform
    scores, groups = [], []
    with torch.no_grad():
        for example in read_association_set(sets["winogavil"]).examples:
            images = torch.stack([eval_transform(Image.open(p).convert("RGB"), SIZE) for p in example.images])
            image_features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
            cue = example.cue.lower()
            prompt = f"{'An' if cue[0] in 'aeiou' else 'A'} {cue}"
            text_features = torch.nn.functional.normalize(model.encode_text(ClipTokenizer()([prompt])), dim=-1)
            logits = (text_features @ image_features.T).squeeze(0).numpy()
            truth = np.array(example.associated)
            predicted = np.isin(np.arange(len(truth)), np.argsort(logits)[-truth.sum():])
            scores.append(jaccard_score(truth, predicted))
            groups.append(len(truth))
    scores, groups = np.array(scores), np.array(groups)
    assert sorted(set(groups)) == [5, 6, 10, 12]
    assert wino["avg_jaccard_score"] == pytest.approx(scores.mean(), abs=1e-12)
    assert wino["jaccard_score_5-6"] == pytest.approx(scores[groups <= 6].mean(), abs=1e-12)
    assert wino["jaccard_score_10-12"] == pytest.approx(scores[groups >= 10].mean(), abs=1e-12)
    assert wino["jaccard_score_12"] == pytest.approx(scores[groups == 12].mean(), abs=1e-12)


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
        "  - {name: zs, root: zeroshot, metric: mean_per_class_recall}\n  - {name: gone, root: not_here}\n"
        f"  - {{name: broken, root: {broken}}}\n  - {{name: ret, root: retrieval, metric: mean_recall@1}}\n"
        "  - {name: wino, root: winogavil, metric: jaccard_score_10-12}\n"
        "  - {name: wrong_kind, root: retrieval, metric: acc1}\n  - {name: odd, root: retrieval, metric: recall@5}\n"
        "  - {name: wino_gone, root: retrieval, metric: jaccard_score_10-12}\n")
    lines = []
    results = run_suite(load_suite(tmp_path / "suite.yaml"), model, ClipTokenizer(), "cpu", image_size=SIZE,
                        batch_size=8, report=lines.append)
    assert [r["status"] for r in results.values()] == ["ok", "missing", "error", "ok", "ok", "error",
                                                       "unsupported", "missing"]
    assert [line.split()[0] for line in lines] == ["zs", "gone", "broken", "ret", "wino", "wrong_kind", "odd",
                                                   "wino_gone"]
    assert "MISSING" in lines[1] and "ERROR" in lines[2] and "multilabel" in lines[2]
    assert f"main: jaccard_score_10-12 {results['wino']['main_metric']:.4f}" in lines[4]
    assert "needs a classification" in lines[5] and "UNSUPPORTED" in lines[6] and "recall@5" in lines[6]
    assert "MISSING" in lines[7] and "no test.jsonl" in lines[7] and "hqclip-data winogavil" in lines[7]
    assert results["zs"]["main_metric"] == results["zs"]["zeroshot_mean_per_class_recall"]
    assert f"main: mean_per_class_recall {results['zs']['main_metric']:.4f}" in lines[0]
    ret = results["ret"]
    assert ret["main_metric"] == pytest.approx((ret["image_to_text_R@1"] + ret["text_to_image_R@1"]) / 2)
    assert results["zs"]["zeroshot_samples"] == 24 and results["ret"]["retrieval_samples"] == 16

    # The same sets through --zeroshot / --image-text roots give the same numbers.
    export_open_clip(model, MODEL, tmp_path / "export")
    eval_cli(["--model", MODEL, "--pretrained", str(tmp_path / "export" / "open_clip_pytorch_model.bin"),
              "--zeroshot", sets["zeroshot"], "--image-text", sets["retrieval"], "--batch-size", "8"])
    single = json.loads(capsys.readouterr().out)
    for key in ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall", "image_to_text_R@1"):
        assert single[key] == results["zs" if key.startswith("zeroshot") else "ret"][key], key
    # --suite prints a line per set, then the average of the main metrics (partial here), and exits with 1.
    with pytest.raises(SystemExit) as exit_status:
        eval_cli(["--model", MODEL, "--pretrained", str(tmp_path / "export" / "open_clip_pytorch_model.bin"),
                  "--suite", str(tmp_path / "suite.yaml"), "--batch-size", "8", "--out", str(tmp_path / "s.json")])
    assert exit_status.value.code == 1
    average_line = capsys.readouterr().out.splitlines()[8]
    expected = (results["zs"]["main_metric"] + results["ret"]["main_metric"] + results["wino"]["main_metric"]) / 3
    assert average_line.startswith("average of main metrics") and f"{expected:.4f}" in average_line
    assert "3 of 6 tasks; PARTIAL" in average_line and "wino_gone (missing)" in average_line
    assert "odd (unsupported)" in average_line
    assert json.loads((tmp_path / "s.json").read_text())["average"]["average"] == pytest.approx(expected)
    # --amp autocasts as clip_benchmark does by default (bf16 here): the same set, rounding-level changes.
    eval_cli(["--model", MODEL, "--pretrained", str(tmp_path / "export" / "open_clip_pytorch_model.bin"),
              "--zeroshot", sets["zeroshot"], "--batch-size", "8", "--amp"])
    amp = json.loads(capsys.readouterr().out)
    assert amp["zeroshot_samples"] == 24 and abs(amp["zeroshot_top5"] - single["zeroshot_top5"]) <= 0.25
    with pytest.raises(ValueError, match="is a classification set, not a retrieval set"):
        EvalSuite.from_config(EvalConfig(image_text=sets["zeroshot"]), SIZE)

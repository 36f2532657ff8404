"""WinoGAViL, DataComp's 38th task: the Jaccard score of the top-n candidates (checked by hand), the local layout
and its converter from rows shaped like Hugging Face's nlphuji/winogavil, and the evaluation shared by 2 gloo
ranks equal to one process's."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from dist_helpers import gloo_group
from PIL import Image

from hqclip_fast.data import ClipTokenizer
from hqclip_fast.data.cli import main as data_cli
from hqclip_fast.data.synthetic import make_association_example
from hqclip_fast.data.winogavil import (
    convert_hf_winogavil,
    is_association_root,
    read_association_set,
    write_association_set,
)
from hqclip_fast.eval import (
    AssociationTask,
    association_eval,
    association_metrics,
    association_prompt,
    top_n_jaccard,
)
from hqclip_fast.eval_ranks import EvalRanks
from hqclip_fast.model import create_model

MODEL, SIZE = "hqclip-micro", 32


def _mask(n: int, true: list[int]) -> torch.Tensor:
    return torch.tensor([i in true for i in range(n)])


def test_jaccard_of_the_top_n_candidates_by_hand():
    # 5 candidates, associations {0, 2}: the top 2 are {0, 1}; |{0}| / |{0, 1, 2}| = 1/3.
    assert top_n_jaccard(torch.tensor([0.9, 0.8, 0.1, 0.3, 0.2]), _mask(5, [0, 2])) == pytest.approx(1 / 3)
    # 6 candidates, association {1}, candidates 0 and 1 tied first: the lower index wins, {0}: 0 / 2.
    assert top_n_jaccard(torch.tensor([0.5, 0.5, 0.1, 0.2, 0.0, -0.1]), _mask(6, [1])) == 0
    assert top_n_jaccard(torch.tensor([0.4, 0.5, 0.5, 0.2, 0.0, -0.1]), _mask(6, [1])) == 1
    # 10 candidates, associations {0, 1, 2}: the top 3 are {0, 1, 5}; 2 / 4.
    ten = torch.tensor([0.9, 0.8, 0.1, 0.0, 0.0, 0.7, -0.2, 0.3, 0.2, 0.1])
    assert top_n_jaccard(ten, _mask(10, [0, 1, 2])) == 0.5
    # 12 candidates: {3, 7} found exactly (1), then {0, 1, 2, 3} against the top 4 {8, 9, 10, 11} (0).
    twelve = torch.arange(12, dtype=torch.float32) / 12
    twelve_hit = twelve.clone()
    twelve_hit[[3, 7]] = 2.0
    assert top_n_jaccard(twelve_hit, _mask(12, [3, 7])) == 1
    assert top_n_jaccard(twelve, _mask(12, [0, 1, 2, 3])) == 0
    with pytest.raises(ValueError, match="at least one association"):
        top_n_jaccard(ten, _mask(10, []))

    # DataComp's per-example rule where nothing ties: np.argsort's last n, sklearn's jaccard_score.
    jaccard_score = pytest.importorskip("sklearn.metrics").jaccard_score
    for similarity, truth in ((ten, _mask(10, [0, 1, 2])), (twelve, _mask(12, [0, 1, 2, 3])),
                              (torch.tensor([0.9, 0.8, 0.1, 0.3, 0.2]), _mask(5, [0, 2]))):
        top = np.argsort(similarity.numpy())[-int(truth.sum()):]
        assert top_n_jaccard(similarity, truth) == jaccard_score(truth.numpy(), np.isin(np.arange(len(truth)), top))


def test_datacomp_aggregates_by_hand():
    scores, sizes = [1 / 3, 0.0, 0.5, 1.0, 0.0], [5, 6, 10, 12, 12]
    metrics = association_metrics(scores, sizes)
    assert metrics["avg_jaccard_score"] == pytest.approx((1 / 3 + 0.5 + 1) / 5)
    assert metrics["jaccard_score_5"] == pytest.approx(1 / 3) and metrics["jaccard_score_6"] == 0
    assert metrics["jaccard_score_10"] == 0.5 and metrics["jaccard_score_12"] == 0.5
    assert metrics["jaccard_score_5-6"] == pytest.approx(1 / 6) and metrics["jaccard_score_10-12"] == 0.5
    assert metrics["association_samples"] == 5
    # A group without examples is None (DataComp: the NaN of an empty mean).
    only_five = association_metrics([0.25, 0.75], [5, 5])
    assert only_five["jaccard_score_5-6"] == 0.5 and only_five["jaccard_score_10-12"] is None
    assert only_five["jaccard_score_6"] is None and only_five["avg_jaccard_score"] == 0.5
    with pytest.raises(ValueError, match="no examples"):
        association_metrics([], [])


def test_prompt_is_datacomps():
    assert association_prompt("Apple") == "An apple" and association_prompt("umbrella") == "An umbrella"
    assert association_prompt("Dog") == "A dog" and association_prompt("yellow") == "A yellow"


def _png(colour, size=8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_converter_takes_every_image_form_of_hf_rows(tmp_path):
    """Rows as nlphuji/winogavil gives them: candidate_images decoded (PIL), undecoded ({"bytes", "path"}, the
    bytes or only the path) or paths; candidate lists as lists or as the set card's list-literal strings."""
    on_disk = tmp_path / "blue.jpg"
    on_disk.write_bytes(_jpeg("blue"))
    pil = Image.new("RGB", (8, 8), (200, 10, 30))
    rows = [
        {"cue": "Fire", "candidates": ["flame", "sea", "sky", "ember", "snow"], "associations": ["flame", "ember"],
         "candidate_images": [pil, {"bytes": _jpeg("green"), "path": None},
                              {"bytes": None, "path": str(on_disk)}, str(on_disk), _png_dict("white")]},
        {"cue": "ocean", "candidates": "['sea', 'flame', 'sky', 'ember', 'snow', 'wave']",
         "associations": '["sea", "wave"]',
         "candidate_images": [{"bytes": _jpeg("green"), "path": "x.jpg"}, pil, on_disk, on_disk, _png_dict("white"),
                              _png_dict("cyan")]},
    ]
    report = write_association_set(tmp_path / "wino", rows)
    assert report["examples"] == 2 and report["images_written"] == 5  # red, green, blue, white, cyan: once each
    assert is_association_root(tmp_path / "wino")
    first, second = read_association_set(tmp_path / "wino").examples
    assert first.cue == "Fire" and first.associated == (True, False, False, True, False)
    assert second.candidates == ("sea", "flame", "sky", "ember", "snow", "wave")
    assert second.associated == (True, False, False, False, False, True)
    with Image.open(first.images[0]) as img:  # a decoded image is stored losslessly (PNG)
        assert img.format == "PNG" and np.array_equal(np.asarray(img), np.asarray(pil))
    assert Path(first.images[1]).read_bytes() == _jpeg("green") and first.images[1].endswith(".jpg")
    assert first.images[2] == first.images[3] == second.images[2]  # the same file, stored once
    assert Path(first.images[2]).read_bytes() == on_disk.read_bytes()


def _png_dict(colour) -> dict:
    return {"bytes": _png(colour), "path": None}


@pytest.mark.parametrize("row,match", [
    ({"cue": "a", "candidates": ["x", "y"], "associations": ["z"]}, r"row 1: associations \['z'\] are not among"),
    ({"cue": "a", "candidates": ["x", "y"], "associations": ["x"], "candidate_images": []},
     "one image per candidate"),
    ({"cue": "a", "candidates": ["x", "y"], "associations": ["x"], "candidate_images": None},
     "row 1: missing field candidate_images"),
    ({"cue": "a", "candidates": ["x", "x"], "associations": ["x"]}, "names a candidate twice"),
    ({"cue": "a", "candidates": ["x", "y"], "associations": []}, "is empty"),
    ({"candidates": ["x", "y"], "associations": ["x"]}, r"row 1: missing field\(s\) \['cue'\]"),
    ({"cue": "a", "candidates": ["x", "y"], "associations": ["x"], "candidate_images": [b"jpeg?", b"no"]},
     "expected a PIL image"),
    ({"cue": "a", "candidates": ["x", "y"], "associations": ["x"],
      "candidate_images": [{"bytes": b"not an image"}, {"bytes": b"no"}]}, "image of 'x': not a readable image"),
])
def test_converter_errors_name_the_row_and_leave_no_set(tmp_path, row, match):
    good = {"cue": "a", "candidates": ["x", "y"], "associations": ["x"],
            "candidate_images": [_png_dict("red"), _png_dict("blue")]}
    with pytest.raises(ValueError, match=match):
        bad = {k: v for k, v in {"candidate_images": good["candidate_images"], **row}.items() if v is not None}
        write_association_set(tmp_path / "wino", [good, bad])
    assert not (tmp_path / "wino" / "test.jsonl").exists()


def test_loader_errors_name_the_line(tmp_path):
    root = tmp_path / "wino"
    with pytest.raises(FileNotFoundError, match="no test.jsonl .*hqclip-data winogavil"):
        read_association_set(root)
    write_association_set(root, [{"cue": "a", "candidates": ["x", "y"], "associations": ["x"],
                                  "candidate_images": [_png_dict("red"), _png_dict("blue")]}])
    good = (root / "test.jsonl").read_text().strip()
    record = json.loads(good)
    for line, match in (
            ("{not json", "test.jsonl:2: not JSON"),
            (json.dumps({k: v for k, v in record.items() if k != "associations"}),
             r"test.jsonl:2: missing field\(s\) \['associations'\]"),
            (json.dumps({**record, "associations": ["q"]}), r"test.jsonl:2: associations \['q'\] are not among"),
            (json.dumps({**record, "images": record["images"][:1]}), "test.jsonl:2: `images` must list one path"),
            (json.dumps({**record, "images": ["/abs.png", "b.png"]}), "test.jsonl:2: `images` must list one path"),
            (json.dumps({**record, "images": ["images/gone.png", record["images"][1]]}),
             r"test.jsonl:2: missing image file\(s\) \['images/gone.png'\]"),
            ("", "test.jsonl:2: blank line")):
        (root / "test.jsonl").write_text(f"{good}\n{line}\n")
        with pytest.raises(ValueError, match=match):
            read_association_set(root)
    (root / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="no examples"):
        read_association_set(root)


def test_hf_conversion_without_datasets_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ValueError, match="pip install datasets"):
        convert_hf_winogavil(tmp_path / "wino")
    with pytest.raises(SystemExit, match="hqclip-data winogavil: .*pip install datasets"):
        data_cli(["winogavil", "--out", str(tmp_path / "wino")])


def test_hf_conversion_from_a_saved_dataset(tmp_path):
    """A set saved with datasets' save_to_disk in nlphuji/winogavil's shape (a list of Image features): the
    images keep their original bytes (read undecoded), not re-encoded."""
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    rows = {"cue": ["rain", "Ice"], "candidates": [["cloud", "sun", "desert", "umbrella", "sand"],
                                                   ["snow", "fire", "lava", "cold", "sauna"]],
            "associations": [["cloud", "umbrella"], ["snow", "cold"]],
            "candidate_images": [[{"bytes": _jpeg(c), "path": None} for c in ("gray", "yellow", "orange", "black",
                                                                                 "tan")],
                                 [{"bytes": _jpeg(c), "path": None} for c in ("white", "red", "maroon", "navy",
                                                                                 "brown")]]}
    features = datasets.Features({"cue": datasets.Value("string"),
                                  "candidates": datasets.Sequence(datasets.Value("string")),
                                  "associations": datasets.Sequence(datasets.Value("string")),
                                  "candidate_images": datasets.Sequence(datasets.Image())})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "hf")
    assert data_cli(["winogavil", "--out", str(tmp_path / "wino"), "--from-disk", str(tmp_path / "hf"),
                     "--no-progress"]) == 0
    first, second = read_association_set(tmp_path / "wino").examples
    assert second.cue == "Ice" and second.associated == (True, False, False, True, False)
    assert [Path(p).read_bytes() for p in first.images] == [i["bytes"] for i in rows["candidate_images"][0]]


def _model():
    torch.manual_seed(0)
    return create_model(MODEL, image_size=SIZE).eval()


def _task(root: str) -> AssociationTask:
    return AssociationTask(read_association_set(root).examples, SIZE)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    """7 synthetic examples (5, 6, 10, 12, 5, 6, 10 candidates): 2 ranks get 4 and 3 of them."""
    root = tmp_path_factory.mktemp("winogavil") / "wino"
    write_association_set(root, (make_association_example(i, 5, SIZE) for i in range(7)))
    return str(root)


def _distributed_worker(rank: int, world_size: int, root: str, out_dir: str) -> None:
    from hqclip_fast.parallelize import parallelize_model

    torch.set_num_threads(1)
    with gloo_group(Path(out_dir, "init"), rank, world_size):
        model = parallelize_model(_model())  # FSDP2: every encode call is a collective
        calls = []
        model.visual.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        result = association_eval(model, ClipTokenizer(), _task(root).batches(12, EvalRanks.current("cpu")), "cpu",
                                  ranks=EvalRanks.current("cpu"), image_size=SIZE)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"result": result, "calls": calls}))


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_scores(synthetic_set, tmp_path):
    """Batches of at most 12 images: rank 0 has examples 0, 2, 4, 6 (5, 10, 5, 10 candidates: 4 batches), rank
    1 examples 1, 3, 5 (6, 12, 6: 3 batches and one blank)."""
    expected = association_eval(_model(), ClipTokenizer(), _task(synthetic_set).batches(12), "cpu")
    assert expected["association_samples"] == 7 and expected["jaccard_score_10-12"] is not None
    mp.spawn(_distributed_worker, args=(2, synthetic_set, str(tmp_path)), nprocs=2, join=True)
    outputs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for output in outputs:
        assert output["result"] == expected
    assert outputs[0]["calls"] == [5, 10, 5, 10] and outputs[1]["calls"] == [6, 12, 6, 1]

"""Evaluation: metric definitions, parity with open_clip's zero-shot code, data sources, the hqclip-eval CLI."""

import io
import json
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hqclip_fast.config import EvalConfig
from hqclip_fast.data import ClipTokenizer, EvalDataset
from hqclip_fast.data.synthetic import write_synthetic
from hqclip_fast.eval import (
    EvalSuite,
    ImageTextSet,
    ZeroShotSet,
    hard_negative_accuracy,
    retrieval_recall,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from hqclip_fast.eval import cli as eval_cli
from hqclip_fast.eval_ranks import EvalRanks
from hqclip_fast.export import export_open_clip
from hqclip_fast.model import create_model

MODEL, SIZE, CONTEXT = "hqclip-micro", 32, 77


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic(str(out), num_samples=8, shard_size=30, seed=1, image_size=SIZE, num_zeroshot=60,
                           num_hardneg=40)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(MODEL, image_size=SIZE, context_length=CONTEXT).eval()


# ---------------------------------------------------------------- metric definitions


def _recall_by_sorting(sims: torch.Tensor, k: int) -> float:
    """Reference: sort every row, find the partner's position."""
    order = sims.argsort(dim=1, descending=True)
    position = (order == torch.arange(len(sims)).view(-1, 1)).float().argmax(dim=1)
    return float((position < k).float().mean())


def test_retrieval_recall_matches_a_sorting_reference():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(37, 16), dim=1)
    texts = F.normalize(images + 0.9 * torch.randn(37, 16), dim=1)  # noisy partners: recalls strictly in (0, 1)
    result = retrieval_recall(images, texts)
    sims = images @ texts.T
    for k in (1, 5, 10):
        assert result[f"image_to_text_R@{k}"] == pytest.approx(_recall_by_sorting(sims, k))
        assert result[f"text_to_image_R@{k}"] == pytest.approx(_recall_by_sorting(sims.T, k))
    assert 0 < result["image_to_text_R@1"] < result["image_to_text_R@10"] < 1


def test_retrieval_recall_of_perfect_and_shifted_pairs():
    eye = torch.eye(12)
    assert set(retrieval_recall(eye, eye).values()) == {1.0}
    # Text i leans to image i - 1: every partner is beaten by exactly one other candidate, both ways.
    shifted = retrieval_recall(eye, F.normalize(eye.roll(1, dims=0) + 0.5 * eye, dim=1))
    assert shifted["image_to_text_R@1"] == 0.0 and shifted["image_to_text_R@5"] == 1.0
    assert shifted["text_to_image_R@1"] == 0.0 and shifted["text_to_image_R@5"] == 1.0


def test_exact_ties_go_by_index_so_a_collapsed_model_scores_chance():
    same = torch.ones(20, 8) / 8**0.5  # every image and text embeds alike: all scores tie
    result = retrieval_recall(same, same)
    for k in (1, 5, 10):  # only the first k candidates rank in the top k
        assert result[f"image_to_text_R@{k}"] == result[f"text_to_image_R@{k}"] == pytest.approx(k / 20)
    # Zero-shot: tied classes rank by index, like torch.argmax (and sklearn's balanced accuracy on its output).
    classifier = torch.ones(8, 6) / 8**0.5
    labels = torch.arange(6).repeat(2)
    result = zero_shot_accuracy(_Identity(), classifier, [(same[:12], labels)], "cpu")
    assert result["zeroshot_top1"] == pytest.approx(1 / 6) and result["zeroshot_top5"] == pytest.approx(5 / 6)
    assert result["zeroshot_mean_per_class_recall"] == pytest.approx(1 / 6)


def _multi_caption_reference(images, texts, text_image, k):
    """The definitions by sorting: per text, its image among the k best; per image, any own text in the k best."""
    sims = texts @ images.T
    t2i = [int(text_image[t]) in sims[t].argsort(descending=True, stable=True)[:k].tolist() for t in range(len(texts))]
    i2t = [bool(set(sims[:, i].argsort(descending=True, stable=True)[:k].tolist())
                & set((text_image == i).nonzero().view(-1).tolist())) for i in range(len(images))]
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def test_retrieval_recall_with_several_captions_per_image():
    torch.manual_seed(1)
    images = F.normalize(torch.randn(15, 16), dim=1)
    text_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 5, 6, 7, 8, 9, 9, 10, 11, 12, 13, 14, 14])  # image 4: none
    texts = F.normalize(images[text_image] + 1.1 * torch.randn(len(text_image), 16), dim=1)
    result = retrieval_recall(images, texts, text_image)
    for k in (1, 5, 10):
        image_to_text, text_to_image = _multi_caption_reference(images, texts, text_image, k)
        assert result[f"image_to_text_R@{k}"] == pytest.approx(image_to_text)
        assert result[f"text_to_image_R@{k}"] == pytest.approx(text_to_image)
    assert 0 < result["text_to_image_R@1"] < result["text_to_image_R@10"] < 1
    assert result["image_to_text_R@10"] < 1  # image 4 has no caption: never a hit


class _Identity:
    """A 'model' whose image features are its inputs."""

    def encode_image(self, images):
        return images


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # class 4: predicted, never true
def test_zero_shot_mean_per_class_recall_is_balanced_accuracy_and_macro_f1_is_wilds():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    torch.manual_seed(2)
    classifier = F.normalize(torch.randn(8, 7), dim=0)
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 3, 3, 5, 5, 6, 6, 6, 6, 6])  # class 4 has no image
    features = F.normalize(classifier.T[labels] + 0.8 * torch.randn(len(labels), 8), dim=1)
    result = zero_shot_accuracy(_Identity(), classifier, [(features[:9], labels[:9]), (features[9:], labels[9:])],
                                "cpu")
    predicted = (features @ classifier).argmax(dim=1)
    assert result["zeroshot_mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert result["zeroshot_mean_per_class_recall"] != pytest.approx(result["zeroshot_top1"])
    # WILDS's F1(average="macro"), DataComp's iWildCam score: over the classes that have images.
    wilds_f1 = f1_score(labels, predicted, average="macro", labels=torch.unique(labels))
    assert result["zeroshot_macro_f1"] == pytest.approx(wilds_f1, abs=1e-12)
    assert wilds_f1 != pytest.approx(f1_score(labels, predicted, average="macro"))  # class 4 would count
    assert result["zeroshot_top1"] == pytest.approx(float((predicted == labels).float().mean()))
    few = zero_shot_accuracy(_Identity(), classifier[:, :4], [(features[:4], labels[:4])], "cpu")
    assert "zeroshot_top5" not in few  # fewer than 5 classes: no top-5 (clip_benchmark reports NaN)


def test_worst_group_accuracy_over_the_groups_that_have_images():
    torch.manual_seed(4)
    classifier = F.normalize(torch.randn(8, 7), dim=0)
    labels = torch.randint(0, 7, (40,))
    features = F.normalize(classifier.T[labels] + 0.9 * torch.randn(40, 8), dim=1)
    groups = torch.tensor([0, 1, 3] * 13 + [0])  # group 2 has no image: not a worst group of accuracy 0
    batches = [(features[:25], labels[:25], groups[:25]), (features[25:], labels[25:], groups[25:])]
    result = zero_shot_accuracy(_Identity(), classifier, batches, "cpu", num_groups=4)
    rank = (features @ classifier).argsort(dim=1, descending=True, stable=True).argsort(dim=1).gather(
        1, labels.view(-1, 1)).view(-1)
    for k in (1, 5):
        per_group = [float((rank[groups == g] < k).double().mean()) for g in (0, 1, 3)]
        assert result[f"zeroshot_worst_group_top{k}"] == pytest.approx(min(per_group), abs=1e-12)
        assert min(per_group) < max(per_group)  # the groups differ: the minimum is a real choice
    assert result["zeroshot_groups"] == 3
    assert "zeroshot_worst_group_top1" not in zero_shot_accuracy(_Identity(), classifier, [batches[0][:2]], "cpu")


def test_hard_negative_accuracy_counts_positive_above_negative():
    images = torch.eye(4)
    positives = torch.eye(4) * torch.tensor([[1.0], [0.2], [1.0], [0.1]])
    negatives = torch.eye(4) * 0.5
    assert hard_negative_accuracy(images, positives, negatives) == 0.5


def test_zero_shot_classifier_rejects_bad_prompts(model):
    tok = ClipTokenizer(CONTEXT)
    with pytest.raises(ValueError, match="templates"):
        zero_shot_classifier(model, tok, ["cat"], ["a photo"], "cpu")
    with pytest.raises(ValueError, match="classnames"):
        zero_shot_classifier(model, tok, [], ["a {}"], "cpu")


def test_templates_take_the_class_name_as_c_or_braces(model):
    """clip_benchmark's template files write the class name as {c}; open_clip's templates as {}."""
    tok = ClipTokenizer(CONTEXT)
    names = ["red circle", "blue square"]
    with_c = zero_shot_classifier(model, tok, names, ["a photo of a {c}.", "art of the {c}"], "cpu")
    with_braces = zero_shot_classifier(model, tok, names, ["a photo of a {}.", "art of the {}"], "cpu")
    assert torch.equal(with_c, with_braces)


# ---------------------------------------------------------------- parity with open_clip


def _open_clip_zero_shot_images(pattern_dir: Path, preprocess):
    """Zero-shot shards read with tarfile + PIL and preprocessed by open_clip's own transform."""
    images, labels = [], []
    for shard in sorted(pattern_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".jpg")):
            key = name[: -len(".jpg")]
            images.append(preprocess(Image.open(io.BytesIO(members[name])).convert("RGB")))
            labels.append(int(members[key + ".cls"]))
    return torch.stack(images), torch.tensor(labels)


def _open_clip_train_accuracy(model, classifier, loader):
    """open_clip_train.zero_shot.run's computation (its `accuracy` helper calls float() on a 1-element numpy
    array, which numpy 2 rejects, so the same steps are spelled out here)."""
    top1 = top5 = n = 0.0
    with torch.inference_mode():
        for images, target in loader:
            output = model(image=images)
            image_features = output["image_features"] if isinstance(output, dict) else output[0]
            logits = 100.0 * image_features @ classifier
            pred = logits.topk(5, 1, True, True)[1].t()
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            top1 += float(correct[:1].reshape(-1).float().sum())
            top5 += float(correct[:5].reshape(-1).float().sum())
            n += images.size(0)
    return top1 / n, top5 / n


def test_zero_shot_equals_open_clip_zero_shot(synthetic, model, tmp_path):
    """Same weights, same images: our zero-shot top-1/top-5 equal open_clip's (its build_zero_shot_classifier,
    its preprocessing, open_clip_train's scoring) on the model that hqclip-export writes."""
    export_open_clip(model, MODEL, tmp_path)
    open_clip.add_model_config(tmp_path / f"{MODEL}.json")
    oc_model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL, pretrained=str(tmp_path / "open_clip_pytorch_model.bin"))
    oc_model.eval()
    classnames, templates = synthetic["classnames"], synthetic["templates"]

    oc_classifier = open_clip.build_zero_shot_classifier(
        oc_model, open_clip.get_tokenizer(MODEL), classnames, templates, num_classes_per_batch=5, device="cpu")
    images, labels = _open_clip_zero_shot_images(Path(synthetic["zeroshot"]).parent, preprocess)
    loader = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, len(labels), 16)]
    oc_top1, oc_top5 = _open_clip_train_accuracy(oc_model, oc_classifier, loader)

    suite = ZeroShotSet(synthetic["zeroshot"], classnames, templates, SIZE)
    ours_classifier = zero_shot_classifier(model, ClipTokenizer(CONTEXT), classnames, templates, "cpu")
    torch.testing.assert_close(ours_classifier, oc_classifier, rtol=1e-4, atol=1e-5)
    ours = zero_shot_accuracy(model, ours_classifier, suite.batches(16), "cpu")
    assert ours["zeroshot_samples"] == len(labels) == 60
    assert ours["zeroshot_top1"] == oc_top1
    assert ours["zeroshot_top5"] == oc_top5
    assert ours["chance_top1"] == pytest.approx(1 / 12)


# ---------------------------------------------------------------- data sources and CLI


def test_image_folder_gives_the_same_accuracy_as_the_shards(synthetic, model, tmp_path):
    classnames = synthetic["classnames"]
    suite = EvalSuite.from_config(EvalConfig(synthetic_manifest=str(Path(synthetic["tags"]).parent / "manifest.json"),
                                             batch_size=16), SIZE)
    from_shards = suite.run(model, ClipTokenizer(CONTEXT), "cpu")

    # The same images as an ImageFolder: one sub-folder per class, named so that sorted order = class order.
    for shard in sorted(Path(synthetic["zeroshot"]).parent.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                label = int(members[name[:-4] + ".cls"])
                folder = tmp_path / f"{label:02d}_{classnames[label].replace(' ', '_')}"
                folder.mkdir(exist_ok=True)
                Image.open(io.BytesIO(data)).save(folder / (name[:-4] + ".png"))  # lossless: same pixels
    names_file = tmp_path.parent / "classnames.txt"
    names_file.write_text("\n".join(classnames) + "\n")
    templates_file = tmp_path.parent / "templates.txt"
    templates_file.write_text("\n".join(synthetic["templates"]) + "\n")
    folder_suite = EvalSuite.from_config(EvalConfig(zeroshot=str(tmp_path), classnames=str(names_file),
                                                    templates=str(templates_file), batch_size=16), SIZE)
    from_folder = folder_suite.run(model, ClipTokenizer(CONTEXT), "cpu")
    assert from_folder["zeroshot_samples"] == from_shards["zeroshot_samples"] == 60
    assert from_folder["zeroshot_top1"] == from_shards["zeroshot_top1"]
    assert from_folder["zeroshot_top5"] == from_shards["zeroshot_top5"]
    # The synthetic suite also scores retrieval and hard negatives on its hard-negative set.
    assert from_shards["retrieval_samples"] == from_shards["hard_negative_samples"] == 40
    assert 0.0 <= from_shards["hard_negative_acc"] <= 1.0


def test_shard_sets_split_among_three_ranks_before_decoding(synthetic):
    """The batches of 3 ranks (no process group needed: batches hold no collective) hold the whole set once:
    zero-shot labels as a multiset, image-text pairs by their sample index; the 2 shards of 40 image-text pairs
    are split by position among 3 ranks (p % 3), and by shard between 2."""
    zeroshot = ZeroShotSet(synthetic["zeroshot"], synthetic["classnames"], synthetic["templates"], SIZE)
    whole_labels = torch.cat([labels for _, labels in zeroshot.batches(16)])
    shared_labels = torch.cat([labels for r in range(3) for _, labels in zeroshot.batches(16, EvalRanks(r, 3))])
    assert len(whole_labels) == 60 and sorted(shared_labels.tolist()) == sorted(whole_labels.tolist())

    image_text = ImageTextSet(synthetic["hardneg"], SIZE)
    (images, positives, negatives, indices), = image_text.batches(64)
    assert len(indices) == 40 and indices == sorted(indices)  # the indices order the set as one process reads it
    position = {index: p for p, index in enumerate(indices)}
    for world_size in (3, 2):
        seen = []
        for rank in range(world_size):
            for batch_images, batch_pos, batch_neg, batch_indices in image_text.batches(4, EvalRanks(rank, world_size)):
                rows = [position[i] for i in batch_indices]
                if world_size == 3:  # fewer shards than ranks: by position
                    assert all(p % 3 == rank for p in rows)
                else:  # whole shards: rank r's samples all come from shard r
                    assert all(i // EvalDataset.INDEX_STRIDE == rank for i in batch_indices)
                seen += batch_indices
                assert torch.equal(batch_images, images[rows])
                assert batch_pos == [positives[p] for p in rows]
                assert batch_neg == [negatives[p] for p in rows]
        assert sorted(seen) == indices


def test_gather_by_index_on_one_process():
    rows = torch.tensor([[2.0], [0.0], [1.0]])
    assert torch.equal(EvalRanks().gather(rows, [2, 0, 1]), torch.tensor([[0.0], [1.0], [2.0]]))
    with pytest.raises(ValueError, match="more than one row"):
        EvalRanks().gather(rows, [2, 0, 2])
    with pytest.raises(ValueError, match="index has 2 entries for 3 rows"):
        EvalRanks().gather(rows, [0, 1])


def test_eval_config_errors(synthetic, tmp_path):
    with pytest.raises(ValueError, match="classnames"):
        EvalSuite.from_config(EvalConfig(zeroshot=synthetic["zeroshot"]), SIZE)
    with pytest.raises(ValueError, match="synthetic_manifest"):
        EvalSuite.from_config(EvalConfig(synthetic_manifest=str(tmp_path / "missing.json")), SIZE)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        EvalSuite.from_config(EvalConfig(zeroshot=synthetic["zeroshot"], classnames=str(empty)), SIZE)


def test_eval_cli_on_exported_weights(synthetic, model, tmp_path, capsys):
    export_open_clip(model, MODEL, tmp_path)
    manifest = str(Path(synthetic["tags"]).parent / "manifest.json")
    out = tmp_path / "results.json"
    eval_cli(["--model", MODEL, "--image-size", str(SIZE), "--pretrained",
              str(tmp_path / "open_clip_pytorch_model.bin"), "--synthetic-manifest", manifest,
              "--out", str(out), "--batch-size", "16"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    direct = EvalSuite.from_config(EvalConfig(synthetic_manifest=manifest, batch_size=16), SIZE).run(
        model, ClipTokenizer(CONTEXT), "cpu")
    assert printed == pytest.approx(direct)
    with pytest.raises(SystemExit):
        eval_cli(["--model", MODEL])  # nothing to evaluate

"""Evaluation: zero-shot classification, image-text retrieval, hard-negative accuracy, WinoGAViL's association
Jaccard score; and `hqclip-eval`.

The metric functions take a model with open_clip's `encode_image` / `encode_text` and batches of tensors, so
they run unchanged on our model (plain or FSDP2-sharded) and on an open_clip model. Given `ranks`
(hqclip_fast.eval_ranks.EvalRanks), the ranks of a process group share the work: each encodes its share of the
samples and prompts, and every rank gets the metrics one process computes on the whole set.

The conventions are clip_benchmark's (and open_clip's), so that the numbers equal those of
`clip_benchmark eval --no_amp` on the same model and set (tests/test_clip_benchmark.py):
- zero-shot: per class, the mean of the normalized embeddings of its prompts, renormalized; a prompt template
  holds the class name as `{c}` (clip_benchmark's files) or `{}`; an image's prediction is the class of highest
  cosine similarity; top-5 is reported only with 5 classes or more; the per-class mean recall averages the
  top-1 recall of the classes that have images (sklearn's balanced accuracy, as clip_benchmark computes it);
- retrieval: an image may have several captions; text->image R@k is over captions (is the caption's image
  among the k best images), image->text R@k over images (is any of its captions among the k best captions);
- exact ties (duplicated images or captions, a collapsed model) are broken by position in the set, the lower
  index ranking first, as a stable sort would. clip_benchmark takes torch.topk's pick among ties, which has no
  fixed order; counting ties in the target's favour instead would give a collapsed model perfect recall.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hqclip_fast.data.benchmark_sets import BenchmarkSet, read_benchmark_set
from hqclip_fast.data.winogavil import AssociationExample
from hqclip_fast.eval_ranks import EvalRanks

TopK = (1, 5)
RecallK = (1, 5, 10)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _encode_images(model, images: torch.Tensor, device) -> torch.Tensor:
    return _normalized(model.encode_image(images.to(device))).cpu()


def _blank_images(ranks: EvalRanks, image_size: int | None) -> Callable[[], torch.Tensor]:
    """The input a rank encodes, to keep in step, once its share of the images is used up."""
    if ranks.distributed and image_size is None:
        raise ValueError("image_size is needed when several ranks share the evaluation")
    return lambda: torch.zeros(1, 3, image_size, image_size)


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], device, batch_size: int = 256, *,
                 ranks: EvalRanks | None = None) -> torch.Tensor:
    """Normalized fp32 text embeddings (n, D), on the CPU. With `ranks`: `texts` is this rank's share, every
    rank of the group calls this, and each gets its own rows."""
    ranks = ranks or EvalRanks()
    chunks = (list(texts[start:start + batch_size]) for start in range(0, len(texts), batch_size))
    out = list(ranks.lockstep(chunks, lambda chunk: _normalized(model.encode_text(tokenizer(chunk).to(device))).cpu(),
                              blank=lambda: [""]))
    return torch.cat(out) if out else torch.empty(0, 0)


def ranks_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of column target[i] in row i of `scores`: the columns scoring higher, plus the columns
    tied with it at a lower index."""
    target = target.view(-1, 1)
    score = scores.gather(1, target)
    columns = torch.arange(scores.shape[1]).view(1, -1)
    return (scores > score).sum(dim=1) + ((scores == score) & (columns < target)).sum(dim=1)


def format_prompt(template: str, classname: str) -> str:
    """A prompt from a template holding the class name as `{c}` (clip_benchmark) or `{}` (open_clip)."""
    return template.format(classname, c=classname)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
                         device, *, ranks: EvalRanks | None = None) -> torch.Tensor:
    """(D, K) classifier: column k is the renormalized mean of class k's template embeddings. With `ranks`,
    each rank encodes a share of the prompts and all get the whole classifier."""
    ranks = ranks or EvalRanks()
    if not classnames:
        raise ValueError("classnames is empty")
    if not templates:
        raise ValueError("templates is empty")
    for template in templates:
        if "{}" not in template and "{c}" not in template:
            raise ValueError(f"templates: each needs a '{{c}}' or '{{}}' for the class name, got {template!r}")
    prompts = [format_prompt(template, name) for name in classnames for template in templates]
    embeddings = ranks.gather(encode_texts(model, tokenizer, list(ranks.share(prompts)), device, ranks=ranks))
    per_class = embeddings.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return _normalized(per_class).T


@torch.no_grad()
def zero_shot_accuracy(model, classifier: torch.Tensor, batches: Iterable[tuple[torch.Tensor, ...]],
                       device, *, ranks: EvalRanks | None = None, image_size: int | None = None,
                       num_groups: int = 0) -> dict[str, float]:
    """Top-1/top-5 accuracy, per-class mean recall and macro-F1 of `classifier` (D, K) over (images, labels)
    batches. Macro-F1 averages the F1 of the classes that have images, as WILDS's F1(average="macro") does
    (sklearn's f1_score with labels=unique(y_true); DataComp's iWildCam score). With `num_groups`, a batch is
    (images, labels, group ids in [0, num_groups)) and the worst top-1 / top-5 accuracy over the groups that have
    images is reported too, as WILDS's worst-group metrics (DataComp's FMoW, Dollar Street and GeoDE scores).
    With `ranks`: the batches are this rank's share, the counts are summed over ranks; `image_size` is then
    needed (see EvalRanks)."""
    ranks = ranks or EvalRanks()
    blank = _blank_images(ranks, image_size)
    num_classes = classifier.shape[1]
    top_k = [k for k in TopK if k <= num_classes]
    correct = dict.fromkeys(top_k, 0)
    class_hits, class_images, class_predicted = (torch.zeros(num_classes, dtype=torch.int64) for _ in range(3))
    group_hits = {k: torch.zeros(num_groups, dtype=torch.int64) for k in top_k}
    group_images = torch.zeros(num_groups, dtype=torch.int64)
    encoded = ranks.lockstep(batches, lambda batch: (_encode_images(model, batch[0], device), *batch[1:]),
                             blank=lambda: (blank(), None))
    for features, labels, *groups in encoded:
        scores = features @ classifier
        rank = ranks_of(scores, labels)
        for k in top_k:
            correct[k] += int((rank < k).sum())
        class_images += torch.bincount(labels, minlength=num_classes)
        class_hits += torch.bincount(labels[rank == 0], minlength=num_classes)
        class_predicted += torch.bincount(scores.argmax(dim=1), minlength=num_classes)  # first of equals, as ranks_of
        if num_groups:
            group_images += torch.bincount(groups[0], minlength=num_groups)
            for k in top_k:
                group_hits[k] += torch.bincount(groups[0][rank < k], minlength=num_groups)
    per_group = [*group_images.tolist(), *(n for k in top_k for n in group_hits[k].tolist())]
    summed = ranks.sum([*correct.values(), *class_hits.tolist(), *class_images.tolist(), *class_predicted.tolist(),
                        *per_group])
    correct = dict(zip(correct, summed[:len(top_k)]))
    per_class = torch.tensor(summed[len(top_k):len(top_k) + 3 * num_classes], dtype=torch.float64)
    class_hits, class_images, class_predicted = per_class.view(3, -1)
    total = int(class_images.sum())
    if total == 0:
        raise ValueError("zero-shot evaluation got no images")
    present = class_images > 0
    result = {f"zeroshot_top{k}": correct[k] / total for k in top_k}
    result["zeroshot_mean_per_class_recall"] = float((class_hits[present] / class_images[present]).mean())
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (images of the class + predictions of it).
    result["zeroshot_macro_f1"] = float((2 * class_hits[present] / (class_images[present] + class_predicted[present]))
                                        .mean())
    result["zeroshot_samples"] = total
    result["chance_top1"] = 1.0 / num_classes
    if num_groups:
        per_group = torch.tensor(summed[len(top_k) + 3 * num_classes:], dtype=torch.float64).view(-1, num_groups)
        present = per_group[0] > 0  # WILDS: the worst over the groups that have samples
        for k, hits in zip(top_k, per_group[1:]):
            result[f"zeroshot_worst_group_top{k}"] = float((hits[present] / per_group[0][present]).min())
        result["zeroshot_groups"] = int(present.sum())
    return result


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor,
                     text_image: torch.Tensor | None = None) -> dict[str, float]:
    """R@1/5/10 both ways. Text t is a caption of image text_image[t] (default: of image t, n pairs).

    text_to_image: the share of texts whose image ranks among the k best images; image_to_text: the share of
    images that have one of their texts among the k best texts (an image without text never does). Ties are
    broken by index (see the module docstring). Scores are computed a block of rows at a time."""
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    if text_image is None:
        if num_images != num_texts:
            raise ValueError(f"retrieval: {num_images} images and {num_texts} texts need text_image")
        text_image = torch.arange(num_texts)
    block = max(1, (1 << 22) // max(num_images, num_texts, 1))
    text_rank = torch.cat([ranks_of(text_features[s:s + block] @ image_features.T, text_image[s:s + block])
                           for s in range(0, num_texts, block)])
    image_rank = []
    for start in range(0, num_images, block):
        scores = image_features[start:start + block] @ text_features.T
        own = text_image.view(1, -1) == torch.arange(start, start + scores.shape[0]).view(-1, 1)
        best = scores.masked_fill(~own, -torch.inf).argmax(dim=1)  # the image's best text (first of equals)
        image_rank.append(torch.where(own.any(dim=1), ranks_of(scores, best), torch.iinfo(torch.int64).max))
    image_rank = torch.cat(image_rank)
    result = {}
    for direction, rank in (("image_to_text", image_rank), ("text_to_image", text_rank)):
        for k in RecallK:
            result[f"{direction}_R@{k}"] = int((rank < k).sum()) / len(rank)
    return result


def _positive_wins(image_features: torch.Tensor, positive_features: torch.Tensor,
                   negative_features: torch.Tensor) -> torch.Tensor:
    positive = (image_features * positive_features).sum(dim=1)
    negative = (image_features * negative_features).sum(dim=1)
    return positive > negative


def hard_negative_accuracy(image_features: torch.Tensor, positive_features: torch.Tensor,
                           negative_features: torch.Tensor) -> float:
    """Fraction of images that score their positive text above its minimal-edit negative."""
    return float(_positive_wins(image_features, positive_features, negative_features).float().mean())


@torch.no_grad()
def image_text_metrics(model, tokenizer: Callable, batches: Iterable[tuple], device, *,
                       ranks: EvalRanks | None = None, image_size: int | None = None) -> dict[str, float]:
    """Retrieval recall over images and their captions; hard-negative accuracy (first caption against the
    negative) over the images that come with a negative text (None where one has none).

    A batch is (images, captions, negative texts) or, with the images' global sample indices,
    (images, captions, negative texts, indices) as ImageTextSet.batches gives; an image's captions are a
    string or a list of strings. With `ranks`: the batches are this rank's share (without indices: the
    i % world_size share, in order); features are gathered in the global order (an image's captions in their
    order) for retrieval and hard-negative counts summed; `image_size` is then needed."""
    ranks = ranks or EvalRanks()
    blank = _blank_images(ranks, image_size)
    images, captions, negatives, indices = [], [], [], []
    encoded = ranks.lockstep(batches, lambda batch: (_encode_images(model, batch[0], device), *batch[1:]),
                             blank=lambda: (blank(), [], []))
    for batch_features, batch_captions, batch_neg, *batch_index in encoded:
        if batch_index:
            indices.extend(int(i) for i in batch_index[0])
        else:  # row j of this rank's i % world_size share is sample j * world_size + rank
            rows = range(len(captions), len(captions) + len(batch_captions))
            indices.extend(j * ranks.world_size + ranks.rank for j in rows)
        images.append(batch_features)
        captions.extend([c] if isinstance(c, str) else list(c) for c in batch_captions)
        negatives.extend(batch_neg)
    local_images = torch.cat(images) if images else torch.empty(0, 0)
    image_index = torch.tensor(indices, dtype=torch.int64)
    image_features = ranks.gather(local_images, image_index)
    if image_features.shape[0] == 0:
        raise ValueError("image-text evaluation got no images")
    if int(ranks.sum([sum(len(c) for c in captions)])[0]) == 0:
        raise ValueError("image-text evaluation got no captions")
    image_order = ranks.gather(image_index.view(-1, 1), image_index).view(-1)  # sample index of each row

    # Captions in (image, caption) order: key = sample index * stride + position among the image's captions.
    counts = torch.tensor([len(c) for c in captions], dtype=torch.int64)
    stride = int(ranks.sum([int(counts.max()) if len(counts) else 0])[0]) + 1
    owner = image_index.repeat_interleave(counts)
    position = torch.cat([torch.arange(int(n)) for n in counts]) if len(counts) else owner
    keys = owner * stride + position
    local_texts = encode_texts(model, tokenizer, [text for c in captions for text in c], device, ranks=ranks)
    text_features = ranks.gather(local_texts, keys)
    text_image = torch.searchsorted(image_order, ranks.gather(owner.view(-1, 1), keys).view(-1))
    result = retrieval_recall(image_features, text_features, text_image)
    result["retrieval_samples"] = image_features.shape[0]
    result["retrieval_texts"] = text_features.shape[0]

    with_negative = [i for i, neg in enumerate(negatives) if neg and captions[i]]
    first_caption = (counts.cumsum(0) - counts)[with_negative]
    negative_features = encode_texts(model, tokenizer, [negatives[i] for i in with_negative], device, ranks=ranks)
    wins = int(_positive_wins(local_images[with_negative], local_texts[first_caption],
                              negative_features).sum()) if with_negative else 0
    wins, with_negative_total = (int(n) for n in ranks.sum([wins, len(with_negative)]))
    if with_negative_total:
        result["hard_negative_acc"] = wins / with_negative_total
        result["hard_negative_samples"] = with_negative_total
    return result


# ------------------------------------------------------------------------------ WinoGAViL (association)

# DataComp's WinoGAViL groups (eval_utils/wino_eval.py): by the example's number of candidates.
ASSOCIATION_GROUPS = {
    "5": lambda n: n == 5, "6": lambda n: n == 6, "10": lambda n: n == 10, "12": lambda n: n == 12,
    "5-6": lambda n: n <= 6, "10-12": lambda n: n >= 10,
}


def association_prompt(cue: str) -> str:
    """DataComp's WinoGAViL prompt: the cue lower-cased after "An" when it starts with a vowel, else "A"."""
    cue = cue.lower()
    return f"{'An' if cue[0] in 'aeiou' else 'A'} {cue}"


def top_n_jaccard(similarity: torch.Tensor, associated: torch.Tensor) -> float:
    """The Jaccard index |P & T| / |P | T| of the predicted candidates P, the n of highest similarity to the cue
    (n = the number of true associations T, as DataComp's solver is told), and T (`associated`, a bool per
    candidate). Ties are broken by position, the lower index first (a stable sort, as ranks_of); DataComp takes
    the last n of np.argsort, not a stable sort, so its pick among exact ties is not fixed."""
    n = int(associated.sum())
    if n == 0:
        raise ValueError("an example needs at least one association")
    predicted = torch.zeros_like(associated, dtype=torch.bool)
    predicted[torch.sort(similarity, descending=True, stable=True).indices[:n]] = True
    return int((predicted & associated).sum()) / int((predicted | associated).sum())


def association_metrics(scores: Sequence[float], num_candidates: Sequence[int]) -> dict:
    """DataComp's WinoGAViL aggregates of per-example Jaccard scores: their mean (avg_jaccard_score) and the
    mean per group of candidate counts (jaccard_score_5, _6, _10, _12, _5-6, _10-12; DataComp's main metric is
    jaccard_score_10-12). A group without examples is None (DataComp's mean of an empty array is NaN)."""
    if not scores:
        raise ValueError("association evaluation got no examples")
    result = {"avg_jaccard_score": math.fsum(scores) / len(scores)}
    for group, member in ASSOCIATION_GROUPS.items():
        chosen = [s for s, n in zip(scores, num_candidates) if member(n)]
        result[f"jaccard_score_{group}"] = math.fsum(chosen) / len(chosen) if chosen else None
    result["association_samples"] = len(scores)
    return result


@torch.no_grad()
def association_eval(model, tokenizer: Callable, batches: Iterable[tuple], device, *,
                     ranks: EvalRanks | None = None, image_size: int | None = None) -> dict:
    """association_metrics over (candidate images of the batch's examples one after the other, cue prompts,
    per-example associated masks, example indices) batches (AssociationTask.batches): each cue's normalized
    text embedding against its candidates' normalized image embeddings. With `ranks`: the batches are this
    rank's share of the examples; the per-example scores are gathered in example order, so every rank gets the
    metrics of one process; `image_size` is then needed."""
    ranks = ranks or EvalRanks()
    blank = _blank_images(ranks, image_size)

    def encode(batch):
        images, prompts, associated, indices = batch
        texts = _normalized(model.encode_text(tokenizer(prompts).to(device))).cpu()
        return _encode_images(model, images, device), texts, associated, indices

    rows, order = [], []
    for image_features, text_features, associated, indices in ranks.lockstep(
            batches, encode, blank=lambda: (blank(), [""], [], [])):
        start = 0
        for text, truth, index in zip(text_features, associated, indices):
            candidates = image_features[start:start + len(truth)]
            start += len(truth)
            rows.append((top_n_jaccard(candidates @ text, truth), len(truth)))
            order.append(index)
    gathered = ranks.gather(torch.tensor(rows, dtype=torch.float64).view(-1, 2), order)
    return association_metrics(gathered[:, 0].tolist(), [int(n) for n in gathered[:, 1]])


# ---------------------------------------------------------------------------------------------- eval data

DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "an image of a {}.", "a picture of a {}.")


def _read_lines(path: str, what: str) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as err:
        raise ValueError(f"{what}: cannot read {path}: {err}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what}: {path} is empty")
    return lines


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class ZeroShotSet:
    """Images with class labels: zero-shot shards (key.cls) or an image folder (one sub-folder per class)."""

    source: str
    classnames: list[str]
    templates: list[str]
    image_size: int
    groups: dict[str, int] | None = None  # shards: sample key -> group id (sample_groups), for worst-group metrics

    @property
    def num_groups(self) -> int:
        return max(self.groups.values()) + 1 if self.groups else 0

    def batches(self, batch_size: int, ranks: EvalRanks | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """(images, labels) batches of this rank's share (all samples without `ranks`), with `groups`
        (images, labels, group ids); only the share's images are decoded. For shards the share is
        build_eval_dataset's (counted in the tar structure, so a damaged sample is skipped by its own rank),
        which leaves the summed counts those of one process."""
        ranks = ranks or EvalRanks()
        if Path(self.source).is_dir():
            samples = ((image, label, None) for image, label in self._folder_samples(ranks))
        else:
            from hqclip_fast.data import build_eval_dataset

            samples = ((image, target, key) for key, image, target in
                       build_eval_dataset(self.source, image_size=self.image_size, rank=ranks.rank,
                                          world_size=ranks.world_size))
        for batch in _batched(samples, batch_size):
            labels = torch.tensor([label for _, label, _ in batch])
            if int(labels.min()) < 0 or int(labels.max()) >= len(self.classnames):
                raise ValueError(f"zeroshot: {self.source} has labels outside [0, {len(self.classnames)}), "
                                 "the number of class names")
            images = torch.stack([image for image, _, _ in batch])
            if self.groups is None:
                yield images, labels
            else:
                yield images, labels, torch.tensor([self.groups[key] for _, _, key in batch])

    def _folder_samples(self, ranks: EvalRanks) -> Iterator[tuple[torch.Tensor, int]]:
        from torchvision.datasets import ImageFolder

        from hqclip_fast.data.samples import eval_transform

        folder = ImageFolder(self.source, transform=lambda img: eval_transform(img.convert("RGB"), self.image_size))
        for index in ranks.share(range(len(folder))):  # only this rank's images are decoded
            yield folder[index]

    @staticmethod
    def folder_classnames(path: str) -> list[str]:
        return sorted(d.name for d in Path(path).iterdir() if d.is_dir())


@dataclass
class ImageTextSet:
    """Shards of (image, positive text[, negative text]): `positive_text`/`negative_text` in key.json, or an
    annotation record (positive_description, else alt_text; negative_description). With `captions_per_line`,
    clip_benchmark's retrieval layout instead: key.txt holds the image's captions, one per line (an image
    without any is kept, as a retrieval candidate)."""

    source: str
    image_size: int
    captions_per_line: bool = False

    def batches(self, batch_size: int, ranks: EvalRanks | None = None
                ) -> Iterator[tuple[torch.Tensor, list[list[str]], list[str | None], list[int]]]:
        """(images, captions, negative texts, sample indices) batches of this rank's share (all without
        `ranks`); only the share's images are decoded (build_eval_dataset's share; the indices order the
        gathered features)."""
        ranks = ranks or EvalRanks()
        for batch in _batched(self._samples(ranks), batch_size):
            images, captions, negatives, indices = zip(*batch)
            yield torch.stack(images), list(captions), list(negatives), list(indices)

    def _samples(self, ranks: EvalRanks) -> Iterator[tuple[torch.Tensor, list[str], str | None, int]]:
        from hqclip_fast.data import build_eval_dataset

        dataset = build_eval_dataset(self.source, image_size=self.image_size, rank=ranks.rank,
                                     world_size=ranks.world_size, with_index=True)
        for index, _, image, record in dataset:
            if not isinstance(record, dict):
                raise ValueError(f"image_text: {self.source} holds class labels (.cls), not texts")
            if self.captions_per_line:
                yield image, (record.get("alt_text") or "").splitlines(), None, index
                continue
            positive = record.get("positive_text") or record.get("positive_description") or record.get("alt_text")
            if positive:  # a sample without any text has nothing to retrieve
                yield image, [positive], record.get("negative_text") or record.get("negative_description"), index


@dataclass
class AssociationTask:
    """WinoGAViL-style examples (hqclip_fast.data.winogavil.read_association_set): a cue and its candidate
    images, some of which go with the cue."""

    examples: list[AssociationExample]
    image_size: int

    def batches(self, batch_size: int, ranks: EvalRanks | None = None
                ) -> Iterator[tuple[torch.Tensor, list[str], list[torch.Tensor], list[int]]]:
        """(candidate images of the examples one after the other, cue prompts, associated masks, example
        indices) batches of whole examples of this rank's share (examples i % world_size == rank; all without
        `ranks`), at most `batch_size` images each unless one example alone has more; only the share's images
        are decoded."""
        ranks = ranks or EvalRanks()
        batch, count = [], 0
        for index in ranks.share(range(len(self.examples))):
            size = len(self.examples[index].images)
            if batch and count + size > batch_size:
                yield self._batch(batch)
                batch, count = [], 0
            batch.append(index)
            count += size
        if batch:
            yield self._batch(batch)

    def _batch(self, indices: list[int]) -> tuple[torch.Tensor, list[str], list[torch.Tensor], list[int]]:
        from PIL import Image

        from hqclip_fast.data.samples import eval_transform

        images = []
        for path in (path for i in indices for path in self.examples[i].images):
            try:
                with Image.open(path) as img:
                    images.append(eval_transform(img.convert("RGB"), self.image_size))
            except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
                raise ValueError(f"association: unreadable image {path}: {err}") from None
        examples = [self.examples[i] for i in indices]
        return (torch.stack(images), [association_prompt(e.cue) for e in examples],
                [torch.tensor(e.associated) for e in examples], indices)


def sample_groups(shards: str) -> dict[str, int]:
    """Sample key -> group of every sample of a set whose samples carry metadata in a `.npy` member (WILDS's and
    the fairness sets in clip_benchmark's layout: FMoW [region, year, y], Dollar Street [income_ds, income_meta,
    region], GeoDE [region, country]). The group is the first field, the one DataComp's evaluators group by.
    A pass over the tars without decoding images; every rank reads all of it (small)."""
    import io

    import numpy as np

    from hqclip_fast.data.shards import expand_sources, iter_tar_samples

    groups = {}
    for url in (u for source in expand_sources(shards) for u in source):
        for raw in iter_tar_samples(url, Counter()):
            if "npy" not in raw:
                raise ValueError(f"{url}: sample {raw['__key__']} has no .npy metadata (needed for its worst-group "
                                 "metric)")
            try:
                groups[raw["__key__"]] = int(np.load(io.BytesIO(raw["npy"])).reshape(-1)[0])
            except (ValueError, OSError, IndexError) as err:
                raise ValueError(f"{url}: sample {raw['__key__']}: unreadable .npy metadata: {err}") from None
    if not groups or min(groups.values()) < 0:
        raise ValueError(f"{shards}: no samples, or a negative group id in the .npy metadata")
    return groups


def is_benchmark_root(path: str, split: str = "test") -> bool:
    """Whether `path` is a set in clip_benchmark's webdataset layout (it has `<split>/nshards.txt`)."""
    return (Path(path) / split / "nshards.txt").is_file()


def _read_benchmark(root: str, split: str, what: str, kind: str) -> BenchmarkSet:
    try:
        benchmark = read_benchmark_set(root, split)
    except (OSError, ValueError) as err:
        raise ValueError(f"{what}: {err}") from None
    if benchmark.kind != kind:
        raise ValueError(f"{what}: {root} is a {benchmark.kind} set, not a {kind} set")
    return benchmark


class EvalSuite:
    """The evaluation sets of a run; `run` computes every metric on them."""

    def __init__(self, zeroshot: ZeroShotSet | None, image_text: ImageTextSet | None, batch_size: int = 256, *,
                 association: AssociationTask | None = None):
        self.zeroshot, self.image_text, self.batch_size = zeroshot, image_text, batch_size
        self.association = association

    @property
    def enabled(self) -> bool:
        return self.zeroshot is not None or self.image_text is not None or self.association is not None

    @classmethod
    def from_benchmark(cls, benchmark: BenchmarkSet, image_size: int, batch_size: int = 256, *,
                       groups: bool = False) -> EvalSuite:
        """One set in clip_benchmark's webdataset layout (hqclip_fast.data.benchmark_sets); with `groups`, its
        samples' groups (sample_groups) for the worst-group metrics."""
        if benchmark.kind == "retrieval":
            return cls(None, ImageTextSet(benchmark.shards, image_size, captions_per_line=True), batch_size)
        return cls(ZeroShotSet(benchmark.shards, benchmark.classnames, benchmark.templates, image_size,
                               sample_groups(benchmark.shards) if groups else None), None, batch_size)

    @classmethod
    def from_config(cls, cfg, image_size: int, split: str = "test") -> EvalSuite:
        """From the `eval` section of the training config (hqclip_fast.config.EvalConfig). `zeroshot` and
        `image_text` may also be clip_benchmark sets (folders with `<split>/nshards.txt`); a zero-shot set's
        class names and templates then come from it unless `classnames` / `templates` are given."""
        zeroshot = image_text = None
        if cfg.synthetic_manifest:
            if cfg.zeroshot or cfg.image_text:
                raise ValueError("eval: set either synthetic_manifest or zeroshot/image_text, not both")
            try:
                manifest = json.loads(Path(cfg.synthetic_manifest).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"eval.synthetic_manifest: cannot read {cfg.synthetic_manifest}: {err}") from None
            zeroshot = ZeroShotSet(manifest["zeroshot"], list(manifest["classnames"]),
                                   list(manifest["templates"]), image_size)
            image_text = ImageTextSet(manifest["hardneg"], image_size)
        if cfg.zeroshot and is_benchmark_root(cfg.zeroshot, split):
            benchmark = _read_benchmark(cfg.zeroshot, split, "eval.zeroshot", "classification")
            zeroshot = ZeroShotSet(
                benchmark.shards,
                _read_lines(cfg.classnames, "eval.classnames") if cfg.classnames else benchmark.classnames,
                _read_lines(cfg.templates, "eval.templates") if cfg.templates else benchmark.templates, image_size)
        elif cfg.zeroshot:
            if Path(cfg.zeroshot).is_dir():
                names = _read_lines(cfg.classnames, "eval.classnames") if cfg.classnames else \
                    [n.replace("_", " ") for n in ZeroShotSet.folder_classnames(cfg.zeroshot)]
            elif cfg.classnames:
                names = _read_lines(cfg.classnames, "eval.classnames")
            else:
                raise ValueError("eval.classnames: zero-shot shards need a class-name file (one per line)")
            templates = _read_lines(cfg.templates, "eval.templates") if cfg.templates else list(DEFAULT_TEMPLATES)
            zeroshot = ZeroShotSet(cfg.zeroshot, names, templates, image_size)
        if cfg.image_text and is_benchmark_root(cfg.image_text, split):
            benchmark = _read_benchmark(cfg.image_text, split, "eval.image_text", "retrieval")
            image_text = ImageTextSet(benchmark.shards, image_size, captions_per_line=True)
        elif cfg.image_text:
            image_text = ImageTextSet(cfg.image_text, image_size)
        return cls(zeroshot, image_text, cfg.batch_size)

    @torch.no_grad()
    def run(self, model, tokenizer: Callable, device, ranks: EvalRanks | None = None) -> dict[str, float]:
        """Every metric on every set. With `ranks`, every rank of the group calls this: each encodes its share
        and all return the metrics of the whole sets."""
        ranks = ranks or EvalRanks()
        results: dict[str, float] = {}
        if self.zeroshot is not None:
            zeroshot = self.zeroshot
            classifier = zero_shot_classifier(model, tokenizer, zeroshot.classnames, zeroshot.templates, device,
                                              ranks=ranks)
            results.update(zero_shot_accuracy(model, classifier, zeroshot.batches(self.batch_size, ranks), device,
                                              ranks=ranks, image_size=zeroshot.image_size,
                                              num_groups=zeroshot.num_groups))
        if self.image_text is not None:
            results.update(image_text_metrics(model, tokenizer, self.image_text.batches(self.batch_size, ranks),
                                              device, ranks=ranks, image_size=self.image_text.image_size))
        if self.association is not None:
            results.update(association_eval(model, tokenizer, self.association.batches(self.batch_size, ranks),
                                            device, ranks=ranks, image_size=self.association.image_size))
        return results


# ---------------------------------------------------------------------------------------------- hqclip-eval


def _load_model(args):
    from hqclip_fast.model import create_model
    from hqclip_fast.pretrained import load_pretrained, resolve_pretrained

    if args.run:
        from hqclip_fast.export import load_trained_model

        model, cfg = load_trained_model(args.run, args.checkpoint)
        return model, cfg.data.image_size, cfg.data.context_length
    overrides = {}
    weights = resolve_pretrained(args.pretrained, args.model, args.cache_dir) if args.pretrained else None
    if weights is not None and (weights.parent / f"{args.model}.json").is_file():
        # the architecture hqclip-export wrote beside the weights
        overrides = json.loads((weights.parent / f"{args.model}.json").read_text())
    if args.image_size:
        overrides["image_size"] = args.image_size
    model = create_model(args.model, **overrides)
    if weights is not None:
        load_pretrained(model, args.pretrained, args.model, args.cache_dir)
    config = model.config
    return model.eval(), config.vision_cfg.image_size, config.text_cfg.context_length


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hqclip-eval", description="Zero-shot classification, image-text retrieval (R@1/5/10 both ways) "
        "and hard-negative accuracy. Prints one JSON object; with --suite, first one line per set, and exits "
        "with status 1 if a set was missing or failed. Under torchrun the ranks share the sets.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="training run folder (its latest checkpoint, or --checkpoint)")
    which.add_argument("--model", help="model config name, with --pretrained <open_clip checkpoint file>")
    parser.add_argument("--checkpoint", help="with --run: a checkpoints/step_XXXXXXXX folder")
    parser.add_argument("--pretrained", help="with --model: open_clip weights, resolved as model.pretrained is "
                                             "(a file, a folder, hf-hub:org/name, an open_clip pretrained tag): "
                                             ".safetensors, or .bin/.pt read with weights_only=True; a <model>.json "
                                             "beside them (hqclip-export writes one) gives the architecture")
    parser.add_argument("--cache-dir", help="with --pretrained hf-hub:/tag: the Hugging Face cache to look in")
    parser.add_argument("--image-size", type=int, default=None, help="with --model: override the image size")
    parser.add_argument("--synthetic-manifest", help="manifest.json of `hqclip-data synthetic`")
    parser.add_argument("--zeroshot", help="a clip_benchmark webdataset set, zero-shot shards (key.cls) or an "
                                           "image folder (class sub-folders)")
    parser.add_argument("--classnames", help="class names file, one per line (default for folders: their names)")
    parser.add_argument("--templates", help="prompt templates file, one per line with {c} or {} "
                                            "(default: 4 photo prompts)")
    parser.add_argument("--image-text", help="a clip_benchmark webdataset retrieval set, or shards with "
                                             "(image, positive_text[, negative_text]) or annotations")
    parser.add_argument("--split", default="test", help="the split of clip_benchmark sets (default: test)")
    parser.add_argument("--suite", help="YAML list of clip_benchmark sets (e.g. configs/eval/datacomp.yaml)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--amp", action="store_true", help="autocast the towers (bf16 on the CPU, fp16 on CUDA), "
                                                           "as clip_benchmark does without --no_amp (default: fp32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.checkpoint and not args.run:
        parser.error("--checkpoint needs --run")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.suite and (args.synthetic_manifest or args.zeroshot or args.image_text):
        parser.error("--suite evaluates its own sets: give it without --synthetic-manifest/--zeroshot/--image-text")

    from hqclip_fast.config import EvalConfig
    from hqclip_fast.data import ClipTokenizer
    from hqclip_fast.eval_suite import format_average, load_suite, run_suite, suite_average

    try:
        model, image_size, context_length = _load_model(args)
        if args.suite:
            suite_sets = load_suite(args.suite)
        else:
            eval_cfg = EvalConfig(synthetic_manifest=args.synthetic_manifest, zeroshot=args.zeroshot,
                                  classnames=args.classnames, templates=args.templates,
                                  image_text=args.image_text, batch_size=args.batch_size)
            suite = EvalSuite.from_config(eval_cfg, image_size, split=args.split)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if not args.suite and not suite.enabled:
        parser.error("nothing to evaluate: give --synthetic-manifest, --zeroshot, --image-text or --suite")
    device, ranks = torch.device(args.device), EvalRanks()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun the ranks share the sets; rank 0 reports
        from hqclip_fast.runtime import init_runtime, shutdown_runtime

        runtime = init_runtime(device.type)
        device, ranks = runtime.device, EvalRanks.current(runtime.device)
    model, tokenizer = model.to(device), ClipTokenizer(context_length=context_length)
    try:
        with torch.autocast(device.type, enabled=args.amp):
            if args.suite:
                report = print if ranks.rank == 0 else (lambda line: None)
                results = {"sets": run_suite(suite_sets, model, tokenizer, device, image_size=image_size,
                                             batch_size=args.batch_size, ranks=ranks, report=report)}
                if (average := suite_average(suite_sets, results["sets"])) is not None:
                    results["average"] = average
                    report(format_average(average))
            else:
                results = suite.run(model, tokenizer, device, ranks=ranks)
    finally:
        if ranks.distributed:
            shutdown_runtime()
    if ranks.rank != 0:
        return
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    if args.suite and any(result["status"] != "ok" for result in results["sets"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    cli()

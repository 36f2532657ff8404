"""Evaluation: zero-shot classification, image-text retrieval, hard-negative accuracy; and `hqclip-eval`.

The metric functions take a model with open_clip's `encode_image` / `encode_text` and batches of tensors, so
they run unchanged on our model (plain or FSDP2-sharded) and on an open_clip model. Given `ranks`
(hqclip_fast.eval_ranks.EvalRanks), the ranks of a process group share the work: each encodes its share of the
samples and prompts, and every rank gets the metrics one process computes on the whole set. Zero-shot follows
open_clip's recipe: per class, the mean of the normalized embeddings of the prompt templates, renormalized; an
image's prediction is the class of highest cosine similarity.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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
        if "{}" not in template:
            raise ValueError(f"templates: each needs a '{{}}' for the class name, got {template!r}")
    prompts = [template.format(name) for name in classnames for template in templates]
    embeddings = ranks.gather(encode_texts(model, tokenizer, list(ranks.share(prompts)), device, ranks=ranks))
    per_class = embeddings.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return _normalized(per_class).T


@torch.no_grad()
def zero_shot_accuracy(model, classifier: torch.Tensor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       device, *, ranks: EvalRanks | None = None, image_size: int | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy of `classifier` (D, K) over (images, labels) batches. With `ranks`: the batches
    are this rank's share, the counts are summed over ranks; `image_size` is then needed (see EvalRanks)."""
    ranks = ranks or EvalRanks()
    blank = _blank_images(ranks, image_size)
    num_classes = classifier.shape[1]
    correct = dict.fromkeys(TopK, 0)
    total = 0
    encoded = ranks.lockstep(batches, lambda batch: (_encode_images(model, batch[0], device), batch[1]),
                             blank=lambda: (blank(), None))
    for features, labels in encoded:
        logits = features @ classifier
        ranked = logits.topk(min(max(TopK), num_classes), dim=1).indices
        hits = ranked == labels.view(-1, 1)
        for k in TopK:
            correct[k] += int(hits[:, :k].any(dim=1).sum())
        total += labels.numel()
    *summed, total = (int(n) for n in ranks.sum([*correct.values(), total]))
    correct = dict(zip(correct, summed))
    if total == 0:
        raise ValueError("zero-shot evaluation got no images")
    result = {f"zeroshot_top{k}": correct[k] / total for k in TopK}
    result["zeroshot_samples"] = total
    result["chance_top1"] = 1.0 / num_classes
    return result


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 both ways for n paired (image_i, text_i): the pair's partner ranks in the top k.

    The rank is the number of candidates scoring strictly higher (exact ties, rare with float features,
    count in the partner's favour)."""
    sims = image_features @ text_features.T
    target = torch.arange(sims.shape[0]).view(-1, 1)
    result = {}
    for direction, scores in (("image_to_text", sims), ("text_to_image", sims.T)):
        # rank of the partner = number of candidates scoring strictly higher
        partner = scores.gather(1, target)
        rank = (scores > partner).sum(dim=1)
        for k in RecallK:
            result[f"{direction}_R@{k}"] = float((rank < k).float().mean())
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
    """Retrieval recall over all (image, positive text) pairs; hard-negative accuracy over the pairs that
    come with a negative text (None where a pair has none).

    A batch is (images, positive texts, negative texts) or, with the pairs' global sample indices,
    (images, positive texts, negative texts, indices) as ImageTextSet.batches gives. With `ranks`: the batches
    are this rank's share (without indices: the i % world_size share, in order); features are gathered in the
    global order for retrieval and hard-negative counts summed; `image_size` is then needed."""
    ranks = ranks or EvalRanks()
    blank = _blank_images(ranks, image_size)
    images, positives, negatives, indices = [], [], [], []
    encoded = ranks.lockstep(batches, lambda batch: (_encode_images(model, batch[0], device), *batch[1:]),
                             blank=lambda: (blank(), [], []))
    for batch_features, batch_pos, batch_neg, *batch_index in encoded:
        if batch_index:
            indices.extend(int(i) for i in batch_index[0])
        else:  # row j of this rank's i % world_size share is sample j * world_size + rank
            rows = range(len(positives), len(positives) + len(batch_pos))
            indices.extend(j * ranks.world_size + ranks.rank for j in rows)
        images.append(batch_features)
        positives.extend(batch_pos)
        negatives.extend(batch_neg)
    local_images = torch.cat(images) if images else torch.empty(0, 0)
    image_features = ranks.gather(local_images, indices)
    if image_features.shape[0] == 0:
        raise ValueError("image-text evaluation got no images")
    local_positives = encode_texts(model, tokenizer, positives, device, ranks=ranks)
    result = retrieval_recall(image_features, ranks.gather(local_positives, indices))
    result["retrieval_samples"] = image_features.shape[0]
    with_negative = [i for i, neg in enumerate(negatives) if neg]
    negative_features = encode_texts(model, tokenizer, [negatives[i] for i in with_negative], device, ranks=ranks)
    wins = int(_positive_wins(local_images[with_negative], local_positives[with_negative],
                              negative_features).sum()) if with_negative else 0
    wins, with_negative_total = (int(n) for n in ranks.sum([wins, len(with_negative)]))
    if with_negative_total:
        result["hard_negative_acc"] = wins / with_negative_total
        result["hard_negative_samples"] = with_negative_total
    return result


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

    def batches(self, batch_size: int, ranks: EvalRanks | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches of this rank's share (all samples without `ranks`); only the share's
        images are decoded. For shards the share is build_eval_dataset's (counted in the tar structure, so a
        damaged sample is skipped by its own rank), which leaves the summed counts those of one process."""
        ranks = ranks or EvalRanks()
        if Path(self.source).is_dir():
            samples = self._folder_samples(ranks)
        else:
            from hqclip_fast.data import build_eval_dataset

            samples = ((image, target) for _, image, target in
                       build_eval_dataset(self.source, image_size=self.image_size, rank=ranks.rank,
                                          world_size=ranks.world_size))
        for batch in _batched(samples, batch_size):
            labels = torch.tensor([label for _, label in batch])
            if int(labels.min()) < 0 or int(labels.max()) >= len(self.classnames):
                raise ValueError(f"zeroshot: {self.source} has labels outside [0, {len(self.classnames)}), "
                                 "the number of class names")
            yield torch.stack([image for image, _ in batch]), labels

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
    annotation record (positive_description, else alt_text; negative_description)."""

    source: str
    image_size: int

    def batches(self, batch_size: int, ranks: EvalRanks | None = None
                ) -> Iterator[tuple[torch.Tensor, list[str], list[str | None], list[int]]]:
        """(images, positive texts, negative texts, sample indices) batches of this rank's share (all without
        `ranks`); only the share's images are decoded (build_eval_dataset's share; the indices order the
        gathered features)."""
        ranks = ranks or EvalRanks()
        for batch in _batched(self._samples(ranks), batch_size):
            images, positives, negatives, indices = zip(*batch)
            yield torch.stack(images), list(positives), list(negatives), list(indices)

    def _samples(self, ranks: EvalRanks) -> Iterator[tuple[torch.Tensor, str, str | None, int]]:
        from hqclip_fast.data import build_eval_dataset

        dataset = build_eval_dataset(self.source, image_size=self.image_size, rank=ranks.rank,
                                     world_size=ranks.world_size, with_index=True)
        for index, _, image, record in dataset:
            if not isinstance(record, dict):
                raise ValueError(f"image_text: {self.source} holds class labels (.cls), not texts (.json)")
            positive = record.get("positive_text") or record.get("positive_description") or record.get("alt_text")
            if positive:  # a sample without any text has nothing to retrieve
                yield image, positive, record.get("negative_text") or record.get("negative_description"), index


class EvalSuite:
    """The evaluation sets of a run; `run` computes every metric on them."""

    def __init__(self, zeroshot: ZeroShotSet | None, image_text: ImageTextSet | None, batch_size: int = 256):
        self.zeroshot, self.image_text, self.batch_size = zeroshot, image_text, batch_size

    @property
    def enabled(self) -> bool:
        return self.zeroshot is not None or self.image_text is not None

    @classmethod
    def from_config(cls, cfg, image_size: int) -> EvalSuite:
        """From the `eval` section of the training config (hqclip_fast.config.EvalConfig)."""
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
        if cfg.zeroshot:
            if Path(cfg.zeroshot).is_dir():
                names = _read_lines(cfg.classnames, "eval.classnames") if cfg.classnames else \
                    [n.replace("_", " ") for n in ZeroShotSet.folder_classnames(cfg.zeroshot)]
            elif cfg.classnames:
                names = _read_lines(cfg.classnames, "eval.classnames")
            else:
                raise ValueError("eval.classnames: zero-shot shards need a class-name file (one per line)")
            templates = _read_lines(cfg.templates, "eval.templates") if cfg.templates else list(DEFAULT_TEMPLATES)
            zeroshot = ZeroShotSet(cfg.zeroshot, names, templates, image_size)
        if cfg.image_text:
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
                                              ranks=ranks, image_size=zeroshot.image_size))
        if self.image_text is not None:
            results.update(image_text_metrics(model, tokenizer, self.image_text.batches(self.batch_size, ranks),
                                              device, ranks=ranks, image_size=self.image_text.image_size))
        return results


# ---------------------------------------------------------------------------------------------- hqclip-eval


def _load_model(args):
    from hqclip_fast.model import create_model, load_open_clip_state_dict

    if args.run:
        from hqclip_fast.export import load_trained_model

        model, cfg = load_trained_model(args.run, args.checkpoint)
        return model, cfg.data.image_size, cfg.data.context_length
    model = create_model(args.model, **({"image_size": args.image_size} if args.image_size else {}))
    if args.pretrained:
        load_open_clip_state_dict(model, torch.load(args.pretrained, map_location="cpu", weights_only=True))
    config = model.config
    return model.eval(), config.vision_cfg.image_size, config.text_cfg.context_length


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hqclip-eval", description="Zero-shot classification, image-text retrieval (R@1/5/10 both ways) "
        "and hard-negative accuracy. Prints one JSON object. Under torchrun the ranks share the sets.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="training run folder (its latest checkpoint, or --checkpoint)")
    which.add_argument("--model", help="model config name, with --pretrained <open_clip checkpoint file>")
    parser.add_argument("--checkpoint", help="with --run: a checkpoints/step_XXXXXXXX folder")
    parser.add_argument("--pretrained", help="with --model: open_clip weights (e.g. from hqclip-export)")
    parser.add_argument("--image-size", type=int, default=None, help="with --model: override the image size")
    parser.add_argument("--synthetic-manifest", help="manifest.json of `hqclip-data synthetic`")
    parser.add_argument("--zeroshot", help="zero-shot shards (key.cls) or an image folder (class sub-folders)")
    parser.add_argument("--classnames", help="class names file, one per line (default for folders: their names)")
    parser.add_argument("--templates", help="prompt templates file, one per line with {} (default: 4 photo prompts)")
    parser.add_argument("--image-text", help="shards with (image, positive_text[, negative_text]) or annotations")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.checkpoint and not args.run:
        parser.error("--checkpoint needs --run")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    from hqclip_fast.config import EvalConfig
    from hqclip_fast.data import ClipTokenizer

    try:
        model, image_size, context_length = _load_model(args)
        eval_cfg = EvalConfig(synthetic_manifest=args.synthetic_manifest, zeroshot=args.zeroshot,
                              classnames=args.classnames, templates=args.templates, image_text=args.image_text,
                              batch_size=args.batch_size)
        suite = EvalSuite.from_config(eval_cfg, image_size)
    except ValueError as err:
        parser.error(str(err))
    if not suite.enabled:
        parser.error("nothing to evaluate: give --synthetic-manifest, --zeroshot or --image-text")
    device, ranks = torch.device(args.device), EvalRanks()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun the ranks share the sets; rank 0 reports
        from hqclip_fast.runtime import init_runtime, shutdown_runtime

        runtime = init_runtime(device.type)
        device, ranks = runtime.device, EvalRanks.current(runtime.device)
    try:
        results = suite.run(model.to(device), ClipTokenizer(context_length=context_length), device, ranks=ranks)
    finally:
        if ranks.distributed:
            shutdown_runtime()
    if ranks.rank != 0:
        return
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    cli()

"""What a trained demo model has learned: colour and shape, image side and text side, on the zero-shot set.

For each run folder (`python -m hqclip_fast.demo --out DIR ...`) it loads the last checkpoint and reports:
- zero-shot top-1 and the shape confusion matrix of the zero-shot predictions;
- linear probes (logistic regression on half the zero-shot images' embeddings, scored on the other half) for the
  class, the colour and the shape: what the image embedding holds, whatever the text side does;
- cosine similarity between the classes of one colour, for the mean image embeddings and for the zero-shot
  class text embeddings: two classes that a tower does not separate sit near 1.
Writes RESULTS.json and RESULTS.md.

    python benchmarks/probe_demo_model.py runs/demo --out benchmarks/results/demo_probe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from hqclip_fast.data import ClipTokenizer
from hqclip_fast.eval import ZeroShotSet, zero_shot_classifier
from hqclip_fast.export import load_trained_model


@torch.enable_grad()
def linear_probe(features: torch.Tensor, labels: torch.Tensor, steps: int = 500) -> float:
    """Held-out accuracy of a logistic regression trained on the first half (fixed init: deterministic)."""
    half = len(labels) // 2
    classes = int(labels.max()) + 1
    weight = torch.zeros(features.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(features[:half] @ weight * 10 + bias, labels[:half]).backward()
        opt.step()
    with torch.no_grad():
        return ((features[half:] @ weight * 10 + bias).argmax(1) == labels[half:]).float().mean().item()


@torch.no_grad()
def probe(run: Path) -> dict:
    model, cfg = load_trained_model(run / "train")
    manifest = json.loads(Path(cfg.eval.synthetic_manifest).read_text())
    classnames = manifest["classnames"]
    colours = list(dict.fromkeys(name.split()[0] for name in classnames))
    shapes = list(dict.fromkeys(name.split()[1] for name in classnames))
    zeroshot = ZeroShotSet(manifest["zeroshot"], classnames, manifest["templates"], cfg.data.image_size)
    features, labels = [], []
    for images, targets in zeroshot.batches(256):
        features.append(F.normalize(model.encode_image(images), dim=-1))
        labels.append(targets)
    features, labels = torch.cat(features), torch.cat(labels)
    shape_of, colour_of = labels % len(shapes), labels // len(shapes)
    classifier = zero_shot_classifier(model, ClipTokenizer(context_length=cfg.data.context_length), classnames,
                                      manifest["templates"], "cpu")  # (D, classes), columns normalized
    predicted = (features @ classifier).argmax(1)
    confusion = torch.zeros(len(shapes), len(shapes), dtype=torch.long)
    for true, guess in zip(shape_of.tolist(), (predicted % len(shapes)).tolist()):
        confusion[true, guess] += 1
    first_colour = [c for c in range(len(classnames)) if c // len(shapes) == 0]
    image_means = F.normalize(torch.stack([features[labels == c].mean(0) for c in first_colour]), dim=-1)
    text_classes = classifier.T[first_colour]
    return {
        "run": run.name,
        "model": cfg.model.name,
        "zeroshot_top1": (predicted == labels).float().mean().item(),
        "shapes": shapes,
        "shape_confusion": confusion.tolist(),
        "probe": {"class": linear_probe(features, labels), "colour": linear_probe(features, colour_of),
                  "shape": linear_probe(features, shape_of)},
        "cosine_colour": colours[0],
        "image_cosine": (image_means @ image_means.T).tolist(),
        "text_cosine": (text_classes @ text_classes.T).tolist(),
    }


def markdown(results: list[dict]) -> str:
    out = ["| run | model | zero-shot top-1 | probe: class / colour / shape | shape confusion (rows: true) | "
           "image cosine | text cosine |", "|---|---|---|---|---|---|---|"]
    for r in results:
        shapes = r["shapes"]
        pairs = [(i, j) for i in range(len(shapes)) for j in range(i + 1, len(shapes))]

        def cos(matrix, shapes=shapes, pairs=pairs):
            return ", ".join(f"{shapes[i]}/{shapes[j]} {matrix[i][j]:.3f}" for i, j in pairs)

        rows = "; ".join(f"{s}: {row}" for s, row in zip(shapes, r["shape_confusion"]))
        p = r["probe"]
        out.append(f"| {r['run']} | {r['model']} | {r['zeroshot_top1']:.3f} | {p['class']:.3f} / {p['colour']:.3f}"
                   f" / {p['shape']:.3f} | {rows} | {cos(r['image_cosine'])} | {cos(r['text_cosine'])} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="demo output folders")
    parser.add_argument("--out", required=True, type=Path, help="results path without suffix")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = [probe(run) for run in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = ("# What the demo models learned (zero-shot set; cosines between the classes of colour "
            f"'{results[0]['cosine_colour']}')\n\n" + markdown(results))
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

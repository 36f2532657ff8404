"""Training curves from a run's metrics.jsonl: loss terms and evaluation accuracy against steps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from hqclip_fast.metrics import read_metrics  # noqa: E402

LOSS_TERMS = (("loss", "total"), ("clip", "CLIP InfoNCE"), ("hni", "hard-negative (HNI)"), ("stc", "short tags (STC)"))
ACCURACIES = (("zeroshot_top1", "zero-shot top-1"), ("hard_negative_acc", "hard-negative accuracy"),
              ("image_to_text_R@1", "image->text R@1"))


def plot_curves(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))

    for key, label in LOSS_TERMS:
        points = [(r["step"], r[key]) for r in train if key in r and (key == "loss" or r[key] != 0.0)]
        if points:
            ax_loss.plot(*zip(*points), label=label, linewidth=2 if key == "loss" else 1.2)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    for key, label in ACCURACIES:
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            ax_acc.plot(*zip(*points), marker="o", label=label)
    chance = next((r["chance_top1"] for r in evals if "chance_top1" in r), None)
    if chance is not None:
        ax_acc.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"zero-shot chance ({chance:.3f})")
    ax_acc.axhline(0.5, color="silver", linestyle=":", linewidth=1, label="hard-negative chance (0.5)")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="evaluation", ylim=(0, 1))
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path

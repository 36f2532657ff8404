"""Why HQ-CLIP exists, on the synthetic scenes: the same tiny model and step budget trained four ways.

- `alt-text` (plain CLIP): positives are the web-like alt texts, no negatives, no tags;
- `descriptions`: positives are the exact descriptions, no negatives, no tags;
- `hq-clip`: the demo's recipe: descriptions as positives, minimal-edit negatives in the softmax,
  hard-negative identification (HNI) and short-tag classification (STC), so that it differs from
  `descriptions` by the negatives, HNI and STC alone;
- `hq-clip-alt-mix`: the same recipe with 20% of the positives drawn from the alt texts instead.
Each arm runs for every seed (model init and data order; the data set is fixed); zero-shot top-1 and
hard-negative accuracy are averaged over seeds. Writes results/ablate_synthetic.{json,md,png}.

    python benchmarks/ablate_synthetic.py --seeds 0 1 2            # CPU, minutes per run
    python benchmarks/ablate_synthetic.py --seeds 0 --steps 100    # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hqclip_fast.config import load_config  # noqa: E402
from hqclip_fast.demo import REPO_CONFIG, ensure_synthetic  # noqa: E402
from hqclip_fast.train import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PLAIN = ["data.use_negatives=false", "data.use_tags=false", "loss.hni_weight=0", "loss.stc_weight=0",
         "loss.negatives_in_softmax=false"]
ARMS = {
    "alt-text": ["data.p_description=0.0", *PLAIN],
    "descriptions": ["data.p_description=1.0", *PLAIN],
    "hq-clip": [],  # the demo preset as it is
    "hq-clip-alt-mix": ["data.p_description=0.8"],
}
METRICS = ("zeroshot_top1", "hard_negative_acc", "image_to_text_R@1")


def run_arm(arm: str, seed: int, args, manifest: dict, manifest_path: Path) -> dict:
    run_dir = Path(args.work) / f"{arm}-seed{seed}"
    overrides = [
        f"run_dir={run_dir}", f"seed={seed}", "checkpoint.resume=false", "eval.every_steps=0",
        "log.progress_bar=false", "log.tensorboard=false",
        f"data.train_data={manifest['train']}", f"model.tag_vocab={manifest['tags']}",
        f"eval.synthetic_manifest={manifest_path}",
        *([f"steps={args.steps}", f"optim.warmup_steps={min(20, args.steps // 10)}"] if args.steps else []),
        *ARMS[arm],
    ]
    start = time.perf_counter()
    summary = train(load_config(args.config, overrides))
    return {"arm": arm, "seed": seed, "wall_s": time.perf_counter() - start, "steps": summary["steps"],
            **{k: summary[k] for k in (*METRICS, "chance_top1")}}


def summarize(runs: list[dict]) -> dict:
    table = {}
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        table[arm] = {}
        for metric in METRICS:
            values = [r[metric] for r in rows]
            table[arm][metric] = {"mean": statistics.fmean(values),
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return table


def write_markdown(table: dict, result: dict, path: Path) -> None:
    lines = [
        "# Ablation on the synthetic scenes",
        "",
        f"Same model ({result['model']}, {result['image_size']}px) and budget ({result['steps']} steps x batch "
        f"{result['batch_size']}) per arm; mean ± std over seeds {result['seeds']}. Zero-shot chance = "
        f"{result['chance_top1']:.3f}, hard-negative chance = 0.5. Device: {result['device']}.",
        "",
        "| arm | zero-shot top-1 | hard-negative acc | image->text R@1 |",
        "|---|---|---|---|",
    ]
    for arm, metrics in table.items():
        cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" for m in METRICS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(table: dict, chance: float, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (metric, title, floor) in zip(axes, (("zeroshot_top1", "zero-shot top-1", chance),
                                                 ("hard_negative_acc", "hard-negative accuracy", 0.5))):
        arms = list(table)
        means = [table[a][metric]["mean"] for a in arms]
        stds = [table[a][metric]["std"] for a in arms]
        ax.bar(arms, means, yerr=stds, capsize=4, color=["#999999", "#6a9fd4", "#d4572a"])
        ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label=f"chance ({floor:.2f})")
        ax.set(title=title, ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
        for i, m in enumerate(means):
            ax.text(i, m + 0.02, f"{m:.2f}", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=0, help="training steps per run (0: the demo preset's)")
    parser.add_argument("--config", default=str(REPO_CONFIG))
    parser.add_argument("--num-samples", type=int, default=6000)
    parser.add_argument("--work", default="runs/ablate", help="scratch folder for data and runs")
    parser.add_argument("--out", default=str(RESULTS / "ablate_synthetic"), help="output path without suffix")
    args = parser.parse_args()

    preset = load_config(args.config, check=False)
    data_dir = Path(args.work) / "data"
    manifest = ensure_synthetic(data_dir, args.num_samples, preset.data.image_size, seed=0)
    runs = []
    for seed in args.seeds:
        for arm in ARMS:
            runs.append(run_arm(arm, seed, args, manifest, data_dir / "manifest.json"))
            print(json.dumps(runs[-1]), flush=True)

    table = summarize(runs)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "ablate_synthetic", "device": f"CPU, {os.cpu_count()} cores (shared machine)",
        "load_average_1min": os.getloadavg()[0], "git_commit": commit, "model": preset.model.name,
        "image_size": preset.data.image_size, "batch_size": preset.batch_size,
        "steps": runs[0]["steps"], "seeds": args.seeds, "chance_top1": runs[0]["chance_top1"],
        "arms": {arm: ARMS[arm] for arm in ARMS}, "table": table, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(table, result, out.with_suffix(".md"))
    plot(table, result["chance_top1"], out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

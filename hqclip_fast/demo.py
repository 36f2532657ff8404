"""`python -m hqclip_fast.demo` (what `make demo` runs): HQ-CLIP end to end on the CPU in a few minutes.

1. generate the synthetic scenes (train shards with the four HQ-CLIP texts, a zero-shot set, a hard-negative
   set, the tag vocabulary) under <out>/data, unless an identical set is already there;
2. train a tiny CLIP with the full HQ-CLIP loss (InfoNCE + hard negatives + short tags), configs/demo.yaml;
3. evaluate (zero-shot top-1 against chance, hard-negative accuracy, retrieval) and write
   <out>/metrics.json and <out>/curves.png.
Extra `key=value` arguments override the training config (e.g. `steps=100`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from hqclip_fast.config import load_config
from hqclip_fast.data.synthetic import GENERATOR_VERSION, write_synthetic
from hqclip_fast.plotting import plot_curves
from hqclip_fast.train import train

REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
TARGETS = {"zeroshot_top1": 0.6, "hard_negative_acc": 0.8}  # and chance_top1 <= 0.1, wall_s <= 300


def ensure_synthetic(out_dir: Path, num_samples: int, image_size: int, seed: int) -> dict:
    """The synthetic set under out_dir, generated unless one with the same settings is there already."""
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if (manifest.get("num_train"), manifest.get("image_size"), manifest.get("seed"),
                manifest.get("generator_version")) == (num_samples, image_size, seed, GENERATOR_VERSION):
            return manifest
        shutil.rmtree(out_dir)
    return write_synthetic(str(out_dir), num_samples=num_samples, shard_size=1000, seed=seed, image_size=image_size)


def run_demo(out: Path, config: Path, overrides: list[str], num_samples: int, seed: int) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    preset = load_config(config, overrides, check=False)  # completed with the data paths below
    manifest = ensure_synthetic(out / "data", num_samples, preset.data.image_size, seed)
    data_s = time.perf_counter() - start

    run_dir = out / "train"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    cfg = load_config(config, [
        f"run_dir={run_dir}",
        f"data.train_data={manifest['train']}",
        f"model.tag_vocab={manifest['tags']}",
        f"eval.synthetic_manifest={out / 'data' / 'manifest.json'}",
        *overrides,
    ])
    start = time.perf_counter()
    summary = train(cfg)
    wall_s = time.perf_counter() - start

    metrics = {
        "zeroshot_top1": summary.get("zeroshot_top1"),
        "zeroshot_top5": summary.get("zeroshot_top5"),
        "chance_top1": summary.get("chance_top1"),
        "hard_negative_acc": summary.get("hard_negative_acc"),
        "image_to_text_R@1": summary.get("image_to_text_R@1"),
        "text_to_image_R@1": summary.get("text_to_image_R@1"),
        "steps": summary["steps"],
        "global_batch_size": summary["global_batch_size"],
        "samples_per_s": summary["samples_per_s"],
        "wall_s": wall_s,  # training + evaluation (data generation not included)
        "train_s": summary["train_s"],
        "data_generation_s": data_s,
        "model": cfg.model.name,
        "image_size": cfg.data.image_size,
        "loss": {"hni_weight": cfg.loss.hni_weight, "stc_weight": cfg.loss.stc_weight},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_curves(run_dir / "metrics.jsonl", out / "curves.png",
                title=f"HQ-CLIP demo: {cfg.model.name}, {cfg.data.image_size}px, batch {summary['global_batch_size']}")
    return metrics


def report(metrics: dict, out: Path) -> str:
    def check(ok: bool) -> str:
        return "ok  " if ok else "MISS"

    zs, chance, hn, wall = (metrics[k] for k in ("zeroshot_top1", "chance_top1", "hard_negative_acc", "wall_s"))
    lines = [
        f"{check(zs >= TARGETS['zeroshot_top1'])} zero-shot top-1      {zs:.3f}   (target >= 0.6; chance {chance:.3f})",
        f"{check(hn >= TARGETS['hard_negative_acc'])} hard-negative acc    {hn:.3f}   (target >= 0.8; chance 0.5)",
        f"{check(wall <= 300)} train + eval         {wall:.0f} s   (target <= 300 s; {metrics['steps']} steps, "
        f"{metrics['samples_per_s']:.0f} samples/s)",
        f"wrote {out / 'metrics.json'} and {out / 'curves.png'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hqclip_fast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--config", default=str(REPO_CONFIG), help="training preset (default: configs/demo.yaml)")
    parser.add_argument("--num-samples", type=int, default=6000, help="synthetic training samples to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = parser.parse_args(argv)
    try:
        metrics = run_demo(Path(args.out), Path(args.config), args.overrides, args.num_samples, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(report(metrics, Path(args.out)))


if __name__ == "__main__":
    main()

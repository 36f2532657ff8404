"""Tabulate demo runs (`python -m hqclip_fast.demo --out DIR key=value ...`) side by side.

Each run folder holds `train/config.yaml` (the resolved config) and `train/metrics.jsonl` (periodic evaluations);
this script reads the settings that differ between the runs and the zero-shot / hard-negative accuracy at every
evaluation, and writes RESULTS.json and RESULTS.md. It is how the demo preset was chosen
(results/demo_tower_search.md):

    python -m hqclip_fast.demo --out runs/search/vit-avg cpu_threads=1 model.overrides.vision_cfg.pool_type=avg
    python -m hqclip_fast.demo --out runs/search/rn cpu_threads=1 model.name=hqclip-rn-micro
    python benchmarks/collect_demo_runs.py runs/search/* --out benchmarks/results/demo_tower_search \
        --note runs/search/rn="..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

SETTINGS = ("seed", "model.name", "model.overrides", "optim.lr", "steps", "data.p_description", "data.image_size",
            "data.rrc_scale", "loss.stc_weight", "cpu_threads")


def _get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        cfg = cfg.get(key) if isinstance(cfg, dict) else None
    return cfg


def read_run(run: Path) -> dict:
    cfg_path, metrics_path = run / "train" / "config.yaml", run / "train" / "metrics.jsonl"
    if not cfg_path.exists() or not metrics_path.exists():
        raise SystemExit(f"{run}: not a demo run folder (needs train/config.yaml and train/metrics.jsonl)")
    cfg = yaml.safe_load(cfg_path.read_text())
    evals = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if "zeroshot_top1" in r]
    if not evals:
        raise SystemExit(f"{run}: no evaluation in {metrics_path}")
    return {
        "run": run.name,
        "settings": {k: _get(cfg, k) for k in SETTINGS},
        "evals": [{"step": r["step"], "zeroshot_top1": r["zeroshot_top1"],
                   "hard_negative_acc": r["hard_negative_acc"]} for r in evals],
    }


def markdown(runs: list[dict], notes: dict[str, str]) -> str:
    steps = sorted({e["step"] for r in runs for e in r["evals"]})
    varying = [k for k in SETTINGS if len({json.dumps(r["settings"][k]) for r in runs}) > 1]
    head = ["run", *varying, *(f"zs@{s}" for s in steps), "hard-neg (last)", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        by_step = {e["step"]: e for e in r["evals"]}
        cells = [r["run"], *(json.dumps(r["settings"][k]) for k in varying),
                 *(f"{by_step[s]['zeroshot_top1']:.3f}" if s in by_step else "" for s in steps),
                 f"{r['evals'][-1]['hard_negative_acc']:.3f}", notes.get(r["run"], "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="demo output folders (--out of each run)")
    parser.add_argument("--out", required=True, type=Path, help="results path without suffix")
    parser.add_argument("--title", default="Demo runs", help="Markdown heading")
    parser.add_argument("--note", action="append", default=[], metavar="RUN=TEXT",
                        help="a note for one run's row (its folder name or path)")
    args = parser.parse_args(argv)
    notes = {}
    for item in args.note:
        run, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--note must be RUN=TEXT, got {item!r}")
        notes[Path(run).name] = text
    runs = [read_run(run) for run in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"runs": runs, "notes": notes}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"# {args.title}\n\n{markdown(runs, notes)}")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

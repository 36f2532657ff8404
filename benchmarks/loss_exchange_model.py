"""Predicted per-step cost of the loss's two feature exchanges (ring, all-gather) for the presets at n = 8, 64
and 512 ranks, from the cost model in hqclip_fast/loss/exchange.py, and what loss.exchange=auto picks.

    python benchmarks/loss_exchange_model.py            # writes benchmarks/results/loss_exchange_model.{json,md}

A model, not a measurement: its inputs (latencies, bandwidths, flop rate) are ExchangeCosts' defaults, vendor
figures for H100 nodes with NVLink and 400 Gb/s InfiniBand. Each preset keeps its per-rank batch (batch_size)
and its model's embedding width; negatives are softmax columns in both (two key sets); bf16 features; 8 ranks
per node. The last rows take vitl14-xlarge's global batch of 90,112 over 512 ranks (b = 176).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from hqclip_fast.config import load_config
from hqclip_fast.loss.exchange import (
    ExchangeCosts,
    ExchangeProblem,
    all_gather_seconds,
    choose_exchange,
    ring_seconds,
)
from hqclip_fast.model.configs import get_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("vitb16-large", "vitl14-xlarge")
RANKS = (8, 64, 512)


def rows() -> list[dict]:
    out = []
    cases = []
    for preset in PRESETS:
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml", check=False)
        dim = get_config(cfg.model.name).embed_dim
        cases += [(preset, n, cfg.batch_size, dim) for n in RANKS]
    cases.append(("vitl14-xlarge, global 90,112", 512, 90112 // 512, get_config("ViT-L-14").embed_dim))
    for preset, n, b, dim in cases:
        problem = ExchangeProblem(ranks=n, local_batch=b, dim=dim)
        out.append({"preset": preset, "ranks": n, "local_batch": b, "global_batch": n * b, "dim": dim,
                    "ring_ms": 1e3 * ring_seconds(problem), "all_gather_ms": 1e3 * all_gather_seconds(problem),
                    "gathered_mib": problem.gathered_bytes / 2**20, "auto": choose_exchange(problem)})
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| preset | ranks | b | B | D | ring (ms) | all-gather (ms) | gathered + grad (MiB) | auto |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['preset']} | {r['ranks']} | {r['local_batch']} | {r['global_batch']:,} | {r['dim']} | "
                     f"{r['ring_ms']:.2f} | {r['all_gather_ms']:.2f} | {r['gathered_mib']:.0f} | {r['auto']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loss_exchange_model"))
    args = parser.parse_args()
    results = rows()
    table = markdown(results)
    print(table)
    costs = dataclasses.asdict(ExchangeCosts())
    Path(args.out + ".json").write_text(json.dumps({"costs": costs, "rows": results}, indent=2) + "\n")
    Path(args.out + ".md").write_text(
        "# Loss feature exchange: cost model (benchmarks/loss_exchange_model.py)\n\n"
        "Predicted forward + backward time of the exchange and the loss kernels per step, bf16 features, "
        "negatives as softmax columns, 8 ranks per node. Model inputs (ExchangeCosts defaults, vendor figures "
        f"for H100 + NVLink + 400 Gb/s InfiniBand, not measured): `{costs}`.\n\n" + table + "\n")


if __name__ == "__main__":
    main()

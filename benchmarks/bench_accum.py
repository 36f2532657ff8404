"""Gradient accumulation's cost: peak memory and time per sample of one training step over the same global batch
as k = 1 x B and as k micro-batches of B / k (hqclip_fast.train.TrainStep, full HQ-CLIP loss, the feature-cache
method), on the CPU.

Each k runs in its own process, so that one setting's freed-but-held heap does not count as another's peak:
the peak is the process's resident high-water mark over the timed steps (bench_train.peak_bytes), everything held
included (model, AdamW state, activations), and that peak less the resident memory before the timed steps (what
the step itself adds: activations, gradients, the cached features). Time per sample: median step time over --steps steps after one
warm-up step, divided by B.

    python benchmarks/bench_accum.py --model hqclip-tiny --image-size 64 --global-batch 128 --accum 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_train import NUM_TAGS, RESULTS, _rss_field, peak_bytes, random_batch

from hqclip_fast.loss import HQCLIPLoss
from hqclip_fast.model import create_model
from hqclip_fast.optim import build_optimizer
from hqclip_fast.parallelize import parallelize_model
from hqclip_fast.schedule import build_lr_scheduler
from hqclip_fast.train import TrainStep


def measure(args, k: int) -> dict:
    """One process, one k: the step over k micro-batches of global_batch / k."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = parallelize_model(create_model(args.model, num_tags=NUM_TAGS, image_size=args.image_size))
    optimizer = build_optimizer(model, lr=5e-4, weight_decay=0.2)
    step = TrainStep(model, HQCLIPLoss(hni_weight=1.0, stc_weight=1.0, impl="chunked"), optimizer,
                     build_lr_scheduler(optimizer, warmup_steps=0, total_steps=10**6), device=device,
                     grad_clip=1.0, bf16_autocast=False, use_negatives=True, use_tags=True)
    micro = args.global_batch // k
    context = model.config.text_cfg.context_length
    whole = random_batch(args, device, context, negatives=True, tags=True, batch_size=args.global_batch)
    batches = [{key: value[i * micro:(i + 1) * micro] for key, value in whole.items()} for i in range(k)]
    feed = batches if k > 1 else batches[0]
    step(feed)  # warm-up: AdamW state and first-call allocations
    times = []

    def timed_steps():
        for _ in range(args.steps):
            start = time.perf_counter()
            step(feed)
            times.append(time.perf_counter() - start)

    held = _rss_field("VmRSS")  # model, AdamW state, batches, libraries: what every setting holds anyway
    peak = peak_bytes(device, timed_steps)
    return {"accum_freq": k, "micro_batch": micro, "global_batch": args.global_batch,
            "peak_rss_mib": round(peak / 2**20, 1), "step_peak_above_held_mib": round((peak - held) / 2**20, 1), "step_s_median": round(statistics.median(times), 4),
            "ms_per_sample": round(1000 * statistics.median(times) / args.global_batch, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hqclip-tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--accum", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process's k
    parser.add_argument("--out", default=str(RESULTS / "bench_accum_cpu.json"))
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args, args.one)))
        return
    rows = []
    for k in args.accum:
        if args.global_batch % k:
            raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of accum {k}")
        child = [sys.executable, __file__, *sys.argv[1:], "--one", str(k)]
        rows.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout
                               .strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("one", "out")}
    result = {"settings": settings, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| accum_freq | micro-batch | peak RSS (MiB) | step's peak above what is held (MiB) | ms / sample |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['accum_freq']} | {r['micro_batch']} | {r['peak_rss_mib']} | {r['step_peak_above_held_mib']} | "
              f"{r['ms_per_sample']} |" for r in rows]
    out.with_suffix(".md").write_text(
        f"`python benchmarks/bench_accum.py {' '.join(sys.argv[1:])}` ({args.model}, {args.image_size} px, global "
        f"batch {args.global_batch}, full HQ-CLIP loss, {args.threads} threads):\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

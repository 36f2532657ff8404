"""Profile impl="triton" of the HQ-CLIP loss on a GPU: a torch.profiler trace and summary table, and the `ncu`
command line that profiles the fused kernels of one step.

    python benchmarks/profile_loss.py --batch 32768 --dim 768 --dtype bf16 --negatives --tags 4096

Writes a Chrome trace (open in chrome://tracing or Perfetto) under --out and prints the kernels sorted by
GPU time. Needs CUDA: the Triton interpreter on a CPU says nothing about GPU performance.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

KERNELS = ("_lse_fwd_kernel", "_grad_logits_kernel", "_tag_bce_fwd_kernel", "_tag_bce_grad_kernel")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32768, help="global batch B (one process)")
    p.add_argument("--dim", type=int, default=768, help="feature size D")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--negatives", action="store_true", help="add hard negatives as softmax columns + HNI")
    p.add_argument("--tags", type=int, default=0, help="tag vocabulary size V (0: no STC term)")
    p.add_argument("--impl", default="triton", help="loss impl to profile (triton, chunked, reference)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    p.add_argument("--no-profiler", action="store_true",
                   help="run the steps only (what the printed ncu command launches)")
    return p.parse_args(argv)


def make_inputs(args, device):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def features():
        return F.normalize(torch.randn(args.batch, args.dim, device=device), dim=1).to(dtype).requires_grad_()

    inputs = dict(image_features=features(), text_features=features(),
                  logit_scale=torch.tensor(100.0, device=device, requires_grad=True))
    options = dict(impl=args.impl)
    if args.negatives:
        inputs["neg_text_features"] = features()
        options["hni_weight"] = 1.0
    if args.tags:
        inputs["tag_features"] = inputs["image_features"]
        inputs["tag_weight"] = (0.02 * torch.randn(args.tags, args.dim, device=device)).to(dtype).requires_grad_()
        inputs["tag_bias"] = torch.zeros(args.tags, device=device, requires_grad=True)
        inputs["tag_targets"] = torch.randint(-1, args.tags, (args.batch, 16), device=device)
        options["stc_weight"] = 1.0
    return inputs, options


def step(inputs, options):
    from hqclip_fast.loss import hqclip_loss

    out = hqclip_loss(**inputs, **options)
    out.total.backward()
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.grad is not None:
            value.grad = None


def ncu_command(argv) -> str:
    """Nsight Compute on the fused kernels of one step after warm-up (the warm-up, autotuning included, runs
    before cudaProfilerStart, so `--profile-from-start off` leaves it out)."""
    script = [sys.executable, "benchmarks/profile_loss.py", *argv, "--no-profiler", "--warmup", "3",
              "--steps", "1"]
    regex = "|".join(KERNELS)
    return " ".join(["ncu", "--profile-from-start", "off", "--set", "full", "--kernel-name-base", "function",
                     "--kernel-name",
                     shlex.quote(f"regex:{regex}"), "--launch-skip", "0", "--launch-count", "20",
                     "-o", "benchmarks/results/profile/loss_ncu", *map(shlex.quote, script)])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_loss.py needs a CUDA device (none found): the Triton interpreter on a CPU "
                         "does not measure GPU kernels. Run it on a GPU machine.")
    device = torch.device("cuda")
    inputs, options = make_inputs(args, device)
    for _ in range(args.warmup):
        step(inputs, options)
    torch.cuda.synchronize()
    if args.no_profiler:
        # With `ncu --profile-from-start off` only these steps are profiled, not the autotuning launches above.
        torch.cuda.profiler.start()
        for _ in range(args.steps):
            step(inputs, options)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return

    from torch.profiler import ProfilerActivity, profile

    args.out.mkdir(parents=True, exist_ok=True)
    torch.cuda.reset_peak_memory_stats()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(args.steps):
            step(inputs, options)
        torch.cuda.synchronize()
    trace = args.out / f"loss_{args.impl}_B{args.batch}_D{args.dim}_{args.dtype}.json"
    prof.export_chrome_trace(str(trace))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB over {args.steps} steps")
    print(f"chrome trace: {trace}")
    print("ncu (Nsight Compute) on the fused kernels:")
    print("  " + ncu_command([a for a in argv if a != "--no-profiler"]))


if __name__ == "__main__":
    main()

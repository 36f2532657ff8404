"""Full training-step throughput and MFU: hqclip-fast's trainer step against open_clip's own training step.

Both sides train the same architecture on the same random batch on the same device, data loading excluded:
- ours: `hqclip_fast.train.TrainStep` (the trainer's step: model, HQ-CLIP loss, backward, clipping, fused AdamW,
  schedule, logit-scale clamp) with the plain CLIP loss (the like-for-like row) and with the full HQ-CLIP loss
  (negatives in the softmax + HNI + STC; twice the text to encode per image);
- open_clip: `open_clip_train.train.train_one_epoch` (the loop `python -m open_clip_train.main` runs) with
  open_clip's model and ClipLoss, AdamW, grad clipping, the same precision.
MFU = (FLOPs of one step, counted per model with torch.utils.flop_counter on the actual shapes) x steps/s /
peak FLOP/s of the device (`--peak-tflops`; 989 by default on CUDA, the H100/H200 SXM bf16 dense figure; none on
the CPU).

`--batch-size auto` finds the largest batch at which both sides' steps fit (capped at --max-batch): after a
first step, each side's peak memory is measured at --probe-batch and twice that, the line through the two
points says how many samples fit in 85% of the device's memory, and one step of each side at the chosen batch
(a multiple of --probe-batch, cut by a fifth while one runs out of memory) confirms it. The probe runs eager,
also with --compile. A row that runs out of memory at the chosen batch (the HQ-CLIP row) is recorded as
skipped. Each row and the probe are printed as a JSON line when done, so that a run cut off at a time cap
keeps what it measured.

    python benchmarks/bench_train.py --device cuda --model ViT-B-16 --batch-size auto --precision bf16
    python benchmarks/bench_train.py --device cpu --model hqclip-micro --image-size 32 --batch-size 32  # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from hqclip_fast.loss import HQCLIPLoss
from hqclip_fast.model import create_model
from hqclip_fast.optim import build_optimizer
from hqclip_fast.parallelize import parallelize_model
from hqclip_fast.schedule import build_lr_scheduler
from hqclip_fast.train import TrainStep

RESULTS = Path(__file__).resolve().parent / "results"
NUM_TAGS = 1000  # STC vocabulary size for the HQ-CLIP row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(args, device, context_length: int, *, negatives: bool, tags: bool, batch_size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randn(batch_size, 3, args.image_size, args.image_size, generator=g),
        "pos_tokens": torch.randint(1, 49406, (batch_size, context_length), generator=g),
    }
    batch["pos_tokens"][:, -1] = 49407  # end of text (open_clip pools at the argmax id)
    if negatives:
        batch["neg_tokens"] = batch["pos_tokens"].roll(1, dims=0)
    if tags:
        batch["tag_ids"] = torch.randint(0, NUM_TAGS, (batch_size, 8), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def build_ours(args, device, loss_kind: str) -> tuple[TrainStep, int]:
    torch.manual_seed(0)
    hq = loss_kind == "hqclip"
    model = create_model(args.model, num_tags=NUM_TAGS if hq else 0, image_size=args.image_size).to(device)
    model = parallelize_model(model, compile=args.compile)
    optimizer = build_optimizer(model, lr=5e-4, weight_decay=0.2, device=device)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=0, total_steps=10**6)
    loss_fn = HQCLIPLoss(hni_weight=1.0 if hq else 0.0, stc_weight=1.0 if hq else 0.0,
                         negatives_in_softmax=hq, impl=args.loss_impl)
    step = TrainStep(model, loss_fn, optimizer, scheduler, device=device, grad_clip=1.0,
                     bf16_autocast=args.precision == "bf16", use_negatives=hq, use_tags=hq)
    return step, model.config.text_cfg.context_length


def count_step_flops(args, device, loss_kind: str) -> float:
    """FLOPs of one training step (forward + backward) at args.batch_size, counted on the real model.

    Counted at a small batch and scaled linearly (every model FLOP is per sample), plus the loss counted at the
    full batch (its logits grow with the square of the batch)."""
    small = 2
    train_step, context = build_ours(SimpleNamespace(**{**vars(args), "compile": False}), device, loss_kind)
    hq = loss_kind == "hqclip"
    batch = random_batch(args, device, context, negatives=hq, tags=hq, batch_size=small)
    model = train_step.model
    with FlopCounterMode(display=False) as counter:
        out = model(batch["images"], batch["pos_tokens"], neg_texts=batch.get("neg_tokens"))
        sum(v.float().sum() for k, v in out.items() if k.endswith("features") and v is not None).backward()
    model_flops = counter.get_total_flops() * args.batch_size / small
    dim = model.config.embed_dim
    feats = {k: torch.randn(args.batch_size, dim, device=device, requires_grad=True) for k in ("i", "t", "n")}
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    kwargs = {}
    if hq:
        kwargs = dict(neg_text_features=feats["n"], tag_features=feats["i"],
                      tag_weight=torch.randn(NUM_TAGS, dim, device=device, requires_grad=True),
                      tag_targets=torch.randint(0, NUM_TAGS, (args.batch_size, 8), device=device))
    with FlopCounterMode(display=False) as counter:
        train_step.loss_fn(feats["i"], feats["t"], scale, **kwargs).total.backward()
    return model_flops + counter.get_total_flops()


def time_ours(args, device, loss_kind: str) -> float:
    train_step, context = build_ours(args, device, loss_kind)
    hq = loss_kind == "hqclip"
    batch = random_batch(args, device, context, negatives=hq, tags=hq, batch_size=args.batch_size)
    for _ in range(args.warmup):
        train_step(batch)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(batch)
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def build_open_clip(args, device):
    """open_clip's model, ClipLoss and AdamW; returns run(steps, batch_size): `open_clip_train.train.
    train_one_epoch` (the loop `python -m open_clip_train.main` runs) over `steps` identical batches."""
    import open_clip
    from open_clip_train.train import train_one_epoch

    from hqclip_fast.export import open_clip_model_config

    if args.model not in open_clip.list_models():  # our CPU configs: register the same architecture
        config = open_clip_model_config(create_model(args.model, image_size=args.image_size))
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{args.model}.json"
            path.write_text(json.dumps(config))
            open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, device=device, force_image_size=args.image_size,
                                   output_dict=True)
    if args.compile:
        model = torch.compile(model)
    context = model.context_length if hasattr(model, "context_length") else 77
    loss = open_clip.ClipLoss(cache_labels=True)
    # open_clip_train's groups (its main.py): no decay for gains, biases, norms and logit_scale
    no_decay = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    decay = [p for n, p in model.named_parameters() if not no_decay(n, p)]
    rest = [p for n, p in model.named_parameters() if no_decay(n, p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}],
                                  lr=5e-4, betas=(0.9, 0.98), eps=1e-6)

    def run(steps: int, batch_size: int) -> None:
        batch = random_batch(args, device, context, negatives=False, tags=False, batch_size=batch_size)
        oc_args = SimpleNamespace(
            device=str(device), precision="amp_bf16" if args.precision == "bf16" else "fp32", distill=False,
            accum_freq=1, skip_scheduler=True, horovod=False, grad_clip_norm=1.0, batch_size=batch_size,
            world_size=1, rank=0, local_rank=0, log_every_n_steps=10**9, wandb=False)
        loader = _Loader([(batch["images"], batch["pos_tokens"])] * steps, batch_size)
        data = {"train": SimpleNamespace(dataloader=loader, set_epoch=lambda e: None)}
        train_one_epoch(model, data, loss, 0, optimizer, None, None, None, oc_args)
    return run


def time_open_clip(args, device) -> float:
    """open_clip's training loop over `steps` identical batches, after a warm-up epoch."""
    run = build_open_clip(args, device)
    run(args.warmup, args.batch_size)
    _sync(device)
    start = time.perf_counter()
    run(args.steps, args.batch_size)
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- batch probe
def _rss_field(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_bytes(device, fn) -> int:
    """Peak memory while fn runs, everything held included (model, optimizer, activations): the allocator's
    peak on CUDA; on the CPU the resident set's high-water mark (reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return _rss_field("VmHWM")


def memory_budget(device) -> int:
    """85% of the GPU (the rest for the allocator's fragmentation and library workspaces); on the CPU what is
    held now plus half of what the system says is available."""
    if device.type == "cuda":
        return int(0.85 * torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return _rss_field("VmRSS") + available // 2


def _out_of_memory(runners: dict, batch: int) -> str | None:
    """One step of every side at `batch`; the first out-of-memory message, or None. Returning (not raising)
    drops the exception's frames, and with them the step's tensors, before the caller retries."""
    try:
        for run in runners.values():
            run(batch)
    except torch.OutOfMemoryError as err:
        return str(err).splitlines()[0]
    return None


def largest_batch(runners: dict, device, small: int, cap: int) -> dict:
    """The largest multiple of `small`, at most `cap`, at which one step of every runner (batch -> None)
    fits; see the module docstring."""
    budget = memory_budget(device)
    sides = {}
    for name, run in runners.items():
        run(small)  # first-step allocations (optimizer state, library workspaces) out of the way
        low = peak_bytes(device, lambda run=run: run(small))
        high = peak_bytes(device, lambda run=run: run(2 * small))
        per_sample = max(high - low, 1) / small  # a flat line (the CPU's RSS can be) predicts the cap
        fixed = low - per_sample * small
        sides[name] = {"peak_mib_at_probe": [round(low / 2**20, 1), round(high / 2**20, 1)],
                       "mib_per_sample": round(per_sample / 2**20, 3),
                       "predicted_max": int((budget - fixed) // per_sample)}
    batch = min(cap, *(side["predicted_max"] for side in sides.values())) // small * small
    out_of_memory = []
    while batch >= small:
        why = _out_of_memory(runners, batch)
        if why is None:
            break
        out_of_memory.append({"batch": batch, "error": why})
        _free(device)
        batch = int(0.8 * batch) // small * small
    if batch < small:
        raise RuntimeError(f"no batch from {small} up fits: {out_of_memory}")
    return {"batch_size": batch, "budget_mib": budget // 2**20, "probe_batch": small, "cap": cap,
            "sides": sides, "out_of_memory": out_of_memory}


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe_batch(args, device) -> dict:
    """largest_batch for our step (CLIP loss) and open_clip's, both eager. Their models are freed on return."""
    eager = SimpleNamespace(**{**vars(args), "compile": False})
    train_step, context = build_ours(eager, device, "clip")
    open_clip_run = build_open_clip(eager, device)
    runners = {
        "hqclip_fast": lambda b: train_step(random_batch(args, device, context, negatives=False, tags=False,
                                                         batch_size=b)),
        "open_clip_train": lambda b: open_clip_run(1, b),
    }
    return largest_batch(runners, device, args.probe_batch, args.max_batch)


class _Loader:
    """What train_one_epoch reads from a dataloader: iteration, num_batches, num_samples."""

    def __init__(self, batches: list, batch_size: int):
        self.batches, self.num_batches, self.num_samples = batches, len(batches), len(batches) * batch_size

    def __iter__(self):
        return iter(self.batches)


def _git_commit() -> str | None:
    """HEAD; without .git (a tree copied to a GPU machine), the commit gpu_campaign.py verified it against."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HQCLIP_COMMIT")


ROWS = (("hqclip-fast, CLIP loss", "clip"), ("open_clip_train", "clip"), ("hqclip-fast, HQ-CLIP loss", "hqclip"))


def measure_row(args, device, name: str, loss_kind: str, peak_tflops: float | None) -> dict:
    """One row: samples/s and MFU, or why it was skipped (out of memory at this batch)."""
    try:
        flops = count_step_flops(args, device, loss_kind) / args.batch_size  # per sample
        samples_per_s = time_open_clip(args, device) if name == "open_clip_train" else time_ours(args, device, loss_kind)
    except torch.OutOfMemoryError as err:
        return {"name": name, "skipped": f"out of memory at batch {args.batch_size}: {str(err).splitlines()[0]}"}
    finally:
        _free(device)
    mfu = flops * samples_per_s / (peak_tflops * 1e12) if peak_tflops else None
    return {"name": name, "samples_per_s": samples_per_s, "flops_per_sample": flops, "mfu": mfu}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", default="256", help="an integer, or 'auto': the largest that fits")
    parser.add_argument("--max-batch", type=int, default=4096, help="--batch-size auto: the cap")
    parser.add_argument("--probe-batch", type=int, default=64,
                        help="--batch-size auto: the small batch measured (and its double); the batch found "
                             "is a multiple of it")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--loss-impl", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: 989 = H100/H200 SXM bf16 dense on CUDA; none on CPU)")
    parser.add_argument("--out", default=None, help="result JSON (default: results/bench_train_<device>.json)")
    parser.add_argument("--note", default="", help="free text stored in the result (conditions of the run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)

    probe = None
    if args.batch_size == "auto":
        probe = probe_batch(args, device)
        _free(device)
        print(json.dumps({"probe": probe}), flush=True)
    args.batch_size = probe["batch_size"] if probe else int(args.batch_size)
    rows = []
    for name, loss_kind in ROWS:
        rows.append(measure_row(args, device, name, loss_kind, peak))
        print(json.dumps(rows[-1]), flush=True)
    rate = {row["name"]: row.get("samples_per_s") for row in rows}
    speedup = (rate["hqclip-fast, CLIP loss"] / rate["open_clip_train"]
               if rate["hqclip-fast, CLIP loss"] and rate["open_clip_train"] else None)
    print(f"speed-up over open_clip_train (same loss): {speedup:.2f}x" if speedup else "speed-up: not measured")

    result = {
        "benchmark": "bench_train",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "open_clip": _version("open_clip"),
        "git_commit": _git_commit(),
        "load_average_1min": os.getloadavg()[0],
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
        "batch_probe": probe,
        "peak_tflops": peak,
        "rows": rows,
        "speedup_vs_open_clip": speedup,
        "note": args.note,
        "targets": "ViT-B-16 224px bf16: >= 1.3x open_clip's samples/s and MFU >= 50% (GPU only)",
    }
    out = Path(args.out) if args.out else RESULTS / f"bench_train_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()

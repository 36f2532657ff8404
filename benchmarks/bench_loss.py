"""Loss benchmark: fwd+bwd time and peak extra memory of the CLIP loss implementations for growing batch.

    python benchmarks/bench_loss.py                                  # CPU, B = 1024..8192, D = 512
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16   # GPU session

Every (impl, B) case runs in a fresh subprocess, so one case's allocations cannot hide another's peak.
Time: median wall-clock of --repeats fwd+bwd steps after --warmup steps (CUDA: synchronized); on CPU the
median process CPU time is recorded too (the CPU may be shared).
Peak extra memory: what one fwd+bwd step needs beyond the inputs already allocated.
  cuda: torch.cuda.max_memory_allocated() - memory_allocated() before the step (PyTorch's allocator).
  cpu:  peak resident set size of the process during the step minus its resident size before it: the
        kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, freed heap is returned
        with malloc_trim first. This counts everything the step touches, not just tensors.
Results: JSON (device, versions, git commit, date, load, cases) and a Markdown table under --out.

To add an implementation, add a builder to IMPLS: name -> builder(device, dtype) returning a function
loss(image_features, text_features, logit_scale) -> scalar tensor. A builder raises Unavailable to skip.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


class Unavailable(Exception):
    """The implementation cannot run here (missing package or device); the case is recorded as skipped."""


def _hqclip(impl: str):
    def build(device, dtype):
        from hqclip_fast.loss import hqclip_loss

        return lambda image, text, scale: hqclip_loss(image, text, scale, impl=impl).total
    return build


def _open_clip(device, dtype):
    try:
        from open_clip.loss import ClipLoss
    except ImportError as err:
        raise Unavailable(f"open_clip_torch is not installed: {err}") from err
    return ClipLoss()


IMPLS = {
    "chunked": _hqclip("chunked"),
    "reference": _hqclip("reference"),
    "open_clip": _open_clip,
}


# ---------------------------------------------------------------------------------------------- memory
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Context manager: .extra_bytes = peak memory during the block minus memory before it."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            _release_freed_heap()
            self.before = _rss_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS high-water mark to the current RSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_bytes("VmHWM")
        self.extra_bytes = peak - self.before
        return False


# ------------------------------------------------------------------------------------------ one case
def _make_inputs(batch: int, dim: int, device, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(batch, dim, generator=gen), dim=1)
    image = image.to(device=device, dtype=dtype).requires_grad_()
    text = text.to(device=device, dtype=dtype).requires_grad_()
    scale = torch.tensor(50.0, device=device, requires_grad=True)
    return image, text, scale


def run_case(impl: str, batch: int, dim: int, device: str, dtype: str, warmup: int, repeats: int) -> dict:
    device, dtype = torch.device(device), getattr(torch, dtype)
    case = {"impl": impl, "batch_size": batch, "dim": dim}
    try:
        loss_fn = IMPLS[impl](device, dtype)
    except Unavailable as err:
        return {**case, "skipped": str(err)}
    image, text, scale = _make_inputs(batch, dim, device, dtype)
    inputs = (image, text, scale)

    def step():
        for x in inputs:
            x.grad = None
        loss = loss_fn(image, text, scale)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    for _ in range(warmup):
        step()
    for x in inputs:
        x.grad = None
    with PeakMemory(device) as memory:
        loss = step()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {
        **case,
        "loss": float(loss),
        "time_ms_median": 1e3 * statistics.median(wall),
        "time_ms_all": [round(1e3 * t, 2) for t in wall],
        "cpu_time_ms_median": 1e3 * statistics.median(cpu) if device.type == "cpu" else None,
        "peak_extra_mib": memory.extra_bytes / 2**20,
    }


# ---------------------------------------------------------------------------------------------- driver
def _git_commit() -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hqclip_fast", "kernels", "benchmarks"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "open_clip"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def markdown_table(result: dict) -> str:
    lines = [f"# Loss fwd+bwd, {result['device']} ({result['device_name']}), D={result['dim']}, "
             f"{result['dtype']}, {result['threads']} threads",
             "",
             f"torch {result['versions']['torch']}, commit {result['git_commit']}, {result['date']}, "
             f"load average at start {result['load_average']}.",
             f"Memory: {result['memory_method']}",
             "",
             "| impl | B | time ms (median wall) | CPU time ms | peak extra MiB | loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for c in result["cases"]:
        if "skipped" in c:
            lines.append(f"| {c['impl']} | {c['batch_size']} | skipped: {c['skipped']} | | | |")
            continue
        cpu = f"{c['cpu_time_ms_median']:.0f}" if c.get("cpu_time_ms_median") is not None else "-"
        lines.append(f"| {c['impl']} | {c['batch_size']} | {c['time_ms_median']:.1f} | {cpu} | "
                     f"{c['peak_extra_mib']:.1f} | {c['loss']:.5f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--impls", default="chunked,reference,open_clip",
                        help=f"comma-separated, from {sorted(IMPLS)}")
    parser.add_argument("--batch-sizes", default="1024,2048,4096,8192")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/loss-DEVICE-DATE.json)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.case:
        impl, batch = args.case.split(":")
        print(json.dumps(run_case(impl, int(batch), args.dim, args.device, args.dtype, args.warmup,
                                  args.repeats)))
        return

    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"--impls: unknown {unknown}; known {sorted(IMPLS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    now = datetime.datetime.now(datetime.timezone.utc)
    commit, dirty = _git_commit()
    result = {
        "benchmark": "loss fwd+bwd (CLIP part: image/text features + logit_scale)",
        "device": args.device, "device_name": _device_name(args.device), "dim": args.dim, "dtype": args.dtype,
        "threads": args.threads or torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
        "versions": _versions(), "git_commit": commit, "git_dirty": dirty,
        "date": now.isoformat(timespec="seconds"), "load_average": [round(x, 2) for x in os.getloadavg()],
        "memory_method": (
            "torch.cuda.max_memory_allocated() minus memory_allocated() before the step, fresh process"
            if args.device == "cuda" else
            "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the step, fresh process"),
        "cases": [],
    }
    base_cmd = [sys.executable, __file__, "--device", args.device, "--dim", str(args.dim), "--dtype", args.dtype,
                "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.threads:
        base_cmd += ["--threads", str(args.threads)]
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for impl in impls:
            proc = subprocess.run(base_cmd + ["--case", f"{impl}:{batch}"], capture_output=True, text=True)
            if proc.returncode != 0:
                case = {"impl": impl, "batch_size": batch, "dim": args.dim,
                        "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
            else:
                case = json.loads(proc.stdout.strip().splitlines()[-1])
            result["cases"].append(case)
            print(json.dumps(case), flush=True)

    out = Path(args.out) if args.out else (
        REPO / "benchmarks" / "results" / f"loss-{args.device}-{now.strftime('%Y%m%d-%H%M')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

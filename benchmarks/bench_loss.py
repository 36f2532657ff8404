"""Loss benchmark: fwd+bwd time and peak extra memory of the CLIP loss implementations for growing batch.

    python benchmarks/bench_loss.py                                  # CPU, B = 1024..8192, D = 512
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16   # GPU session

The GPU campaign (benchmarks/gpu_campaign.py) runs it at D = 768, B = 32768, 8192, 65536 with --in-process.
Peers: open_clip ClipLoss (local_loss=True, gather_with_grad=True: one process here), Inf-CL (`pip install
inf-cl==1.2.1`, both directions, GPU only) and the GEMM floors: the cuBLAS time of the matrix products that a
loss which never stores the logits must do at the same shapes. gemm_floor: four products, 8 B N D FLOPs with
N = B columns (2B with negatives): logits, their recomputation in backward, dI = G @ K, dK = G.T @ I, with
K = [T; N]. gemm_floor3: the same without the recomputation (the logits are kept), 6 B N D FLOPs. open_clip
and Inf-CL have no negative columns and are skipped with --negatives.

By default every (impl, B) case runs in a fresh subprocess, so one case's allocations cannot hide another's
peak; --in-process runs them one after another in this process (no process starts; on CUDA the peak is
counted per step from PyTorch's allocator, so earlier cases do not change it; a case that fails, out of
memory say, is recorded as skipped and the next one runs).
Time: median wall-clock of --repeats fwd+bwd steps after --warmup steps (CUDA: synchronized); on CPU the
median process CPU time is recorded too (the CPU may be shared).
Peak extra memory: what one fwd+bwd step (after warm-up) needs beyond the inputs already allocated.
  cuda: torch.cuda.max_memory_allocated() - memory_allocated() before the step (PyTorch's allocator).
  cpu:  peak resident set size of the process during the step minus its resident size before it: the
        kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, freed heap is returned
        with malloc_trim first. This counts everything the step touches, not just tensors.
        Without --in-process, `peak_extra_mib` is measured in a separate process with glibc's mmap threshold
        fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so every large buffer goes back to the OS when freed and
        the number is the memory the algorithm holds at once; `peak_extra_mib_default_malloc` is the same
        measurement in the timing process with glibc's defaults (it adds the allocator's retained free memory).
Error (--check): each impl's loss and gradients against impl="chunked" in float64 on the first --check-rows
samples of the case's inputs (a subsample, so that the check stays cheap at every B).
Results: JSON (device, versions, git commit, date, load, cases) and a Markdown table under --out.

To add an implementation, add a builder to IMPLS: name -> builder(device, dtype, negatives) returning a
function loss(image_features, text_features, logit_scale, neg_text_features or None) -> scalar tensor.
A builder raises Unavailable to skip.
"""

from __future__ import annotations

import argparse
import contextlib
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
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GPU_BATCH_SIZES = "4096,16384,32768,65536"  # --batch-sizes gpu


class Unavailable(Exception):
    """The implementation cannot run here (missing package or device); the case is recorded as skipped."""


def _hqclip(impl: str):
    def build(device, dtype, negatives):
        from hqclip_fast.loss import hqclip_loss
        from hqclip_fast.loss.api import get_impl

        try:
            get_impl(impl, device)
        except ValueError as err:
            raise Unavailable(str(err)) from err

        def loss(image, text, scale, neg):
            return hqclip_loss(image, text, scale, neg_text_features=neg, hni_weight=1.0 if negatives else 0.0,
                               impl=impl).total
        return loss
    return build


def _open_clip(device, dtype, negatives):
    if negatives:
        raise Unavailable("open_clip ClipLoss has no hard-negative columns")
    try:
        from open_clip.loss import ClipLoss
    except ImportError as err:
        raise Unavailable(f"open_clip_torch is not installed: {err}") from err
    clip_loss = ClipLoss(local_loss=True, gather_with_grad=True)
    return lambda image, text, scale, neg: clip_loss(image, text, scale)


def _inf_cl(device, dtype, negatives):
    if negatives:
        raise Unavailable("Inf-CL has no hard-negative columns")
    if device.type != "cuda":
        raise Unavailable("Inf-CL's kernels need a CUDA device")
    try:
        from inf_cl import cal_flash_loss
    except ImportError as err:
        raise Unavailable(f"the inf-cl package is not installed (pip install inf-cl==1.2.1): {err}") from err
    # cal_flash_loss is what Inf-CL's cal_inf_loss runs on one process. cal_inf_loss itself would need a process
    # group (its scale gradient is all-reduced), and with one it takes the ring path, sending to itself.
    # Inf-CL computes in fp32 whatever the input dtype (it calls .float() on q and k).
    return lambda image, text, scale, neg: (cal_flash_loss(image, text, scale=scale).mean()
                                            + cal_flash_loss(text, image, scale=scale).mean()) / 2


class _GemmFloor(torch.autograd.Function):
    """Only the matrix products of a loss that never stores its logits: S = I @ K.T forward; backward
    recomputes S and does dI = S @ K, dK = S.T @ I (S standing in for the logit gradient)."""

    @staticmethod
    def forward(ctx, image, keys):
        ctx.save_for_backward(image, keys)
        logits = image @ keys.T
        return logits[0, 0].clone().float()  # a copy: the B x N logits are freed here

    @staticmethod
    def backward(ctx, grad):
        image, keys = ctx.saved_tensors
        logits = image @ keys.T
        return logits @ keys, logits.T @ image


class _GemmFloor3(torch.autograd.Function):
    """The three products of a loss that keeps its logits: S = I @ K.T saved for backward, then dI, dK."""

    @staticmethod
    def forward(ctx, image, keys):
        logits = image @ keys.T
        ctx.save_for_backward(image, keys, logits)
        return logits[0, 0].clone().float()

    @staticmethod
    def backward(ctx, grad):
        image, keys, logits = ctx.saved_tensors
        return logits @ keys, logits.T @ image


def _gemm_floor(products: type[torch.autograd.Function]):
    def build(device, dtype, negatives):
        def loss(image, text, scale, neg):
            keys = torch.cat([text, neg]) if neg is not None else text
            return products.apply(image, keys) * scale
        return loss
    return build


@contextlib.contextmanager
def _launch(impl: str):
    """triton_2pass is impl="triton" with the two-pass backward and 32 MiB panels (no fp32 gradient buffer;
    see hqclip_kernels.contrastive): set for the case (its backward reads them too), then restored."""
    if impl != "triton_2pass":
        yield
        return
    from hqclip_kernels import _common

    saved = _common.GPU_TWO_PASS, _common.GPU_PANEL_BYTES
    _common.GPU_TWO_PASS, _common.GPU_PANEL_BYTES = True, 32 << 20
    try:
        yield
    finally:
        _common.GPU_TWO_PASS, _common.GPU_PANEL_BYTES = saved


IMPLS = {
    "triton": _hqclip("triton"),
    "triton_2pass": _hqclip("triton"),  # with _launch("triton_2pass")
    "chunked": _hqclip("chunked"),
    "reference": _hqclip("reference"),
    "open_clip": _open_clip,
    "inf_cl": _inf_cl,
    "gemm_floor": _gemm_floor(_GemmFloor),
    "gemm_floor3": _gemm_floor(_GemmFloor3),
}
FLOORS = ("gemm_floor", "gemm_floor3")  # matrix products only, not a loss: no error to check


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
def _make_inputs(batch: int, dim: int, device, dtype, negatives: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(batch, dim, generator=gen), dim=1)
    image = image.to(device=device, dtype=dtype).requires_grad_()
    text = text.to(device=device, dtype=dtype).requires_grad_()
    scale = torch.tensor(50.0, device=device, requires_grad=True)
    neg = None
    if negatives:
        neg = torch.nn.functional.normalize(text.detach().float() + 0.3 * torch.randn(batch, dim, generator=gen)
                                            .to(device), dim=1).to(dtype).requires_grad_()
    return image, text, scale, neg


def relative_errors(loss_fn, inputs: tuple, negatives: bool, rows: int) -> dict:
    """Error of one fwd+bwd on the first `rows` samples against impl="chunked" in float64 on the same (already
    rounded) inputs: for the loss and each gradient, max |got - want| / max |want|."""
    from hqclip_fast.loss import hqclip_loss

    image, text, scale, neg = (None if x is None else (x if x.dim() == 0 else x[:rows]).detach().clone()
                               .requires_grad_() for x in inputs)
    got = loss_fn(image, text, scale, neg)
    got.backward()
    want_leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (image, text, scale, neg)]
    want = hqclip_loss(*want_leaves[:3], neg_text_features=want_leaves[3], hni_weight=1.0 if negatives else 0.0,
                       impl="chunked").total
    want.backward()
    errors = {"loss": abs(got.item() - want.item()) / abs(want.item())}
    for name, leaf, ref in zip(("image", "text", "scale", "neg"), (image, text, scale, neg), want_leaves):
        if leaf is not None:
            errors[f"grad_{name}"] = float((leaf.grad.double() - ref.grad).abs().max() / ref.grad.abs().max())
    return errors


def build_step(impl: str, batch: int, dim: int, device: torch.device, dtype: torch.dtype, negatives: bool = False):
    """(loss_fn, inputs, step) of one case: step() is one fwd+bwd, synchronized on CUDA, the unit every timing
    of this file and of benchmarks/test_bench_loss.py measures (run it inside `_launch(impl)`). Raises
    Unavailable when the implementation cannot run here."""
    loss_fn = IMPLS[impl](device, dtype, negatives)
    image, text, scale, neg = inputs = _make_inputs(batch, dim, device, dtype, negatives)
    leaves = tuple(x for x in inputs if x is not None)

    def step():
        for x in leaves:
            x.grad = None
        loss = loss_fn(image, text, scale, neg)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return loss_fn, inputs, step


def run_case(impl: str, batch: int, dim: int, device: str, dtype: str, warmup: int, repeats: int,
             negatives: bool = False, check_rows: int = 0) -> dict:
    device, dtype = torch.device(device), getattr(torch, dtype)
    case = {"impl": impl, "batch_size": batch, "dim": dim, "negatives": negatives}
    try:
        loss_fn, (image, text, scale, neg), step = build_step(impl, batch, dim, device, dtype, negatives)
    except Unavailable as err:
        return {**case, "skipped": str(err)}
    inputs = tuple(x for x in (image, text, scale, neg) if x is not None)

    with _launch(impl):
        for _ in range(warmup):
            step()
        for x in inputs:
            x.grad = None
        with PeakMemory(device) as memory:
            loss = step()
        wall, cpu = ([], []) if repeats else ([float("nan")], [float("nan")])
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        if impl.startswith("triton"):  # the backward's layout, so that the memory model can be matched to it
            from hqclip_kernels._common import launch_config

            layout = launch_config(device, dtype)
            case["launch"] = {"two_pass": layout.two_pass, "panel_mib": layout.panel_bytes / 2**20}
        errors = {}
        if check_rows and impl not in FLOORS:
            errors = relative_errors(loss_fn, (image, text, scale, neg), negatives, check_rows)
            errors = {"rel_err_vs_fp64": errors, "max_rel_err": max(errors.values()),
                      "check_rows": min(check_rows, batch)}
    return {
        **case,
        **errors,
        "loss": loss.item(),
        "time_ms_median": 1e3 * statistics.median(wall),
        "time_ms_all": [round(1e3 * t, 2) for t in wall],
        "cpu_time_ms_median": 1e3 * statistics.median(cpu) if device.type == "cpu" else None,
        "peak_extra_mib": memory.extra_bytes / 2**20,
    }


def run_case_here(impl: str, batch: int, args) -> dict:
    """run_case in this process (--in-process): a failure, out of memory say, is recorded as the case's skip
    reason and the next case still runs; what the case allocated is released before the next one."""
    try:
        return run_case(impl, batch, args.dim, args.device, args.dtype, args.warmup, args.repeats,
                        args.negatives, args.check_rows if args.check else 0)
    except Exception as err:  # noqa: BLE001 - one failed case must not lose the cases after it
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        return {"impl": impl, "batch_size": batch, "dim": args.dim, "negatives": args.negatives,
                "skipped": f"failed: {last[-500:]}"}
    finally:
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- driver
def _run_subprocess(cmd: list[str], args, env=None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        impl, batch = cmd[cmd.index("--case") + 1].split(":")
        return {"impl": impl, "batch_size": int(batch), "dim": args.dim, "negatives": args.negatives,
                "skipped": f"failed: {proc.stderr.strip()[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _git_commit() -> tuple[str | None, bool | None]:
    """HEAD and whether the code is modified; without .git (a tree copied to a GPU machine), the commit that
    gpu_campaign.py verified the tree against (HQCLIP_COMMIT), dirty unknown."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hqclip_fast", "kernels", "benchmarks"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("HQCLIP_COMMIT"), None


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
    negatives = ", with hard negatives" if result.get("negatives") else ""
    lines = [f"# Loss fwd+bwd, {result['device']} ({result['device_name']}), D={result['dim']}, "
             f"{result['dtype']}, {result['threads']} threads{negatives}",
             "",
             f"torch {result['versions']['torch']}, commit {result['git_commit']}, {result['date']}, "
             f"load average at start {result['load_average']}.",
             f"Memory: {result['memory_method']}",
             "",
             "| impl | B | time ms (median wall) | x GEMM floor | CPU time ms | peak extra MiB "
             "| (default malloc) | loss | max rel err vs fp64 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    floor = {c["batch_size"]: c["time_ms_median"] for c in result["cases"]
             if c["impl"] == "gemm_floor" and "skipped" not in c}
    for c in result["cases"]:
        if "skipped" in c:
            lines.append(f"| {c['impl']} | {c['batch_size']} | skipped: {c['skipped']} | | | | | | |")
            continue
        cpu = f"{c['cpu_time_ms_median']:.0f}" if c.get("cpu_time_ms_median") is not None else "-"
        vs_floor = f"{c['time_ms_median'] / floor[c['batch_size']]:.2f}" if c["batch_size"] in floor else "-"
        loss = "-" if c["impl"] in FLOORS else f"{c['loss']:.5f}"
        default_malloc = c.get("peak_extra_mib_default_malloc")
        default_malloc = f"{default_malloc:.1f}" if default_malloc is not None else "-"
        error = f"{c['max_rel_err']:.1e}" if "max_rel_err" in c else "-"
        lines.append(f"| {c['impl']} | {c['batch_size']} | {c['time_ms_median']:.1f} | {vs_floor} | {cpu} | "
                     f"{c['peak_extra_mib']:.1f} | {default_malloc} | {loss} | {error} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--impls", default="chunked,reference,open_clip",
                        help=f"comma-separated, from {sorted(IMPLS)}")
    parser.add_argument("--batch-sizes", default="1024,2048,4096,8192",
                        help=f"comma-separated, or 'gpu' for the kernels issue's sizes {GPU_BATCH_SIZES}")
    parser.add_argument("--negatives", action="store_true",
                        help="hard negatives as extra image->text columns plus the pairwise HNI term")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true",
                        help="also record each impl's relative error (loss and gradients) against impl=chunked "
                             "in float64 on the same inputs (after timing; not counted in time or memory)")
    parser.add_argument("--check-rows", type=int, default=8192,
                        help="--check runs on the first CHECK_ROWS samples of each case's inputs")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (no process starts; see the memory notes above)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/loss-DEVICE-DATE.json)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.case:
        impl, batch = args.case.split(":")
        print(json.dumps(run_case(impl, int(batch), args.dim, args.device, args.dtype, args.warmup,
                                  args.repeats, args.negatives, args.check_rows if args.check else 0)))
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
        "negatives": args.negatives,
        "threads": args.threads or torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
        "versions": _versions(), "git_commit": commit, "git_dirty": dirty,
        "date": now.isoformat(timespec="seconds"), "load_average": [round(x, 2) for x in os.getloadavg()],
        "in_process": args.in_process,
        "memory_method": (
            "torch.cuda.max_memory_allocated() minus memory_allocated() before the step"
            + (", all cases in one process" if args.in_process else ", fresh process")
            if args.device == "cuda" else
            "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the step, all cases in one "
            "process with glibc's default malloc" if args.in_process else
            "peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the step, fresh process "
            "with MALLOC_MMAP_THRESHOLD_=131072; '(default malloc)': the same in the timing process with "
            "glibc's default (adaptive) thresholds"),
        "cases": [],
    }
    base_cmd = [sys.executable, __file__, "--device", args.device, "--dim", str(args.dim), "--dtype", args.dtype,
                "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.threads:
        base_cmd += ["--threads", str(args.threads)]
    if args.negatives:
        base_cmd += ["--negatives"]
    if args.check:
        base_cmd += ["--check", "--check-rows", str(args.check_rows)]
    batch_sizes = GPU_BATCH_SIZES if args.batch_sizes == "gpu" else args.batch_sizes
    for batch in [int(b) for b in batch_sizes.split(",")]:
        for impl in impls:
            if args.in_process:
                result["cases"].append(run_case_here(impl, batch, args))
                print(json.dumps(result["cases"][-1]), flush=True)
                continue
            case = _run_subprocess(base_cmd + ["--case", f"{impl}:{batch}"], args)
            if args.device == "cpu" and "skipped" not in case:
                memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
                memory_cmd = [a for a in base_cmd if a != "--check"] + ["--case", f"{impl}:{batch}", "--repeats", "0"]
                memory_case = _run_subprocess(memory_cmd, args, env=memory_env)
                case["peak_extra_mib_default_malloc"] = case["peak_extra_mib"]
                case["peak_extra_mib"] = memory_case.get("peak_extra_mib", float("nan"))
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

"""Peak extra memory of one loss fwd+bwd at GPU shapes, from the code's own allocations, without a GPU.

    python benchmarks/memory_model.py                      # B = 4096..65536, D = 512/768/1024, bf16
    python benchmarks/memory_model.py --panel-mib 32,64,128,256   # the fused backward's panel budget

Every implementation of bench_loss.py runs on PyTorch's `meta` device (shapes and dtypes, no data), under a
dispatch mode that adds up the bytes of every storage an op creates and subtracts them when the storage is
freed. The peak of that sum minus what was live before the step is what torch.cuda.max_memory_allocated()
would report beyond the inputs, up to the CUDA caching allocator's rounding (512-byte blocks) and cuBLAS's
workspace. The fused kernels cannot run on `meta`: their launches are skipped (their outputs are allocated
in Python, so they count) and the launch layout is set to an H100's (132 SMs, 128 x 128 tiles). Inf-CL's
kernels have no meta form and are left out.

This is a model of the allocations, not a measurement on a GPU: `bench_loss.py --device cuda` measures the
same quantity with the real allocator, and the two should agree to within a few MiB.
Results: JSON and a Markdown table under --out (default benchmarks/results/memory_model.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import weakref
from pathlib import Path

# The fused path accepts non-CUDA tensors only under the interpreter flag; no kernel runs here either way.
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import GPU_BATCH_SIZES, IMPLS, Unavailable  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
H100_SMS = 132


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create while the mode is active, live now and at their peak. Storages
    that existed before (the inputs, views of them) are registered with `known` and never counted.
    `inside`: custom ops whose Python implementation is run under the mode (on `meta` a custom op would run
    its shape-only fake instead, and the buffers it allocates inside would not be seen)."""

    def __init__(self, known=(), inside=None):
        super().__init__()
        self.inside = inside or {}
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}
        for tensor in known:
            self._track(tensor, count=False)

    def _release(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def _track(self, tensor: torch.Tensor, count: bool = True) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes() if count else 0
        self.live += self.sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.inside:
            with self:
                return self.inside[func](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def simulate_h100_kernels(panel_bytes: int, two_pass: bool) -> dict:
    """Skip the fused kernels' launches and lay them out as on an H100 (bf16 tiles, 4 programs per SM), with
    the given backward panel budget and passes.
    Returns the custom ops (OpOverload -> Python implementation) for LiveBytes(inside=...)."""
    from hqclip_kernels import _common, contrastive, tag_bce
    from torch._library.custom_ops import CustomOpDef

    def h100(device, dtype):
        block_k = 64 if dtype in (torch.bfloat16, torch.float16) else 32
        return _common.Launch(_common.Tiles(128, 128, block_k, 8, 3), 4 * H100_SMS, panel_bytes, two_pass)

    ops = {}
    for module in (contrastive, tag_bce):
        module.launch_config = h100
        for name, value in vars(module).items():
            if name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())
            elif isinstance(value, CustomOpDef):
                ops[value._opoverload] = value._init_fn
    return ops


def peak_extra_bytes(impl: str, batch: int, dim: int, dtype: torch.dtype, negatives: bool,
                     custom_ops: dict) -> int | str:
    """Peak bytes beyond the inputs of one fwd+bwd (gradients of the inputs included), or why it is skipped."""
    device = torch.device("meta")
    try:
        loss_fn = IMPLS[impl](device, dtype, negatives)
    except Unavailable as err:
        return f"skipped: {err}"
    leaves = [torch.empty(batch, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
    neg = torch.empty(batch, dim, device=device, dtype=dtype, requires_grad=True) if negatives else None
    scale = torch.empty((), device=device, requires_grad=True)
    inputs = [x for x in (*leaves, scale, neg) if x is not None]
    try:
        with LiveBytes(known=inputs, inside=custom_ops) as memory:
            loss = loss_fn(leaves[0], leaves[1], scale, neg)
            loss.backward()
            del loss
    except RuntimeError as err:  # e.g. a branch on tensor values (.item(), .any()): no meta form
        return f"skipped: cannot run on the meta device: {str(err).splitlines()[0]}"
    return memory.peak


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default=GPU_BATCH_SIZES)
    parser.add_argument("--dims", default="512,768,1024")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impls", default="triton,chunked,reference,open_clip,gemm_floor")
    parser.add_argument("--panel-mib", default="32,64,128", help="fused backward panel budgets to model (MiB)")
    parser.add_argument("--passes", default="1,2", help="fused backward passes to model (1, 2 or both)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory_model")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    variants = [(passes, int(mib)) for passes in args.passes.split(",") for mib in args.panel_mib.split(",")]

    cases = []
    for passes, panel in variants:
        custom_ops = simulate_h100_kernels(panel << 20, two_pass=passes == "2")
        for dim in dims:
            for negatives in (False, True):
                for batch in batches:
                    for impl in args.impls.split(","):
                        if impl != "triton" and (passes, panel) != variants[0]:
                            continue  # the variants only change the fused backward
                        peak = peak_extra_bytes(impl, batch, dim, dtype, negatives, custom_ops)
                        case = {"impl": impl, "batch_size": batch, "dim": dim, "negatives": negatives}
                        if impl == "triton":
                            case.update(backward_passes=int(passes), panel_mib=panel)
                        case.update({"skipped": peak} if isinstance(peak, str) else
                                    {"peak_extra_mib": peak / 2**20})
                        cases.append(case)
                        print(json.dumps(case), flush=True)
    result = {
        "what": "peak extra memory of one loss fwd+bwd, modelled from allocations on the meta device "
                "(not a GPU measurement)",
        "method": __doc__.split("\n\n")[2].replace("\n", " "),
        "dtype": args.dtype, "torch": torch.__version__, "python": platform.python_version(),
        "git_commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "simulated_device": f"H100 ({H100_SMS} SMs), 128 x 128 tiles", "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out.with_suffix('.json')} and .md")
    return result


def markdown(result: dict) -> str:
    """One table per (D, negatives): rows B, a column per impl (and per panel budget), and triton's share of
    open_clip's peak."""
    cases = [c for c in result["cases"] if "skipped" not in c]
    lines = [f"# Loss peak extra memory, modelled ({result['dtype']}; {result['simulated_device']})", "",
             f"{result['what']}. Method: {result['method']}", "",
             f"Commit `{result['git_commit'][:10]}`, torch {result['torch']}, {result['date'][:10]}.", ""]

    def column(c):
        if c["impl"] != "triton":
            return c["impl"]
        return f"triton {c['backward_passes']} pass{'es' if c['backward_passes'] > 1 else ''}, {c['panel_mib']} MiB"

    for dim in sorted({c["dim"] for c in cases}):
        for negatives in (False, True):
            group = [c for c in cases if c["dim"] == dim and c["negatives"] == negatives]
            if not group:
                continue
            names = list(dict.fromkeys(column(c) for c in sorted(group, key=lambda c: c["impl"] == "triton")))
            lines += [f"## D = {dim}, {'with' if negatives else 'without'} negative columns (MiB)", "",
                      "| B | " + " | ".join(names) + (" | triton / open_clip (column order) |" if not negatives else " |"),
                      "|---" * (len(names) + 1 + (not negatives)) + "|"]
            for batch in sorted({c["batch_size"] for c in group}):
                row = {column(c): c["peak_extra_mib"] for c in group if c["batch_size"] == batch}
                cells = [f"{row[n]:.0f}" if n in row else "-" for n in names]
                if not negatives:
                    oc = row.get("open_clip")
                    fused = [v for n, v in row.items() if n.startswith("triton")]
                    cells.append(" / ".join(f"{100 * v / oc:.1f}%" for v in fused) if oc and fused else "-")
                lines.append(f"| {batch} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

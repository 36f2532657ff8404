"""The GPU campaign in one device call of at most 7 minutes, the headline numbers first.

Run it through benchmarks/gpu_campaign.sh, which installs the carried wheels and puts the project on the path:

    bash benchmarks/gpu_campaign.sh                                  # call 1: the one to make (400 s budget)
    bash benchmarks/gpu_campaign.sh --call extra --budget-s 240      # call 2: only if 5 minutes are left
    bash benchmarks/gpu_campaign.sh --device cpu                     # call 1 on the CPU at tiny sizes

Call `main`, in order of value; each step has a hard cap (seconds, killed there) and runs only if the budget
still holds what it needs:
    tests          60  the kernel and loss tests against the fp64 reference, on CUDA (MAIN_TESTS)
    loss          150  bench_loss.py, fwd+bwd, bf16, D=768, B = 32768, 8192, 65536: triton, gemm_floor,
                       open_clip, inf_cl, triton_2pass, gemm_floor3; error against fp64 on 8192 samples; peak
                       extra memory
    memory         30  memory_model.py: the modelled peak of the same cases (no GPU used)
    train         130  bench_train.py: ViT-B-16, 224 px, bf16, the largest batch that fits, hqclip-fast against
                       open_clip_train in one process, eager
    train_compile rest the same with torch.compile, only if 120 s are left
Call `extra` (CUDA only): compiled training, the loss profile (torch.profiler, ncu), towers SDPA vs xformers,
the loss with hard negatives, the loader, the loss at D = 512 and 1024.
With --device cpu the same steps run at tiny sizes (Triton's interpreter); steps that need CUDA are listed
as not run. tests/test_gpu_campaign.py runs that in `make test`, so this call cannot rot.

Each step is a subprocess in its own process group, killed at its cap. A step that fails or is cut off is
recorded (status, log tail) and the next one runs; bench_loss.py and bench_train.py print each case as a
JSON line, and a cut-off run's result file is rebuilt from those lines (marked incomplete). After every step
the work folder (env.json, campaign.json, one folder per step) is packed into OUT/campaign-<call>.tar.gz,
the log copied to OUT/campaign.log and collect_gpu_results.py writes OUT/partial.json and partial.md, so a call
stopped anywhere still returns what it measured (the device tool returns at most 8 files).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
import collect_gpu_results  # noqa: E402  (stdlib only: cheap to run after every step)

TARBALL_LIMIT = 15 * 2**20  # the device tool returns files up to 16 MiB
RESERVE_S = 10  # kept back from the budget for the last packing
MIN_STEP_S = 20  # a step with less time than this left is not started

# The kernel and loss tests that need CUDA to say something, most valuable first (pytest keeps this order):
# every term at B = 4099 against the fp64 reference, then the small odd shapes of every option and dtype.
MAIN_TESTS = [
    "tests/test_kernels_loss.py::test_realistic_shape_on_gpu",
    "tests/test_kernels_loss.py::test_every_term_together_matches_reference",
    "tests/test_kernels_loss.py::test_contrastive_terms_match_reference",
    "tests/test_kernels_loss.py::test_pair_negatives_in_row_chunks_match_reference",
    "tests/test_kernels_loss.py::test_scale_100_with_poorly_aligned_rows",
    "tests/test_kernels_loss.py::test_triton_is_deterministic",
    "tests/test_kernels_ops.py::test_backward_panels_on_either_axis_match_materialized",
    "tests/test_kernels_ops.py::test_pairwise_negative_logits_from_the_sweep",
    "tests/test_kernels_ops.py::test_forward_sweep_across_groups_matches_materialized",
]
# The interpreter takes seconds per kernel test: the dry run keeps two (the first skips without CUDA).
DRY_RUN_TESTS = MAIN_TESTS[:1] + ["tests/test_kernels_loss.py::test_contrastive_terms_match_reference[7-16-none-fp32]"]
LOSS_IMPLS = "triton,gemm_floor,open_clip,inf_cl,triton_2pass,gemm_floor3"


@dataclass
class Step:
    """One subprocess of the campaign; cmd None: not run on this device (`why`)."""

    name: str
    cmd: list[str] | None
    cap_s: float | None  # None: whatever the budget has left
    outputs: list[str] = field(default_factory=list)  # result files it writes, relative to the work folder
    min_left_s: float = MIN_STEP_S
    why: str = ""


def _python() -> str:
    return sys.executable


def _cuda_only(name: str, what: str) -> Step:
    return Step(name, None, 0, why=f"needs CUDA ({what})")


# ------------------------------------------------------------------------------------------------ plans
def loss_step(args, name: str, *, dim: int, batches: str, impls: str, negatives: bool = False,
              cap_s: float = 150) -> Step:
    out = f"{name}/loss-D{dim}{'-neg' if negatives else ''}.json"
    cmd = [_python(), str(BENCH / "bench_loss.py"), "--device", args.device, "--in-process", "--dim", str(dim),
           "--impls", impls, "--check", "--out", str(args.work / out)]
    if args.device == "cuda":
        cmd += ["--dtype", "bfloat16", "--batch-sizes", batches, "--check-rows", "8192", "--warmup", "2",
                "--repeats", "10"]
    else:
        cmd += ["--dtype", "float32", "--batch-sizes", batches, "--check-rows", "16", "--warmup", "0",
                "--repeats", "1", "--threads", "1"]
    return Step(name, cmd + (["--negatives"] if negatives else []), cap_s, [out])


def train_step(args, name: str, *, compiled: bool, cap_s: float | None, min_left_s: float = MIN_STEP_S) -> Step:
    out = f"{name}/train-{'compile' if compiled else 'eager'}.json"
    cmd = [_python(), str(BENCH / "bench_train.py"), "--device", args.device, "--batch-size", "auto",
           "--out", str(args.work / out)]
    if args.device == "cuda":
        cmd += ["--model", "ViT-B-16", "--image-size", "224", "--precision", "bf16", "--max-batch", "4096",
                "--probe-batch", "64", "--steps", "15", "--warmup", "3"]
    else:
        cmd += ["--model", "hqclip-micro", "--image-size", "32", "--max-batch", "16", "--probe-batch", "4",
                "--steps", "2", "--warmup", "1", "--threads", "1"]
    return Step(name, cmd + (["--compile"] if compiled else []), cap_s, [out], min_left_s)


def main_plan(args) -> list[Step]:
    cuda = args.device == "cuda"
    tests = MAIN_TESTS if cuda else DRY_RUN_TESTS
    pytest = [_python(), "-m", "pytest", *tests, "-v", "-p", "no:cacheprovider"]
    dims, batches = ("768", "32768,8192,65536") if cuda else ("32", "24,8")
    memory = [_python(), str(BENCH / "memory_model.py"), "--batch-sizes", batches, "--dims", dims,
              "--dtype", "bfloat16" if cuda else "float32", "--impls", "triton,open_clip,gemm_floor,gemm_floor3",
              "--passes", "1,2", "--panel-mib", "32,128", "--out", str(args.work / "memory" / "memory_model")]
    return [
        Step("tests", pytest, 60),
        loss_step(args, "loss", dim=int(dims), batches=batches, impls=LOSS_IMPLS),
        Step("memory", memory, 30, ["memory/memory_model.json"]),
        train_step(args, "train", compiled=False, cap_s=130),
        # A compile of both sides can take minutes: only with time to spare, and cut off at the budget.
        train_step(args, "train_compile", compiled=True, cap_s=None, min_left_s=120) if cuda
        else _cuda_only("train_compile", "a CPU compile of both models takes minutes"),
    ]


XFORMERS_PROBE = """
import torch, xformers.ops as xops
from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask
q = torch.randn(2, 77, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
xops.memory_efficient_attention(q, q, q, attn_bias=xops.LowerTriangularMask()).sum().backward()
packed = q.detach()[:1, :60].requires_grad_()
mask = BlockDiagonalCausalMask.from_seqlens([25, 35])
xops.memory_efficient_attention(packed, packed, packed, attn_bias=mask).sum().backward()
print("xformers ran forward and backward on CUDA")
"""


def extra_plan(args) -> list[Step]:
    """What a second call measures when the first left time: compiled training first (the MFU target may
    need it), then what explains a missed loss target, then the rest."""
    steps = [train_step(args, "train_compile", compiled=True, cap_s=300, min_left_s=120)]
    shape = ["--batch", "32768", "--dim", "768", "--dtype", "bf16"]
    folder = args.work / "profile"
    steps.append(Step("profile", [_python(), str(BENCH / "profile_loss.py"), *shape, "--out", str(folder)], 90,
                      ["profile/loss_triton_B32768_D768_bf16.json"]))
    ncu = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
                                           + sorted(glob.glob("/usr/local/cuda*/bin/ncu"))), None)
    if ncu:
        # Only the step after warm-up (profile_loss.py brackets it with cudaProfilerStart/Stop), then the report
        # as CSV, readable anywhere.
        sections = [a for s in ("SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "Occupancy",
                                "LaunchStats") for a in ("--section", s)]
        report = folder / "loss_ncu"
        run = shlex.join([ncu, "--profile-from-start", "off", "--launch-count", "40", "-f", "-o", str(report),
                          *sections, _python(), str(BENCH / "profile_loss.py"), *shape, "--no-profiler",
                          "--warmup", "3", "--steps", "1"])
        export = f"{shlex.quote(ncu)} --import {report}.ncu-rep --csv --page details > {folder / 'ncu.csv'}"
        steps.append(Step("ncu", ["bash", "-c", f"{run} && {export}"], 180, ["profile/ncu.csv"]))
    else:
        steps.append(Step("ncu", None, 0, why="no ncu on this machine"))
    towers_out = args.work / "towers" / "towers-ViT-B-16-b256-bf16.json"
    towers = (f"{shlex.quote(_python())} -c {shlex.quote(XFORMERS_PROBE)} && backends=sdpa,xformers "
              f"|| backends=sdpa; exec {shlex.quote(_python())} {BENCH / 'bench_towers.py'} --device cuda "
              f"--model ViT-B-16 --batch 256 --dtype bf16 --backends $backends --out {towers_out}")
    steps.append(Step("towers", ["bash", "-c", towers], 180, ["towers/towers-ViT-B-16-b256-bf16.json"]))
    steps.append(loss_step(args, "loss_negatives", dim=768, batches="32768,65536", negatives=True,
                           impls="triton,triton_2pass,chunked,gemm_floor,gemm_floor3", cap_s=120))
    steps.append(Step("loader", [_python(), str(BENCH / "bench_loader.py"), "--device", "cuda", "--vit-step",
                                 "--num-samples", "4000", "--batch-size", "128", "--batches", "10", "--workers", "4",
                                 "8", "16", "--out", str(args.work / "loader" / "loader.json")],
                      120, ["loader/loader.json"]))
    for dim in (512, 1024):
        steps.append(loss_step(args, f"loss_D{dim}", dim=dim, batches="32768,8192,65536", impls=LOSS_IMPLS,
                               cap_s=120))
    return steps


PLANS = {"main": main_plan, "extra": extra_plan}


# ------------------------------------------------------------------------------------------------ running
def _tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def _json_lines(log: Path) -> list[dict]:
    """The JSON objects a benchmark printed one per line (a line cut off mid-write is dropped)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def salvage_bench_loss(log: Path, out: Path, step: Step, device: str) -> bool:
    """bench_loss.py was cut off before writing its file: rebuild it from the case lines it printed."""
    cases = [c for c in _json_lines(log) if "impl" in c]
    if not cases:
        return False
    cmd = step.cmd
    result = {"benchmark": "loss fwd+bwd (CLIP part: image/text features + logit_scale)", "incomplete": True,
              "note": "bench_loss.py was stopped at its time cap; cases rebuilt from its printed lines",
              "device": _arg(cmd, "--device"), "device_name": device, "dim": int(_arg(cmd, "--dim")),
              "dtype": _arg(cmd, "--dtype"), "negatives": "--negatives" in cmd,
              "git_commit": os.environ.get("HQCLIP_COMMIT"), "cases": cases}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return True


def salvage_bench_train(log: Path, out: Path, step: Step, device: str) -> bool:
    """bench_train.py was cut off (a compile can be slow): rebuild its file from the rows it printed."""
    lines = _json_lines(log)
    rows = [line for line in lines if "name" in line]
    probe = next((line["probe"] for line in lines if "probe" in line), None)
    if not rows:
        return False
    cmd = step.cmd
    result = {"benchmark": "bench_train", "incomplete": True, "device": device,
              "note": "bench_train.py was stopped at its time cap; rows rebuilt from its printed lines",
              "git_commit": os.environ.get("HQCLIP_COMMIT"), "batch_probe": probe,
              "settings": {"model": _arg(cmd, "--model"), "batch_size": probe and probe["batch_size"],
                           "image_size": int(_arg(cmd, "--image-size")), "compile": "--compile" in cmd,
                           "precision": _arg(cmd, "--precision") if "--precision" in cmd else "bf16"},
              "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return True


SALVAGE = {"bench_loss.py": salvage_bench_loss, "bench_train.py": salvage_bench_train}


def run_step(step: Step, work: Path, deadline: float, log, device: str = "") -> dict:
    left = deadline - time.monotonic()
    record = {"name": step.name, "cmd": shlex.join(step.cmd) if step.cmd else None, "outputs": step.outputs,
              "cap_s": step.cap_s}
    if step.cmd is None:
        record.update(status="not run", reason=step.why)
    elif left < step.min_left_s:
        record.update(status="not run", reason=f"budget spent ({left:.0f} s left, the step needs {step.min_left_s:.0f})")
    if "status" in record:
        print(f"[campaign] {step.name}: not run: {record['reason']}", file=log, flush=True)
        return record
    timeout = left if step.cap_s is None else min(step.cap_s, left)
    step_log = work / step.name / f"{step.name}.log"
    step_log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"[campaign] {step.name}: start (cap {timeout:.0f} s): {record['cmd']}", file=log, flush=True)
    start = time.monotonic()
    with open(step_log, "w") as out:
        proc = subprocess.Popen(step.cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step and its children (ncu's target, the xformers probe)
            proc.wait()
            rc, status = None, "timed out"
    record.update(status=status, returncode=rc, seconds=round(time.monotonic() - start, 1),
                  log=str(step_log.relative_to(work)))
    if status != "ok":
        record["log_tail"] = _tail(step_log)
        script = next((Path(a).name for a in step.cmd if Path(a).name in SALVAGE), None)
        if script and not (work / step.outputs[0]).exists():
            record["salvaged"] = SALVAGE[script](step_log, work / step.outputs[0], step, device)
    record["missing_outputs"] = [o for o in step.outputs if not (work / o).exists()]
    print(f"[campaign] {step.name}: {status} in {record['seconds']} s" +
          (f", missing {record['missing_outputs']}" if record["missing_outputs"] else ""), file=log, flush=True)
    print(_tail(step_log, 3000 if status == "ok" else 6000), file=log, flush=True)
    return record


# ------------------------------------------------------------------------------------------------ provenance
def _blob_sha(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git_commit() -> dict:
    """The commit being measured, and whether the tree differs from it. With .git: HEAD and `git status`.
    Without (the device tool copies the working tree, not .git): the commit that fetch_gpu_wheels.sh stamped
    into wheels/COMMIT, checked file by file against the blob hashes stamped with it, so that a tree which is
    not that commit (edited since, or another checkout) is reported dirty, with the files that differ."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout.split("\n")
        changed = [line[3:] for line in changed if line.strip()]
        return {"commit": sha, "dirty": bool(changed), "changed_files": changed[:20], "commit_source": "git"}
    except (OSError, subprocess.CalledProcessError):
        pass
    stamp = REPO / "wheels" / "COMMIT"
    if not stamp.exists():
        return {"commit": None, "dirty": None, "changed_files": [], "commit_source": "unknown"}
    sha, *tree = stamp.read_text().splitlines()
    changed = []
    for line in tree:  # `git ls-tree -r HEAD`: "<mode> blob <sha>\t<path>"
        meta, path = line.split("\t", 1)
        mode, _, blob = meta.split()
        if mode.startswith("100") and (not (REPO / path).is_file() or _blob_sha(REPO / path) != blob):
            changed.append(path)
    return {"commit": sha, "dirty": bool(changed), "changed_files": changed[:20], "commit_source": "wheels/COMMIT"}


def environment(device: str) -> dict:
    """Device and versions. Called in a child process (--print-env) so that this driver never holds a
    CUDA context (its memory would be missing from every benchmark)."""
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device_type": device, "python": platform.python_version(), "torch": torch.__version__,
           "hostname": platform.node(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu for the dry run)")
        env["device"] = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_mib"] = props.total_memory // 2**20
        env["sm_count"] = props.multi_processor_count
        env["capability"] = list(torch.cuda.get_device_capability())
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    # Installed versions, read without importing (open_clip alone takes seconds to import).
    for key, dist in (("triton", "triton"), ("open_clip", "open_clip_torch"), ("inf_cl", "inf-cl"),
                      ("xformers", "xformers"), ("numpy", "numpy")):
        try:
            env[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[key] = None
    if shutil.which("nvidia-smi"):
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return env


# ------------------------------------------------------------------------------------------------ packing
def pack(work: Path, out: Path, call: str, log) -> None:
    """One tar.gz of the work folder under the device tool's per-file limit (the largest files dropped first),
    the log beside it, and this call's results in the collector's format (partial.json, partial.md)."""
    tarball = out / f"campaign-{call}.tar.gz"
    exclude: set[Path] = set()
    while True:
        with tarfile.open(tarball, "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                if path.is_file() and path not in exclude:
                    tar.add(path, arcname=str(path.relative_to(work)))
        if tarball.stat().st_size <= TARBALL_LIMIT:
            break
        biggest = max((p for p in work.rglob("*") if p.is_file() and p not in exclude), key=lambda p: p.stat().st_size)
        exclude.add(biggest)
        print(f"[campaign] {biggest.name} ({biggest.stat().st_size >> 20} MiB) left out of the tarball (size limit)",
              file=log, flush=True)
    try:
        result = collect_gpu_results.collect([work], require=(), allow_cpu=True, allow_dirty=True)
        (out / "partial.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "partial.md").write_text(collect_gpu_results.markdown(result))
    except Exception as err:  # noqa: BLE001 - the measurements are in the tarball whatever the collector says
        print(f"[campaign] partial collection failed: {type(err).__name__}: {err}", file=log, flush=True)
    shutil.copy(work / "campaign.log", out / "campaign.log")


class _Tee:
    """Writes to the campaign log and to stdout (the device tool returns stdout's tail)."""

    def __init__(self, file):
        self.file = file

    def write(self, text):
        self.file.write(text)
        sys.stdout.write(text)

    def flush(self):
        self.file.flush()
        sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--call", choices=sorted(PLANS), default="main")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the campaign; cpu: the same steps at tiny sizes (a dry run of the plumbing)")
    parser.add_argument("--budget-s", type=float, default=400,
                        help="wall-clock budget of this call; each step is capped to what is left")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hqclip-campaign"), help="work folder (emptied)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the tarball, log and partial results go (default: $OUT, else WORK-out)")
    parser.add_argument("--print-env", action="store_true", help=argparse.SUPPRESS)  # internal, see environment()
    args = parser.parse_args(argv)
    if args.print_env:
        print(json.dumps(environment(args.device)))
        return 0
    if args.call == "extra" and args.device != "cuda":
        parser.error("--call extra measures what only a GPU can say; the dry run is of --call main")
    deadline = time.monotonic() + args.budget_s - RESERVE_S
    args.work = args.work.resolve()
    if args.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # Triton's CPU interpreter, as in the CPU test suite
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else args.work.with_name(args.work.name + "-out"))
    provenance = git_commit()
    if provenance["commit"]:
        os.environ["HQCLIP_COMMIT"] = provenance["commit"]  # the benchmarks record it when there is no .git
    probe = subprocess.run([_python(), __file__, "--print-env", "--device", args.device], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        print(probe.stdout + probe.stderr, file=sys.stderr)
        return 2
    env = {**json.loads(probe.stdout.strip().splitlines()[-1]), **provenance}

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(args.work / "campaign.log", "w") as log_file:
        log = _Tee(log_file)
        (args.work / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        print(f"[campaign] {json.dumps(env)}", file=log, flush=True)
        records = []
        campaign = {"call": args.call, "device_type": args.device, "budget_s": args.budget_s,
                    "argv": sys.argv[1:], "steps": records}
        for step in PLANS[args.call](args):
            records.append(run_step(step, args.work, deadline, log, env["device"]))
            (args.work / "campaign.json").write_text(json.dumps(campaign, indent=2) + "\n")
            pack(args.work, out, args.call, log)  # so that a call killed later still returns this step
        summary = [f"{r['name']}: {r['status']}" + (f" ({r['seconds']} s)" if "seconds" in r else "")
                   for r in records]
        print("[campaign] summary:\n  " + "\n  ".join(summary), file=log, flush=True)
        print(f"[campaign] wrote {sorted(p.name for p in out.iterdir())} to {out}", file=log, flush=True)
    pack(args.work, out, args.call, sys.stdout)
    return 1 if any(r["status"] in ("failed", "timed out") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU campaign of issue 8 in a few device calls: GPU tests, loss/tower/training/loader benchmarks, profile.

Run it through benchmarks/gpu_campaign.sh, which installs the carried wheels and puts the project on the path:

    bash benchmarks/gpu_campaign.sh --stage tests,loss,profile --dims 768     # call 1 (the targets' D)
    bash benchmarks/gpu_campaign.sh --stage train,towers,loader               # call 2
    bash benchmarks/gpu_campaign.sh --stage loss --dims 512,1024              # call 3
    bash benchmarks/gpu_campaign.sh --stage extras                            # call 4, if time is left
    bash benchmarks/gpu_campaign.sh --device cpu --stage all                  # tiny CPU smoke run, a few minutes

Every step is a subprocess with its own time cap, clipped to what is left of --budget-s, so one call ends
inside the device tool's 10 minutes and still returns what finished. A step that times out or fails is recorded
(return code, log tail) and the campaign goes on. bench_loss.py prints each case and bench_train.py each row as
it finishes; when one is cut off, its result file is rebuilt from those lines and marked incomplete.

Everything lands in a work folder (default /tmp/hqclip-campaign): env.json, campaign.json (the steps run),
one folder per stage with the scripts' JSON/Markdown/logs. At the end the folder is packed into
OUT/campaign-<stages>.tar.gz (the device tool returns at most 8 files) and collect_gpu_results.py writes
OUT/partial.json/.md over what this call produced. Merge the calls afterwards with collect_gpu_results.py.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
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
STAGES = ("tests", "loss", "profile", "train", "towers", "loader", "extras")
GPU_LOSS_BATCHES = "32768,4096,16384,65536"  # the targets' B first: a cut-off run still has it
TARBALL_LIMIT = 15 * 2**20  # the device tool returns files up to 16 MiB
RESERVE_S = 25  # kept back from the budget for packing and the partial collection


@dataclass
class Step:
    """One subprocess of the campaign."""

    stage: str
    name: str
    cmd: list[str]
    cap_s: float  # its own time cap; clipped to the budget left
    outputs: list[str] = field(default_factory=list)  # result files it should write, relative to the work dir
    env: dict = field(default_factory=dict)


def _python() -> str:
    return sys.executable


def loss_steps(args) -> list[Step]:
    cuda = args.device == "cuda"
    steps = []
    for dim in (args.dims if cuda else [32]):
        for negatives in (False, True):
            # open_clip and Inf-CL have no hard-negative columns: not run with --negatives.
            # triton_2pass: the two-pass backward, timed beside the default one-pass form (kernels/contrastive.py).
            impls = ("triton,triton_2pass,chunked,gemm_floor" if negatives
                     else "triton,triton_2pass,chunked,open_clip,inf_cl,gemm_floor")
            tag = f"D{dim}-{'neg' if negatives else 'noneg'}"
            out = f"loss/loss-{tag}.json"
            cmd = [_python(), str(BENCH / "bench_loss.py"), "--device", args.device, "--dim", str(dim),
                   "--impls", impls, "--check", "--out", str(args.work / out)]
            if cuda:
                cmd += ["--dtype", "bfloat16", "--batch-sizes", args.loss_batches, "--warmup", "2", "--repeats", "10"]
            else:
                cmd += ["--dtype", "float32", "--batch-sizes", "33", "--warmup", "0", "--repeats", "1",
                        "--threads", "1"]
            if negatives:
                cmd.append("--negatives")
            steps.append(Step("loss", f"bench_loss {tag}", cmd, 330 if cuda else 240, [out]))
    return steps


def tests_steps(args) -> list[Step]:
    files = ["tests/test_kernels_loss.py", "tests/test_kernels_compile.py", "tests/test_model_attention.py"]
    cmd = [_python(), "-m", "pytest", *files, "-m", "not distributed", "-k", "gpu or cuda or sm90", "-rA", "-q",
           "-p", "no:cacheprovider", "--junitxml", str(args.work / "tests/pytest.xml")]
    return [Step("tests", "pytest (tests that need CUDA)", cmd, 300, ["tests/pytest.xml"])]


def profile_steps(args) -> list[Step]:
    if args.device != "cuda":
        return []  # profile_loss.py refuses to run without CUDA: the interpreter says nothing about a GPU
    shape = ["--batch", "32768", "--dim", "768", "--dtype", "bf16", "--negatives", "--tags", "4096"]
    folder = args.work / "profile"
    steps = [Step("profile", "torch.profiler", [_python(), str(BENCH / "profile_loss.py"), *shape,
                                                 "--out", str(folder)], 180,
                  ["profile/loss_triton_B32768_D768_bf16.json"])]
    ncu_path = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
                                                + sorted(glob.glob("/usr/local/cuda*/bin/ncu"))), None)
    if ncu_path:
        # Only the step after warm-up (profile_loss.py brackets it with cudaProfilerStart/Stop): fused kernels,
        # cuBLAS products and elementwise ops alike. The report is then printed as CSV for reading anywhere.
        ncu = [ncu_path, "--profile-from-start", "off", "--launch-count", "40", "-f", "-o", str(folder / "loss_ncu")]
        for section in ("SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "Occupancy",
                        "LaunchStats"):
            ncu += ["--section", section]
        steps.append(Step("profile", "ncu", ncu + [_python(), str(BENCH / "profile_loss.py"), *shape,
                                                    "--no-profiler", "--warmup", "3", "--steps", "1"],
                          240, ["profile/loss_ncu.ncu-rep"]))
        export = f"{ncu_path} --import {folder / 'loss_ncu.ncu-rep'} --csv --page details > {folder / 'ncu.csv'}"
        steps.append(Step("profile", "ncu csv", ["bash", "-c", export], 60, ["profile/ncu.csv"]))
    return steps


def train_steps(args) -> list[Step]:
    if args.device != "cuda":
        out = "train/train-hqclip-micro-b8-eager.json"
        return [Step("train", "bench_train smoke", [_python(), str(BENCH / "bench_train.py"), "--device", "cpu",
                     "--model", "hqclip-micro", "--image-size", "32", "--batch-size", "8", "--steps", "2",
                     "--warmup", "1", "--threads", "1", "--out", str(args.work / out)], 180, [out])]
    return [_train_step(args, 256, compiled=False), _train_step(args, 256, compiled=True)]


def _train_step(args, batch: int, *, compiled: bool) -> Step:
    """bench_train.py on ViT-B-16 224 px bf16; compiled: both sides torch.compile'd (three compiles)."""
    mode = "compile" if compiled else "eager"
    out = f"train/train-ViT-B-16-b{batch}-{mode}.json"
    cmd = [_python(), str(BENCH / "bench_train.py"), "--device", "cuda", "--model", "ViT-B-16", "--image-size", "224",
           "--batch-size", str(batch), "--precision", "bf16", "--steps", "20", "--warmup", "5",
           "--out", str(args.work / out)] + (["--compile"] if compiled else [])
    return Step("train", f"bench_train b{batch} {mode}", cmd, 420 if compiled else 180, [out])


def towers_steps(args) -> list[Step]:
    if args.device != "cuda":
        out = "towers/towers-hqclip-micro-b4-fp32.json"
        return [Step("towers", "bench_towers smoke", [_python(), str(BENCH / "bench_towers.py"), "--device", "cpu",
                     "--model", "hqclip-micro", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1",
                     "--threads", "1", "--backends", "sdpa", "--out", str(args.work / out)], 120, [out])]
    backends = "sdpa,xformers" if xformers_works(args.work / "towers" / "xformers_probe.log") else "sdpa"
    return [_towers_step(args, backends, compiled=False)]


def _towers_step(args, backends: str, *, compiled: bool) -> Step:
    mode = "compile" if compiled else "eager"
    out = f"towers/towers-ViT-B-16-b256-bf16-{mode}.json"
    cmd = [_python(), str(BENCH / "bench_towers.py"), "--device", "cuda", "--model", "ViT-B-16", "--batch", "256",
           "--dtype", "bf16", "--backends", backends, "--out", str(args.work / out)] + (["--compile"] if compiled else [])
    return Step("towers", f"bench_towers {mode}", cmd, 300 if compiled else 240, [out])


def extras_steps(args) -> list[Step]:
    """What a fourth call adds when device time is left: a larger training batch and compiled towers."""
    if args.device != "cuda":
        return []
    return [_train_step(args, 512, compiled=True), _towers_step(args, "sdpa", compiled=True)]


XFORMERS_PROBE = """
import torch, xformers.ops as xops
from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask
q = torch.randn(2, 77, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
xops.memory_efficient_attention(q, q, q, attn_bias=xops.LowerTriangularMask()).sum().backward()
packed = q.detach()[:1, :60].requires_grad_()
mask = BlockDiagonalCausalMask.from_seqlens([25, 35])
xops.memory_efficient_attention(packed, packed, packed, attn_bias=mask).sum().backward()
print("xformers", xops.__name__, "ran forward and backward on CUDA")
"""


def xformers_works(log: Path) -> bool:
    """bench_towers.py has no per-backend error handling: a carried xformers wheel that imports but cannot run
    on this torch would take the SDPA and open_clip rows down with it. Try its two calls first (log kept)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        probe = subprocess.run([_python(), "-c", XFORMERS_PROBE], capture_output=True, text=True, timeout=180)
        text, ok = probe.stdout + probe.stderr, probe.returncode == 0
    except subprocess.TimeoutExpired:
        text, ok = "timed out after 180 s", False
    log.write_text(("ok\n" if ok else "FAILED: towers run with sdpa only\n") + text)
    print(f"[campaign] xformers probe: {'ok' if ok else 'failed, towers run with sdpa only'} ({log})", flush=True)
    return ok


def loader_steps(args) -> list[Step]:
    out = "loader/loader.json"
    if args.device != "cuda":
        cmd = [_python(), str(BENCH / "bench_loader.py"), "--device", "cpu", "--num-samples", "64", "--source-size",
               "64", "--image-size", "32", "--batch-size", "8", "--batches", "2", "--workers", "0",
               "--tokenizer-captions", "200", "--out", str(args.work / out)]
        return [Step("loader", "bench_loader smoke", cmd, 120, [out])]
    cmd = [_python(), str(BENCH / "bench_loader.py"), "--device", "cuda", "--vit-step", "--num-samples", "4000",
           "--batch-size", "128", "--batches", "10", "--workers", "4", "8", "16", "--out", str(args.work / out)]
    return [Step("loader", "bench_loader", cmd, 240, [out])]


BUILDERS = {"tests": tests_steps, "loss": loss_steps, "profile": profile_steps, "train": train_steps,
            "towers": towers_steps, "loader": loader_steps, "extras": extras_steps}


# ------------------------------------------------------------------------------------------------ running
def _tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def salvage_bench_loss(log: Path, out: Path, step: Step) -> bool:
    """bench_loss.py was cut off before writing its file: rebuild it from the case lines it printed."""
    cases = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"impl"' in line:
            try:
                cases.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if not cases:
        return False
    cmd = step.cmd
    result = {"benchmark": "loss fwd+bwd (CLIP part: image/text features + logit_scale)", "incomplete": True,
              "note": "bench_loss.py was stopped at its time cap; cases rebuilt from its printed lines",
              "device": cmd[cmd.index("--device") + 1], "dim": int(cmd[cmd.index("--dim") + 1]),
              "dtype": cmd[cmd.index("--dtype") + 1], "negatives": "--negatives" in cmd, "cases": cases}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return True


TRAIN_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<rate>[\d.]+) samples/s\s+(?P<gflop>[\d.]+) GFLOP/sample\s+"
                       r"MFU (?P<mfu>n/a|[\d.]+%)$")


def salvage_bench_train(log: Path, out: Path, step: Step, device: str) -> bool:
    """bench_train.py was cut off (a compile can be slow): rebuild its file from the rows it printed."""
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        match = TRAIN_ROW.match(line.strip())
        if match:
            mfu = match["mfu"]
            rows.append({"name": match["name"].strip(), "samples_per_s": float(match["rate"]),
                         "flops_per_sample": float(match["gflop"]) * 1e9,
                         "mfu": None if mfu == "n/a" else float(mfu[:-1]) / 100})
    if not rows:
        return False
    cmd = step.cmd
    result = {"benchmark": "bench_train", "incomplete": True, "device": device,
              "note": "bench_train.py was stopped at its time cap; rows rebuilt from its printed lines",
              "settings": {"model": cmd[cmd.index("--model") + 1], "batch_size": int(cmd[cmd.index("--batch-size") + 1]),
                           "image_size": int(cmd[cmd.index("--image-size") + 1]), "compile": "--compile" in cmd,
                           "precision": cmd[cmd.index("--precision") + 1] if "--precision" in cmd else "bf16"},
              "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return True


def run_step(step: Step, work: Path, deadline: float, log, device: str = "") -> dict:
    left = deadline - time.monotonic()
    record = {"stage": step.stage, "name": step.name, "cmd": shlex.join(step.cmd), "outputs": step.outputs}
    if left < 30:
        record.update(status="not run", reason=f"campaign budget spent ({left:.0f} s left)")
        print(f"[campaign] {step.name}: not run, budget spent", file=log, flush=True)
        return record
    timeout = min(step.cap_s, left)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in step.name)
    step_log = work / step.stage / f"{safe}.log"
    step_log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    print(f"[campaign] {step.name}: start (cap {timeout:.0f} s): {record['cmd']}", file=log, flush=True)
    start = time.monotonic()
    with open(step_log, "w") as out:
        proc = subprocess.Popen(step.cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step and its children (bench_loss runs one process per case)
            proc.wait()
            rc, status = None, "timed out"
    record.update(status=status, returncode=rc, seconds=round(time.monotonic() - start, 1),
                  log=str(step_log.relative_to(work)))
    if status != "ok":
        record["log_tail"] = _tail(step_log)
        if step.stage == "loss" and not (work / step.outputs[0]).exists():
            record["salvaged"] = salvage_bench_loss(step_log, work / step.outputs[0], step)
        if step.name.startswith("bench_train") and not (work / step.outputs[0]).exists():
            record["salvaged"] = salvage_bench_train(step_log, work / step.outputs[0], step, device)
    record["missing_outputs"] = [o for o in step.outputs if not (work / o).exists()]
    print(f"[campaign] {step.name}: {status} in {record['seconds']} s" +
          (f", missing {record['missing_outputs']}" if record["missing_outputs"] else ""), file=log, flush=True)
    print(_tail(step_log, 3000 if status == "ok" else 6000), file=log, flush=True)
    return record


def git_commit() -> dict:
    """The commit being measured: git when the tree travels with .git, else HQCLIP_COMMIT or wheels/COMMIT
    (benchmarks/fetch_gpu_wheels.sh writes it)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return {"commit": sha, "dirty": dirty, "commit_source": "git"}
    except (OSError, subprocess.CalledProcessError):
        pass
    if os.environ.get("HQCLIP_COMMIT"):
        return {"commit": os.environ["HQCLIP_COMMIT"], "dirty": None, "commit_source": "HQCLIP_COMMIT"}
    stamp = REPO / "wheels" / "COMMIT"
    if stamp.exists():
        lines = stamp.read_text().split()
        return {"commit": lines[0], "dirty": "dirty" in lines[1:], "commit_source": "wheels/COMMIT"}
    return {"commit": None, "dirty": None, "commit_source": "unknown"}


def environment(device: str) -> dict:
    """Device, versions, commit. Called in a child process (--print-env) so that this driver never holds a
    CUDA context (its memory would be missing from every benchmark)."""
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device_type": device, "python": platform.python_version(), "torch": torch.__version__,
           "hostname": platform.node(), "cpu_count": os.cpu_count(), **git_commit()}
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
    for module in ("triton", "open_clip", "inf_cl", "xformers", "flash_attn", "webdataset", "omegaconf"):
        try:
            env[module] = getattr(__import__(module), "__version__", "installed")
        except Exception as err:  # noqa: BLE001 - an optional package that fails to import is recorded, not fatal
            env[module] = None if isinstance(err, ImportError) else f"import error: {err}"
    if shutil.which("nvidia-smi"):
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return env


def pack(work: Path, out: Path, tag: str, log) -> Path:
    """One tar.gz of the work folder, under the device tool's per-file limit (large traces dropped first)."""
    tarball = out / f"campaign-{tag}.tar.gz"
    exclude: set[str] = set()
    while True:
        with tarfile.open(tarball, "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                rel = path.relative_to(work)
                if path.is_file() and str(rel) not in exclude:
                    tar.add(path, arcname=str(rel))
        if tarball.stat().st_size <= TARBALL_LIMIT:
            break
        files = sorted((p for p in work.rglob("*") if p.is_file() and str(p.relative_to(work)) not in exclude),
                       key=lambda p: p.stat().st_size)
        biggest = files[-1]
        exclude.add(str(biggest.relative_to(work)))
        print(f"[campaign] {biggest.name} ({biggest.stat().st_size >> 20} MiB) left out of the tarball (size limit)",
              file=log, flush=True)
    return tarball


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="all", help=f"comma-separated from {list(STAGES)}, or 'all'")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the campaign; cpu: every stage at tiny sizes (a dry run of the plumbing)")
    parser.add_argument("--dims", default="768,512,1024", help="loss stage: feature sizes D (cuda)")
    parser.add_argument("--loss-batches", default=GPU_LOSS_BATCHES, help="loss stage: batch sizes B (cuda)")
    parser.add_argument("--budget-s", type=float, default=560,
                        help="wall-clock budget of this call; steps are capped to what is left")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hqclip-campaign"), help="work folder (emptied)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the tarball and partial results go (default: $OUT, else WORK-out)")
    parser.add_argument("--print-env", action="store_true", help=argparse.SUPPRESS)  # internal, see environment()
    args = parser.parse_args(argv)
    if args.print_env:
        print(json.dumps(environment(args.device)))
        return 0
    deadline = time.monotonic() + args.budget_s - RESERVE_S
    stages = list(STAGES) if args.stage == "all" else [s for s in args.stage.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stage: unknown {unknown}; known {list(STAGES)}")
    args.dims = [int(d) for d in args.dims.split(",")]
    if args.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # Triton's CPU interpreter, as in the CPU test suite
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else args.work.with_name(args.work.name + "-out"))
    probe = subprocess.run([_python(), __file__, "--print-env", "--device", args.device], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        print(probe.stdout + probe.stderr, file=sys.stderr)
        return 2
    env = json.loads(probe.stdout.strip().splitlines()[-1])

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-".join(stages) if args.stage != "all" else "all"
    if args.device == "cuda" and "loss" in stages:
        tag += "-D" + "_".join(map(str, args.dims))
    with open(args.work / "campaign.log", "w") as log_file:
        log = _Tee(log_file)
        (args.work / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        print(f"[campaign] {json.dumps(env)}", file=log, flush=True)
        steps = [step for stage in stages for step in BUILDERS[stage](args)]
        records = []
        campaign = {"stages": stages, "device_type": args.device, "argv": sys.argv[1:], "steps": records}
        for step in steps:
            records.append(run_step(step, args.work, deadline, log, env["device"]))
            (args.work / "campaign.json").write_text(json.dumps(campaign, indent=2) + "\n")
            # Packed after every step: if the call is killed anyway, what finished still comes back.
            pack(args.work, out, tag, log)
            shutil.copy(args.work / "campaign.log", out / "campaign.log")

        summary = [f"{r['name']}: {r['status']}" + (f" ({r.get('seconds')} s)" if "seconds" in r else "")
                   for r in records]
        print("[campaign] summary:\n  " + "\n  ".join(summary), file=log, flush=True)
        collect = subprocess.run([_python(), str(BENCH / "collect_gpu_results.py"), str(args.work), "--partial",
                                  "--out", str(out / "partial.json")], capture_output=True, text=True)
        print(f"[campaign] partial collection (rc {collect.returncode}):\n{collect.stdout[-4000:]}{collect.stderr[-3000:]}",
              file=log, flush=True)
    tarball = pack(args.work, out, tag, sys.stdout)
    shutil.copy(args.work / "campaign.log", out / "campaign.log")
    print(f"[campaign] wrote {tarball} ({tarball.stat().st_size / 2**20:.2f} MiB), {out / 'campaign.log'}")
    failed = [r for r in records if r["status"] != "ok"]
    return 1 if failed else 0


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


if __name__ == "__main__":
    sys.exit(main())

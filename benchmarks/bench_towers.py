"""Tower throughput: forward+backward samples/s of the image and text towers per attention backend and text
packing, and the whole model against open_clip's at the same batch and precision.

Text batches imitate HQ-CLIP training: per image one positive text (a long description, 30-77 tokens) and one
negative (half long descriptions, half short tag lists of 4-12 tokens), so padding is a large share of the
77-token context and packing removes it. Parts: "image" and "text" are the towers alone; "model" is both
towers on the training batch (images, positives + negatives in one text pass, normalized), as forward runs them.

  python benchmarks/bench_towers.py --device cpu --model hqclip-tiny --batch 32 --dtype fp32
  python benchmarks/bench_towers.py --device cuda --model ViT-B-16 --batch 256 --dtype bf16 [--compile]
      (the GPU target: our ViT-B/16 at 224 px in bf16 >= 1.3x open_clip's throughput at the same batch)

--dtype bf16 casts both models' parameters to bf16 (what FSDP2's param_dtype=bf16 computes in);
--dtype amp_bf16 keeps fp32 parameters under torch.autocast (open_clip's usual --precision amp_bf16).
Results: benchmarks/results/towers_<device>_<model>_<dtype>.json plus a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hqclip_fast.model import create_model, get_config
from hqclip_fast.parallelize import parallelize_model

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SPEEDUP = 1.3
EOT = 49407
OPTIONAL_BACKENDS = {"flash_attn": "flash_attn", "xformers": "xformers"}


def environment(device: torch.device) -> dict:
    def version(module):
        try:
            return __import__(module).__version__
        except ImportError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),  # other processes share a CPU machine
        "torch": torch.__version__,
        "triton": version("triton"),
        "open_clip": version("open_clip"),
        "flash_attn": version("flash_attn"),
        "xformers": version("xformers"),
        "git_commit": commit,
    }


def training_texts(batch: int, context_length: int, generator: torch.Generator) -> torch.Tensor:
    """2*batch token rows: positives (long), then negatives (half long, half short tag lists)."""
    long_lo = min(30, context_length)
    lengths = torch.cat([
        torch.randint(long_lo, context_length + 1, (batch + batch // 2,), generator=generator),
        torch.randint(4, min(12, context_length) + 1, (batch - batch // 2,), generator=generator),
    ])
    tokens = torch.zeros(2 * batch, context_length, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, : n - 1] = torch.randint(1, EOT - 1, (n - 1,), generator=generator)
        tokens[i, n - 1] = EOT
    return tokens


def open_clip_model(name: str):
    import open_clip

    if name in open_clip.list_models():
        return open_clip.create_model(name, pretrained=None)
    cfg = get_config(name)  # hqclip-* CPU configs: the same architecture built by open_clip's classes
    return open_clip.model.CLIP(embed_dim=cfg.embed_dim, quick_gelu=cfg.quick_gelu,
                                vision_cfg=dataclasses.asdict(cfg.vision_cfg),
                                text_cfg=dataclasses.asdict(cfg.text_cfg))


def time_cases(cases: list[dict], device: torch.device, steps: int, warmup: int, rounds: int) -> None:
    """Median seconds per step of every case, measured in interleaved rounds so that load changes on a shared
    machine hit all cases alike. Sets case["seconds"] (wall) and case["cpu_seconds"] (this process's CPU time,
    all threads: steadier than wall time when other processes compete for the cores)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for case in cases:
        for _ in range(warmup):
            case["step"]()
    wall = {id(case): [] for case in cases}
    cpu = {id(case): [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                case["step"]()
            sync()
            wall[id(case)].append((time.perf_counter() - start) / steps)
            cpu[id(case)].append((time.process_time() - start_cpu) / steps)
    for case in cases:
        case["seconds"] = statistics.median(wall[id(case)])
        case["cpu_seconds"] = statistics.median(cpu[id(case)])


def fwd_bwd(model, fn, autocast):
    def step():
        with autocast():
            out = fn()
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return step


def prepare(model, args, device, dtype):
    model = model.to(device)
    if args.dtype == "bf16":
        model = model.to(dtype)
    return model.train()


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype in ("bf16", "amp_bf16") else torch.float32
    input_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.dtype == "amp_bf16"
                else contextlib.nullcontext)
    cfg = get_config(args.model)
    g = torch.Generator().manual_seed(0)
    size = cfg.vision_cfg.image_size
    images = torch.randn(args.batch, 3, size, size, generator=g).to(device, input_dtype)
    texts = training_texts(args.batch, cfg.text_cfg.context_length, g).to(device)
    real_tokens = int((texts.argmax(-1) + 1).sum())
    rows, cases = [], []

    def add(impl, part, backend, packing, step, samples):
        cases.append({"impl": impl, "part": part, "backend": backend, "packing": packing, "step": step,
                      "samples": samples})

    for backend in args.backends:
        if backend != "sdpa" and importlib.util.find_spec(OPTIONAL_BACKENDS[backend]) is None:
            rows.append({"impl": "hqclip", "backend": backend, "skipped": f"{OPTIONAL_BACKENDS[backend]} not installed"})
            print(f"hqclip    {backend}: skipped ({OPTIONAL_BACKENDS[backend]} not installed)")
            continue
        torch.manual_seed(0)
        model = prepare(create_model(args.model, attn_backend=backend), args, device, dtype)
        if args.compile:
            model = parallelize_model(model, compile=True)
        add("hqclip", "image", backend, "-", fwd_bwd(model, lambda m=model: m.encode_image(images), autocast),
            args.batch)
        for packed in (False, True):
            add("hqclip", "text", backend, "packed" if packed else "padded",
                fwd_bwd(model, lambda m=model, p=packed: m.encode_text(texts, packed=p), autocast), texts.shape[0])
        for packed in (False, True):
            def whole(m=model, p=packed):
                image_features = F.normalize(m.encode_image(images), dim=-1)
                text_features = F.normalize(m.encode_text(texts, packed=p), dim=-1)  # positives + negatives
                return (image_features * text_features[: args.batch]).sum() + text_features[args.batch:].sum()
            add("hqclip", "model", backend, "packed" if packed else "padded", fwd_bwd(model, whole, autocast),
                args.batch)

    if args.open_clip:
        theirs = prepare(open_clip_model(args.model), args, device, dtype)
        # open_clip's own --torchcompile compiles the whole model; its encoders are compiled the same way here.
        maybe_compile = torch.compile if args.compile else (lambda fn: fn)
        encode_image, encode_text = (maybe_compile(f) for f in (theirs.encode_image, theirs.encode_text))
        add("open_clip", "image", "native", "-", fwd_bwd(theirs, lambda: encode_image(images), autocast), args.batch)
        add("open_clip", "text", "native", "padded", fwd_bwd(theirs, lambda: encode_text(texts), autocast),
            texts.shape[0])

        def whole_open_clip():
            image_features = encode_image(images, normalize=True)
            text_features = encode_text(texts, normalize=True)
            return (image_features * text_features[: args.batch]).sum() + text_features[args.batch:].sum()
        add("open_clip", "model", "native", "padded", fwd_bwd(theirs, whole_open_clip, autocast), args.batch)

    time_cases(cases, device, args.steps, args.warmup, args.rounds)
    for c in cases:
        sec = c["seconds"]
        rows.append({"impl": c["impl"], "part": c["part"], "backend": c["backend"], "packing": c["packing"],
                     "ms_per_step": round(sec * 1e3, 3), "samples_per_s": round(c["samples"] / sec, 2),
                     "cpu_ms_per_step": round(c["cpu_seconds"] * 1e3, 3),
                     "samples_per_cpu_s": round(c["samples"] / c["cpu_seconds"], 2)})
        print(f"{c['impl']:9s} {c['part']:6s} {c['backend']:10s} {c['packing']:7s} {sec * 1e3:9.2f} ms "
              f"{c['samples'] / sec:10.1f} samples/s", flush=True)

    return {"env": environment(device), "args": vars(args), "text_tokens": {
        "rows": texts.shape[0], "context_length": texts.shape[1], "real_tokens": real_tokens,
        "padding_share": round(1 - real_tokens / texts.numel(), 3)}, "results": rows,
        "speedup_vs_open_clip": speedups(rows, "samples_per_s"),
        "speedup_vs_open_clip_cpu_time": speedups(rows, "samples_per_cpu_s")}


def speedups(rows: list[dict], key: str) -> dict:
    """Best hqclip throughput over open_clip's, per part (model, image, text); key: samples_per_s (wall) or
    samples_per_cpu_s."""
    out = {}
    for part in ("model", "image", "text"):
        ours = [r[key] for r in rows if r.get("impl") == "hqclip" and r.get("part") == part]
        theirs = [r[key] for r in rows if r.get("impl") == "open_clip" and r.get("part") == part]
        if ours and theirs:
            out[part] = round(max(ours) / theirs[0], 3)
    return out


def markdown(result: dict) -> str:
    env, args = result["env"], result["args"]
    lines = [
        f"# Tower throughput: {args['model']}, batch {args['batch']}, {args['dtype']}, "
        f"{'compiled' if args['compile'] else 'eager'}",
        "",
        f"Device: {env['device']} ({env['device_type']}, {env['torch_threads']} threads, load average "
        f"{env['load_average_1m_at_start']} at start: CPU timings on a shared machine are rough); torch {env['torch']}, "
        f"triton {env['triton']}, open_clip {env['open_clip']}; commit {env['git_commit']}.",
        f"Text rows per step: {result['text_tokens']['rows']} x {result['text_tokens']['context_length']} tokens, "
        f"{result['text_tokens']['padding_share']:.0%} padding. Forward+backward; per case the median over "
        f"{args['rounds']} interleaved rounds of {args['steps']} steps, after {args['warmup']} warm-up steps.",
        "",
        "| impl | part | attention | text | ms/step | samples/s | CPU ms/step | samples/CPU-s |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        if "skipped" in r:
            lines.append(f"| {r['impl']} | - | {r['backend']} | - | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['impl']} | {r['part']} | {r['backend']} | {r['packing']} | {r['ms_per_step']} | "
                         f"{r['samples_per_s']} | {r['cpu_ms_per_step']} | {r['samples_per_cpu_s']} |")
    for key, what in (("speedup_vs_open_clip", "samples/s"), ("speedup_vs_open_clip_cpu_time", "samples/CPU-s")):
        if result[key]:
            lines += ["", f"Best hqclip over open_clip ({what} ratio): "
                      + ", ".join(f"{k} {v}x" for k, v in result[key].items())
                      + f" (GPU target, wall time, whole ViT-B-16 model: {TARGET_SPEEDUP}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="config name (default: ViT-B-16 on cuda, hqclip-tiny on cpu)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 256 cuda, 32 cpu)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "amp_bf16"), default=None,
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--backends", default="sdpa,flash_attn,xformers")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median is reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (ours per block, open_clip whole)")
    parser.add_argument("--no-open-clip", dest="open_clip", action="store_false")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="result JSON path (Markdown is written beside it)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    args.model = args.model or ("ViT-B-16" if cuda else "hqclip-tiny")
    args.batch = args.batch or (256 if cuda else 32)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.backends = [b for b in args.backends.split(",") if b]
    for b in args.backends:
        if b != "sdpa" and b not in OPTIONAL_BACKENDS:
            raise SystemExit(f"--backends: unknown backend {b!r}")
    if args.threads:
        torch.set_num_threads(args.threads)

    result = run(args)
    out = Path(args.out) if args.out else RESULTS / f"towers_{torch.device(args.device).type}_{args.model}_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()

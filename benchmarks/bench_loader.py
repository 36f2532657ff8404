"""Data-pipeline throughput: CPU loader samples/s against worker count, tokenizer captions/s, and on a GPU
machine the DALI path (or, where DALI is not installed, torchvision.io.decode_jpeg on CUDA as the comparison
point; the result file says which).

    python benchmarks/bench_loader.py --device cpu                 # CPU loader + tokenizer
    python benchmarks/bench_loader.py --device cuda --vit-step     # + GPU decode, + ViT-B/16 step consumption

The target (GPU): the decode path delivers >= 1.5x the samples/s that a ViT-B/16 training step consumes.
Results: benchmarks/results/bench_loader_<device>.json and .md (device, versions, git commit recorded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch

from hqclip_fast.data import ClipTokenizer, DataConfig, build_train_loader
from hqclip_fast.data.synthetic import make_train_record, write_synthetic

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment(device: str) -> dict:
    def version(module):
        try:
            return __import__(module).__version__
        except ImportError:
            return None

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores, "
                                                                        f"{platform.processor() or platform.machine()})",
        "torch": torch.__version__, "triton": version("triton"), "dali": _dali_version(),
        "python": sys.version.split()[0], "git_commit": commit,
        # the machine may be shared: a load average above the core count means contended numbers
        "load_average_1m": round(os.getloadavg()[0], 2),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _dali_version():
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except ImportError:
        return None


def bench_tokenizer(num: int) -> dict:
    texts = [make_train_record(i, seed=0, image_size=16)[1]["positive_description"] for i in range(num)]
    ours = ClipTokenizer()
    ours(texts[:100])  # warm up (builds the BPE)
    start = time.perf_counter()
    ours(texts)
    rate = num / (time.perf_counter() - start)
    result = {"captions": num, "hqclip_captions_per_s": round(rate)}
    try:
        import open_clip

        start = time.perf_counter()
        open_clip.tokenize(texts[: num // 4])
        result["open_clip_captions_per_s"] = round(num // 4 / (time.perf_counter() - start))
    except ImportError:
        result["open_clip_captions_per_s"] = None
    return result


def bench_cpu_loader(manifest: dict, image_size: int, batch_size: int, workers: int, batches: int) -> dict:
    cfg = DataConfig(train_data=manifest["train"], image_size=image_size, workers=workers, shuffle_buffer=256)
    loader = build_train_loader(cfg, batch_size=batch_size, seed=0)
    it = iter(loader)
    for _ in range(max(2, workers)):  # warm up: worker start and the shuffle buffer fill
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    return {"workers": workers, "batch_size": batch_size, "batches": batches,
            "samples_per_s": round(batches * batch_size / elapsed, 1)}


def bench_dali_cpu(manifest: dict, image_size: int, batch_size: int, batches: int, threads: int) -> dict:
    """The DALI pipeline in DALI's CPU-only mode (the same definition as the GPU path, decode on the CPU)."""
    subprocess.run([sys.executable, "-m", "hqclip_fast.data.cli", "index", manifest["train"]], check=True,
                   capture_output=True)
    cfg = DataConfig(train_data=manifest["train"], image_size=image_size, decoder="dali", dali_device="cpu",
                     workers=threads, shuffle_buffer=256)
    it = iter(build_train_loader(cfg, batch_size=batch_size, seed=0))
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return {"threads": threads, "samples_per_s": round(batches * batch_size / (time.perf_counter() - start), 1)}


def bench_gpu_decode(manifest: dict, image_size: int, batch_size: int, batches: int) -> dict:
    """DALI mixed decode when installed; else torchvision.io.decode_jpeg(device='cuda') as a comparison point."""
    if _dali_version() is not None:
        subprocess.run([sys.executable, "-m", "hqclip_fast.data.cli", "index", manifest["train"]], check=True)
        cfg = DataConfig(train_data=manifest["train"], image_size=image_size, decoder="dali", workers=4,
                         shuffle_buffer=256)
        it = iter(build_train_loader(cfg, batch_size=batch_size, seed=0))
        next(it)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        torch.cuda.synchronize()
        return {"path": "dali (device='mixed')", "samples_per_s": round(batches * batch_size / (time.perf_counter() - start), 1)}
    import torchvision.io as io
    import torchvision.transforms.v2.functional as F

    from hqclip_fast.data.shards import expand_sources, iter_tar_samples

    stats: Counter = Counter()
    raw = [torch.frombuffer(bytearray(s["jpg"]), dtype=torch.uint8)
           for url in expand_sources(manifest["train"])[0] for s in iter_tar_samples(url, stats)]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device="cuda").view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device="cuda").view(1, 3, 1, 1)

    def step(chunk):
        images = io.decode_jpeg(chunk, device="cuda")
        images = torch.stack([F.resize(x, [image_size, image_size], antialias=True) for x in images])
        return (images.float() / 255 - mean) / std

    chunks = [raw[i: i + batch_size] for i in range(0, len(raw) - batch_size + 1, batch_size)]
    step(chunks[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for chunk in itertools.islice(itertools.cycle(chunks), batches):
        step(chunk)
    torch.cuda.synchronize()
    return {"path": "torchvision.io.decode_jpeg(device='cuda') — comparison point, DALI not installed",
            "samples_per_s": round(batches * batch_size / (time.perf_counter() - start), 1)}


def bench_vit_step(batch_size: int, steps: int = 10) -> dict:
    """Samples/s a ViT-B/16 CLIP training step (fwd + bwd, bf16 autocast) consumes on this GPU."""
    from hqclip_fast.model import create_model

    model = create_model("ViT-B-16").cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images = torch.randn(batch_size, 3, 224, 224, device="cuda")
    tokens = torch.randint(1, 49000, (batch_size, 77), device="cuda")
    for i in range(steps + 2):
        if i == 2:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images, tokens)
            loss = (out["image_features"] * out["text_features"]).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return {"batch_size": batch_size, "samples_per_s": round(steps * batch_size / (time.perf_counter() - start), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--source-size", type=int, default=256, help="stored JPEG side")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tokenizer-captions", type=int, default=20000)
    parser.add_argument("--vit-step", action="store_true", help="also time a ViT-B/16 training step (cuda)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")

    result = {"benchmark": "bench_loader", "args": vars(args), "env": environment(args.device)}
    result["tokenizer"] = bench_tokenizer(args.tokenizer_captions)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = write_synthetic(tmp, args.num_samples, 250, seed=0, image_size=args.source_size,
                                   num_zeroshot=12, num_hardneg=2)
        result["synthetic_write_s"] = round(time.perf_counter() - start, 2)
        result["cpu_loader"] = [bench_cpu_loader(manifest, args.image_size, args.batch_size, w, args.batches)
                                for w in args.workers]
        if _dali_version() is not None:
            result["dali_cpu_mode"] = bench_dali_cpu(manifest, args.image_size, args.batch_size, args.batches,
                                                     threads=max(args.workers))
        if args.device == "cuda":
            result["gpu_decode"] = bench_gpu_decode(manifest, args.image_size, args.batch_size, args.batches * 4)
            if args.vit_step:
                result["vit_b16_step"] = bench_vit_step(args.batch_size)
                result["gpu_decode_over_vit_step"] = round(
                    result["gpu_decode"]["samples_per_s"] / result["vit_b16_step"]["samples_per_s"], 2)
    out = args.out or os.path.join(RESULTS, f"bench_loader_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    with open(out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(result))
    print(json.dumps(result, indent=1))
    return 0


def markdown(result: dict) -> str:
    env, args = result["env"], result["args"]
    lines = [
        f"# bench_loader ({args['device']})", "",
        f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, DALI {env['dali']}; "
        f"commit {env['git_commit'][:10]}; {env['time_utc']}; load average {env['load_average_1m']} "
        f"(above the core count means the numbers are contended)", "",
        f"Synthetic JPEGs {args['source_size']}px -> RandomResizedCrop {args['image_size']}px, batch "
        f"{args['batch_size']}, {args['num_samples']} samples (written in {result['synthetic_write_s']} s).", "",
        "| CPU loader workers | samples/s |", "|---|---|",
        *[f"| {r['workers']} | {r['samples_per_s']} |" for r in result["cpu_loader"]], "",
        f"Tokenizer: {result['tokenizer']['hqclip_captions_per_s']} captions/s (hqclip ClipTokenizer) vs "
        f"{result['tokenizer']['open_clip_captions_per_s']} captions/s (open_clip.tokenize), one process.", "",
    ]
    if "dali_cpu_mode" in result:
        lines += [f"DALI pipeline in CPU-only mode ({result['dali_cpu_mode']['threads']} threads): "
                  f"{result['dali_cpu_mode']['samples_per_s']} samples/s.", ""]
    if "gpu_decode" in result:
        lines += [f"GPU decode: {result['gpu_decode']['samples_per_s']} samples/s via {result['gpu_decode']['path']}.", ""]
    if "vit_b16_step" in result:
        lines += [f"ViT-B/16 step consumes {result['vit_b16_step']['samples_per_s']} samples/s; "
                  f"decode/step ratio {result['gpu_decode_over_vit_step']} (target >= 1.5).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

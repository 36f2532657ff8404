"""Data-pipeline throughput: CPU loader samples/s against worker count, tokenizer captions/s, and on a GPU
machine the DALI path (or, where DALI is not installed, torchvision.io.decode_jpeg on CUDA as the comparison
point; the result file says which).

    python benchmarks/bench_loader.py --device cpu                 # CPU loader + tokenizer
    python benchmarks/bench_loader.py --device cuda --vit-step     # + GPU decode, + ViT-B/16 step consumption
    python benchmarks/bench_loader.py --compare                    # ours vs open_clip's pipeline, web-like shards

--compare runs, in one process and interleaved round by round (alternating which goes first, so that a machine
shared with other jobs loads both alike), open_clip's own training data pipeline (open_clip_train.data's
get_wds_dataset with open_clip.transform.image_transform: RandomResizedCrop(224, scale=(0.9, 1.0)), bicubic,
OpenAI mean/std, its tokenizer) and hqclip-fast's CPU loader with the same crop scale, size and normalization,
at 1 and 2 workers, over web-like shards (hqclip_fast.data.web_like); and, one sample at a time in this process,
the decode + augment functions of both and the eval preprocessing of both. The ratio ours / open_clip is the
figure to read; images/s per core = images/s / workers. Result: results/bench_loader_compare_cpu.json and .md.

The target (GPU): the decode path delivers >= 1.5x the samples/s that a ViT-B/16 training step consumes.
Results: benchmarks/results/bench_loader_<device>.json and .md (device, versions, git commit recorded).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch

from hqclip_fast.data import ClipTokenizer, DataConfig, build_train_loader, normalize_images
from hqclip_fast.data.samples import decode_image, eval_transform, train_crop
from hqclip_fast.data.shards import expand_sources, iter_tar_samples
from hqclip_fast.data.synthetic import make_train_record, write_synthetic
from hqclip_fast.data.web_like import write_web_like_shards

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


def tokenizer_captions(num: int) -> list[str]:
    return [make_train_record(i, seed=0, image_size=16)[1]["positive_description"] for i in range(num)]


def tokenizers() -> dict:
    """name -> f(list of captions): ours (context 77) and open_clip's tokenize, where installed."""
    ours = ClipTokenizer()
    ours(["warm up: builds the BPE"])
    functions = {"hqclip": ours}
    try:
        import open_clip

        functions["open_clip"] = open_clip.tokenize
    except ImportError:
        pass
    return functions


def bench_tokenizer(num: int) -> dict:
    texts = tokenizer_captions(num)
    functions = tokenizers()
    result = {"captions": num}
    for name, count in (("hqclip", num), ("open_clip", num // 4)):  # open_clip's is slower: fewer captions
        if name not in functions:
            result[f"{name}_captions_per_s"] = None
            continue
        start = time.perf_counter()
        functions[name](texts[:count])
        result[f"{name}_captions_per_s"] = round(count / (time.perf_counter() - start))
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


# ------------------------------------------------------------------ ours vs open_clip's pipeline (--compare)

RRC_SCALE = (0.9, 1.0)


def web_like_pattern(cache_dir: str, num_samples: int, shard_size: int = 100) -> str:
    """Web-like shards under cache_dir (written once per size; a pure function of the seed)."""
    out = os.path.join(cache_dir, f"web_like_{num_samples}")
    pattern = os.path.join(out, f"web-{{000000..{-(-num_samples // shard_size) - 1:06d}}}.tar")
    done = os.path.join(out, "done")
    if not os.path.exists(done):
        write_web_like_shards(out, num_samples, shard_size)
        open(done, "w").close()
    return pattern


def open_clip_loader(pattern: str, image_size: int, batch_size: int, workers: int):
    """open_clip's training loader exactly as open_clip_train builds it for --train-data (no resampling)."""
    import functools
    from types import ModuleType, SimpleNamespace

    import open_clip
    import webdataset.tariterators
    from open_clip.transform import image_transform

    try:
        import pandas  # noqa: F401
    except ImportError:
        # open_clip_train.data imports pandas for its CSV dataset alone, which the webdataset path never touches;
        # pandas is not among our dependencies, so an empty module stands in for the import.
        sys.modules["pandas"] = ModuleType("pandas")
    from open_clip_train import data

    # webdataset 1.0 ends each shard with an empty end-of-shard marker, which open_clip_train's own grouping
    # (written for webdataset <= 0.2.86, its pin) takes for a file; without the marker the pipeline is unchanged.
    data.tar_file_expander = functools.partial(webdataset.tariterators.tar_file_expander, eof_value=None)

    args = SimpleNamespace(train_data=pattern, val_data=None, train_num_samples=10**7, dataset_resampled=False,
                           train_data_upsampling_factors=None, seed=0, batch_size=batch_size, workers=workers,
                           world_size=1)
    preprocess = image_transform(image_size, is_train=True, aug_cfg={"scale": RRC_SCALE})
    return data.get_wds_dataset(args, preprocess, is_train=True,
                                tokenizer=open_clip.get_tokenizer("ViT-B-16")).dataloader


def hqclip_loader(pattern: str, image_size: int, batch_size: int, workers: int, normalize_on_device: bool = False):
    """Our CPU loader on plain CLIP shards (.txt captions), with open_clip's crop scale, size and normalization."""
    cfg = DataConfig(train_data=pattern, image_size=image_size, workers=workers, rrc_scale=list(RRC_SCALE),
                     required_fields=[], use_negatives=False, use_tags=False, normalize_on_device=normalize_on_device)
    return build_train_loader(cfg, batch_size=batch_size, seed=0)


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its live children (the DataLoader workers), from
    /proc: on a machine shared with other jobs, images per CPU-second is the per-core rate that wall-clock
    rates only approximate."""
    total, me, tick = time.process_time(), os.getpid(), os.sysconf("SC_CLK_TCK")
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


class WarmIterator:
    """A fresh iterator over `loader`, past `warmup` batches (worker start, shuffle buffer fill, prefetch);
    close() drops it and the loader, which ends their worker processes."""

    def __init__(self, loader, warmup: int):
        self.loader, self.it = loader, iter(loader)
        for _ in range(warmup):
            next(self.it)

    def pull(self, batches: int) -> None:
        for _ in range(batches):
            next(self.it)

    def close(self) -> None:
        self.loader = self.it = None


def loader_rates(loader, batch_size: int, batches: int, warmup: int) -> tuple[float, float]:
    """(images/s, images per CPU-second of the process and its workers) of a fresh iterator over `batches`
    batches after `warmup`. Workers deliver in turn, so warmup and batches should be multiples of the worker
    count: a window that starts or ends inside a turn counts a batch made before it, or misses one made in it."""
    warm = WarmIterator(loader, warmup)
    wall, cpu = time.perf_counter(), tree_cpu_seconds()
    warm.pull(batches)
    wall, cpu = time.perf_counter() - wall, tree_cpu_seconds() - cpu
    warm.close()
    return batches * batch_size / wall, batches * batch_size / cpu


def raw_samples(pattern: str, num: int) -> list[dict]:
    stats: Counter = Counter()
    return list(itertools.islice((s for url in expand_sources(pattern)[0] for s in iter_tar_samples(url, stats)), num))


def _image_bytes(raw: dict) -> bytes:
    return next(raw[e] for e in ("jpg", "jpeg", "png", "webp") if e in raw)


def per_sample_functions(image_size: int, kind: str) -> dict:
    """name -> f(raw sample): one image decoded and augmented (kind "train") or preprocessed ("eval"), as each
    pipeline does it per sample. open_clip: webdataset's "pilrgb" decode (PIL open, load, RGB), its transform."""
    import io

    from open_clip.transform import image_transform
    from PIL import Image

    def pil_rgb(raw):
        with Image.open(io.BytesIO(_image_bytes(raw))) as img:
            img.load()
            return img.convert("RGB")

    if kind == "eval":
        oc_eval = image_transform(image_size, is_train=False)
        return {"open_clip_eval": lambda raw: oc_eval(pil_rgb(raw)),
                "hqclip_eval": lambda raw: eval_transform(decode_image(raw), image_size)}
    oc_train = image_transform(image_size, is_train=True, aug_cfg={"scale": RRC_SCALE})
    rng = np.random.default_rng(0)
    return {
        "open_clip_train": lambda raw: oc_train(pil_rgb(raw)),
        "hqclip_train_float": lambda raw: normalize_images(train_crop(raw, image_size, RRC_SCALE, rng)),
        "hqclip_train_uint8": lambda raw: train_crop(raw, image_size, RRC_SCALE, rng),
    }


def per_sample_rates(samples: list[dict], functions: dict, rounds: int) -> dict:
    """Images per CPU-second of each function over `samples`, in this process (one thread), rounds interleaved
    (order rotated each round)."""
    names = list(functions)
    rates: dict = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.process_time()
            for raw in samples:
                functions[name](raw)
            rates[name].append(len(samples) / (time.process_time() - start))
    return rates


def _summary(rates: dict, baseline: str) -> dict:
    """Per-round values, medians, and the median over rounds of each round's ratio to `baseline` (the pair ran
    back to back under the same load)."""
    return {
        "per_round": {n: [round(x, 1) for x in v] for n, v in rates.items()},
        "median": {n: round(float(np.median(v)), 1) for n, v in rates.items()},
        "ratio_over_" + baseline: {n: round(float(np.median(np.array(v) / np.array(rates[baseline]))), 2)
                                   for n, v in rates.items() if n != baseline},
    }


def compare(args) -> dict:
    torch.set_num_threads(1)  # the main process only collects batches; leave the cores to the workers
    pattern = web_like_pattern(args.cache_dir, args.num_samples)
    result = {"benchmark": "bench_loader --compare", "args": vars(args), "env": environment("cpu"),
              "shards": pattern, "loaders": []}
    pipelines = {
        "open_clip": lambda w: open_clip_loader(pattern, args.image_size, args.batch_size, w),
        "hqclip": lambda w: hqclip_loader(pattern, args.image_size, args.batch_size, w),
        "hqclip_uint8": lambda w: hqclip_loader(pattern, args.image_size, args.batch_size, w, True),
    }
    for workers in args.workers:
        if args.batches % workers:
            raise SystemExit(f"--batches {args.batches} must be a multiple of every worker count ({workers})")
        wall: dict = {name: [] for name in pipelines}
        cpu: dict = {name: [] for name in pipelines}
        for r in range(args.rounds):
            for name in list(pipelines) if r % 2 == 0 else list(reversed(pipelines)):
                w, c = loader_rates(pipelines[name](workers), args.batch_size, args.batches, warmup=2 * workers)
                wall[name].append(w)
                cpu[name].append(c)
                print(f"workers {workers} round {r} {name}: {w:.1f} images/s, {c:.1f} images/CPU-s", flush=True)
        result["loaders"].append({"workers": workers, "images_per_s": _summary(wall, "open_clip"),
                                  "images_per_cpu_s": _summary(cpu, "open_clip")})
    samples = raw_samples(pattern, args.per_sample_images)
    result["per_sample"] = {"images": len(samples), **{
        kind: {"images_per_cpu_s": _summary(per_sample_rates(samples, per_sample_functions(args.image_size, kind),
                                                             args.rounds), f"open_clip_{kind}")}
        for kind in ("train", "eval")}}
    result["env"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    return result


def compare_markdown(result: dict) -> str:
    env, args = result["env"], result["args"]
    lines = [
        "# bench_loader --compare: hqclip-fast's CPU loader vs open_clip's training pipeline", "",
        f"device: {env['device']}; torch {env['torch']}; commit {env['git_commit'][:10]}; {env['time_utc']}; "
        f"load average {env['load_average_1m']} at the start, {env['load_average_1m_end']} at the end: the machine "
        "was loaded (shared with other jobs), so wall-clock images/s are noisy. Both pipelines ran in one process, "
        "interleaved round by round (the order alternating); each ratio is the median over rounds of the ratio of "
        "a back-to-back pair. Images per CPU-second (CPU time of the loader process and its workers, from /proc) "
        "is the per-core rate, the least disturbed by the load.", "",
        f"{args['num_samples']} web-like samples (hqclip_fast.data.web_like: long side 512 px for half, 256-511 for "
        "the rest; JPEG q90 with some grayscale, CMYK and EXIF-rotated ones, some PNG (RGB, RGBA, palette) and WebP; "
        f".txt captions); RandomResizedCrop({args['image_size']}, scale=(0.9, 1.0)), bicubic, OpenAI mean/std; "
        f"batch {args['batch_size']}, {args['batches']} timed batches per round after a warm-up, {args['rounds']} "
        "rounds. open_clip: open_clip_train.data.get_wds_dataset with open_clip.transform.image_transform and its "
        "tokenizer. hqclip: float32 normalized batches (the same contract); hqclip_uint8: data.normalize_on_device "
        "(uint8 batches; the train step normalizes on the GPU).", "",
        "| workers | pipeline | images/s | ratio | images per CPU-second | ratio |", "|---|---|---|---|---|---|",
    ]
    for e in result["loaders"]:
        wall, cpu = e["images_per_s"], e["images_per_cpu_s"]
        for name in wall["median"]:
            ratio = lambda summary: f"{summary['ratio_over_open_clip'][name]}x" if name != "open_clip" else "1"  # noqa: B023
            lines.append(f"| {e['workers']} | {name} | {wall['median'][name]} | {ratio(wall)} | "
                         f"{cpu['median'][name]} | {ratio(cpu)} |")
    lines += ["", f"One image at a time in this process ({result['per_sample']['images']} images, "
              f"{args['rounds']} interleaved rounds), images per CPU-second:", "",
              "| path | images per CPU-second | ratio |", "|---|---|---|"]
    for kind in ("train", "eval"):
        summary = result["per_sample"][kind]["images_per_cpu_s"]
        ratios = summary[f"ratio_over_open_clip_{kind}"]
        lines += [f"| {name} | {rate} | {f'{ratios[name]}x' if name in ratios else '1'} |"
                  for name, rate in summary["median"].items()]
    lines += ["", "hqclip_eval is hqclip-eval's preprocessing (EvalDataset: full decode, RGB, PIL resize of the "
              "short side, center crop, float), kept identical to open_clip's so that zero-shot results match it "
              "exactly (tests/test_eval.py).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-samples", type=int, default=None, help="default 1000 (800 with --compare)")
    parser.add_argument("--source-size", type=int, default=256, help="stored JPEG side")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (32 with --compare)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches; default 10 (6 per round with --compare)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default 0 1 2 (1 2 with --compare)")
    parser.add_argument("--tokenizer-captions", type=int, default=20000)
    parser.add_argument("--vit-step", action="store_true", help="also time a ViT-B/16 training step (cuda)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare", action="store_true", help="ours vs open_clip's pipeline (CPU, web-like shards)")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: interleaved rounds")
    parser.add_argument("--per-sample-images", type=int, default=100, help="--compare: images per per-sample round")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "hqclip_bench_loader"),
                        help="--compare: where the web-like shards are written once")
    args = parser.parse_args()
    if args.compare:
        args.workers, args.num_samples = args.workers or [1, 2], args.num_samples or 800
        args.batch_size, args.batches = args.batch_size or 32, args.batches or 6
        result = compare(args)
        out = args.out or os.path.join(RESULTS, "bench_loader_compare_cpu.json")
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        with open(out.removesuffix(".json") + ".md", "w") as f:
            f.write(compare_markdown(result))
        print(compare_markdown(result))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    args.workers, args.num_samples = args.workers or [0, 1, 2], args.num_samples or 1000
    args.batch_size, args.batches = args.batch_size or 64, args.batches or 10

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

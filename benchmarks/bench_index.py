"""`hqclip-data index` throughput: images/s per core, and the projected time for a DataComp-scale data set.

    python benchmarks/bench_index.py        # -> benchmarks/results/index_cpu.{json,md}

Web-sized synthetic JPEGs (--width x --height, quality 90, smooth content with noise: about the byte size of
a photo of that size) in tar shards with a json member each, on local disk (page-cached after writing).
1. Per image, in one process: the screen `hqclip-data index` runs (dali.screen_image: header, EOI check,
   1/8-scale entropy decode) against the full PIL decode it ran before.
2. End to end: `hqclip-data index --jobs J` (tar reading, screening, writing the index files) for J = 1 and
   the usable cores; images/s per core = images / seconds / J.
Projection: --shards x --shard-size images (DataComp xlarge: 12,800 x 10,000) on --node-cores cores at the
measured per-core end-to-end rate, assuming shards scale linearly over cores and storage keeps up.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hqclip_fast.data.cli import main as data_cli  # noqa: E402
from hqclip_fast.data.dali import screen_image  # noqa: E402


def web_jpegs(count: int, width: int, height: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (height, width, 3))
        out = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
        images.append(out.getvalue())
    return images


def write_shards(root: str, images: list[bytes], shards: int) -> str:
    per_shard = len(images) // shards
    for s in range(shards):
        with tarfile.open(os.path.join(root, f"web-{s:04d}.tar"), "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                for ext, data in (("jpg", images[i]), ("json", json.dumps({"alt_text": f"image {i}"}).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(root, f"web-{{0000..{shards - 1:04d}}}.tar")


def per_image_rate(images: list[bytes], work) -> float:
    start = time.perf_counter()
    for data in images:
        work(data)
    return len(images) / (time.perf_counter() - start)


def full_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--shards-here", type=int, default=4, help="shards the measured images are split into")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--shards", type=int, default=12_800, help="projection: shards in the data set")
    parser.add_argument("--shard-size", type=int, default=10_000, help="projection: images per shard")
    parser.add_argument("--node-cores", type=int, default=64, help="projection: cores of the node")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index_cpu"))
    args = parser.parse_args()

    images = web_jpegs(args.images, args.width, args.height)
    cores = len(os.sched_getaffinity(0))
    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "cores": cores,
              "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
              "load_average_before": os.getloadavg()[0], "images": args.images,
              "image": f"{args.width}x{args.height} JPEG q90",
              "mean_jpeg_kib": sum(map(len, images)) / len(images) / 1024,
              "per_image_per_core": {"screen": per_image_rate(images, screen_image),
                                     "full_decode": per_image_rate(images, full_decode)},
              "end_to_end": []}
    with tempfile.TemporaryDirectory() as root:
        pattern = write_shards(root, images, args.shards_here)
        for jobs in sorted({1, cores}):
            start = time.perf_counter()
            assert data_cli(["index", pattern, "--jobs", str(jobs), "--no-progress"]) == 0
            seconds = time.perf_counter() - start
            result["end_to_end"].append({"jobs": jobs, "seconds": seconds, "images_per_s": args.images / seconds,
                                         "images_per_s_per_core": args.images / seconds / jobs})
    per_core = result["end_to_end"][0]["images_per_s_per_core"]
    total = args.shards * args.shard_size
    result["projection"] = {"shards": args.shards, "shard_size": args.shard_size, "node_cores": args.node_cores,
                            "hours": total / (per_core * args.node_cores) / 3600}
    result["load_average_after"] = os.getloadavg()[0]
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    p, e = result["per_image_per_core"], result["end_to_end"]
    lines = [f"# hqclip-data index on the CPU ({result['date']}, commit {result['commit']}, {cores} cores, "
             f"load average {result['load_average_before']:.1f} -> {result['load_average_after']:.1f})", "",
             f"{args.images} synthetic {result['image']} images, {result['mean_jpeg_kib']:.0f} KiB on average, in "
             f"{args.shards_here} shards.", "",
             "| per image, one core | images/s |", "|---|---|",
             f"| screen (header, EOI, 1/8-scale entropy decode) | {p['screen']:.0f} |",
             f"| full PIL decode (what index did before) | {p['full_decode']:.0f} |", "",
             "| `hqclip-data index --jobs` | seconds | images/s | images/s per core |", "|---|---|---|---|"]
    lines += [f"| {r['jobs']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} | {r['images_per_s_per_core']:.0f} |"
              for r in e]
    lines += ["", f"Projection: {args.shards:,} shards x {args.shard_size:,} images on {args.node_cores} cores at "
              f"{per_core:.0f} images/s per core (--jobs 1 rate, linear scaling, storage keeping up): "
              f"{result['projection']['hours']:.1f} h."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

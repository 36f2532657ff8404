"""Host memory of the training loaders per 8-GPU node: the presets' bounds, and the shuffle buffer measured.

    python benchmarks/host_memory.py          # -> benchmarks/results/host_memory.{json,md}

1. Bounds per node, from each preset in configs/ (arithmetic on its settings, ranks_per_node ranks):
   CPU decoder: ranks x workers x (shuffle_buffer_mib + decoded batches in flight: (prefetch_factor + 1) x
   batch_size x 3 x S^2 float32); DALI decoder: ranks x shuffle_buffer encoded samples (DALI bounds its buffer
   in samples only, so this row is per KiB of mean encoded sample).
2. Measured: the CPU loader's shuffle buffer (hqclip_fast.data.loader.shuffle_buffer) fed from tar shards of
   web-sized samples (random bytes, --sample-kib each; the buffer holds encoded samples, nothing is decoded),
   once bounded only by --samples and once also by --mib: the peak of the payload it holds and the growth of
   the process's resident memory (ru_maxrss), i.e. what a loader worker pays for its buffer.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hqclip_fast.config import load_config  # noqa: E402

GIB = 2**30


def preset_bounds(ranks_per_node: int) -> list[dict]:
    rows = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path, check=False)
        d = cfg.data
        in_flight = (d.prefetch_factor + 1) * cfg.batch_size * 3 * d.image_size**2 * 4
        workers = max(1, d.workers)
        rows.append({
            "preset": path.name, "decoder": d.decoder, "workers": d.workers, "shuffle_buffer": d.shuffle_buffer,
            "shuffle_buffer_mib": d.shuffle_buffer_mib, "batch_size": cfg.batch_size, "image_size": d.image_size,
            "cpu_decoder_gib_per_node": ranks_per_node * workers * (d.shuffle_buffer_mib * 2**20 + in_flight) / GIB,
            "cpu_decoder_buffer_gib_per_node": ranks_per_node * workers * d.shuffle_buffer_mib / 1024,
            "dali_buffer_gib_per_node_per_kib_sample": ranks_per_node * d.shuffle_buffer * 1024 / GIB,
        })
    return rows


def write_shards(root: str, samples: int, sample_kib: int, per_shard: int = 500) -> list[str]:
    rng = random.Random(0)
    urls = []
    for first in range(0, samples, per_shard):
        url = os.path.join(root, f"web-{first // per_shard:04d}.tar")
        with tarfile.open(url, "w") as tar:
            for i in range(first, min(samples, first + per_shard)):
                for ext, data in (("jpg", rng.randbytes(sample_kib * 1024)), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(url)
    return urls


def measure(urls: list[str], samples: int, mib: float) -> dict:
    """In a fresh process: the buffer's peak held payload and the process's resident-memory growth."""
    code = f"""
import json, random, resource, sys
sys.path.insert(0, {str(ROOT)!r})
from collections import Counter
from hqclip_fast.data.loader import sample_bytes, shuffle_buffer
from hqclip_fast.data.shards import iter_tar_samples
urls = {urls!r}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats, consumed, emitted, peak = Counter(), 0, 0, 0
def source():
    global consumed, peak
    for url in urls:
        for raw in iter_tar_samples(url, stats):
            peak = max(peak, consumed - emitted)
            item = (0, raw)
            consumed += sample_bytes(item)
            yield item
for item in shuffle_buffer(source(), {samples}, random.Random(0), [], {int(mib * 2**20)}):
    emitted += sample_bytes(item)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_buffer_mib": peak / 2**20, "rss_growth_mib": (after - before) / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--samples", type=int, default=3000, help="shuffle_buffer (samples) of the measurement")
    parser.add_argument("--sample-kib", type=int, default=100, help="encoded size of each synthetic sample")
    parser.add_argument("--mib", type=float, default=64.0, help="shuffle_buffer_mib of the bounded measurement")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "host_memory"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        urls = write_shards(root, args.samples + 1000, args.sample_kib)
        measured = [{"shuffle_buffer": args.samples, "shuffle_buffer_mib": mib, **measure(urls, args.samples, mib)}
                    for mib in (0.0, args.mib)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": platform.platform(),
              "python": platform.python_version(), "ranks_per_node": args.ranks_per_node,
              "sample_kib": args.sample_kib, "presets": preset_bounds(args.ranks_per_node), "measured": measured}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Host memory of the loaders ({result['date']}, commit {commit}, {result['machine']})", "",
             f"Bounds per {args.ranks_per_node}-GPU node ({args.ranks_per_node} ranks), from the presets:", "",
             "| preset | decoder | workers/rank | shuffle_buffer | MiB/worker | CPU decoder: buffers GiB/node | "
             "CPU decoder: + decoded batches in flight GiB/node | DALI: buffer GiB/node per KiB of sample |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["presets"]:
        lines.append(f"| {r['preset']} | {r['decoder']} | {r['workers']} | {r['shuffle_buffer']} | "
                     f"{r['shuffle_buffer_mib']:.0f} | {r['cpu_decoder_buffer_gib_per_node']:.1f} | "
                     f"{r['cpu_decoder_gib_per_node']:.1f} | {r['dali_buffer_gib_per_node_per_kib_sample']:.3f} |")
    lines += ["", f"Measured (one CPU loader worker's buffer, {args.sample_kib} KiB samples, "
              f"shuffle_buffer={args.samples}):", "",
              "| shuffle_buffer_mib | peak payload held, MiB | resident memory growth, MiB |", "|---|---|---|"]
    for m in measured:
        bound = "0 (no byte bound)" if not m["shuffle_buffer_mib"] else f"{m['shuffle_buffer_mib']:.0f}"
        lines.append(f"| {bound} | {m['peak_buffer_mib']:.1f} | {m['rss_growth_mib']:.1f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

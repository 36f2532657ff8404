"""Loader resume cost: time from start to the first batch for a fresh loader (0 consumed samples) and for one
resumed at >= 100,000 consumed samples, on synthetic shards on local disk (CPU loader, DataLoader workers).

    python benchmarks/bench_resume.py      # 120 shards x 1,000 samples (256px JPEGs), resume at 100,000

Defaults are a preset's loader settings (batch 256 per rank, a 10,000-sample shuffle buffer, 224px crops) with 2
workers. The 100,000 samples are consumed with 32px output crops to save time: the loader state does not depend
on the output size, and the timed starts use the real one.

Goal: resumed / fresh <= 1.2 (resume costs about one shard, whatever the step). Each time is the median of
--repeats starts; fresh and resumed starts alternate. Results: benchmarks/results/bench_resume_cpu.json and .md (machine load recorded).

    python benchmarks/bench_resume.py --shared-shard 4   # 4 slots sharing one 1,000-sample shard

measures only what slots sharing a shard (fewer shards than slots) read: each of K slots reads its samples of one
shard (index % K == slot, the loader's rule), from the local tar (read by its headers, seeking over the other
slots' data) and from the same bytes through `pipe:cat` (streamed). Bytes are what this process took in through
read calls (/proc/thread-self/io rchar), seconds the median of --repeats alternating runs, the shard in the page cache.
Results: benchmarks/results/bench_resume_shared_shard_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tarfile
import tempfile
import time
from collections import Counter

from bench_loader import RESULTS, environment

from hqclip_fast.data import ClipTokenizer, DataConfig, build_train_loader
from hqclip_fast.data.shards import expand_sources, iter_tar_samples
from hqclip_fast.data.synthetic import add_tar_member, make_train_record

GOAL = 1.2


def write_shards(root: str, num_shards: int, shard_size: int, image_size: int) -> str:
    """num_shards x shard_size samples with unique keys, made of 64 distinct synthetic images and records."""
    templates = [make_train_record(i, seed=0, image_size=image_size) for i in range(64)]
    for shard in range(num_shards):
        with tarfile.open(os.path.join(root, f"shard-{shard:06d}.tar"), "w") as tar:
            for i in range(shard * shard_size, (shard + 1) * shard_size):
                jpg, record = templates[i % len(templates)]
                key = f"s{i:09d}"
                add_tar_member(tar, f"{key}.jpg", jpg)
                add_tar_member(tar, f"{key}.json", json.dumps({**record, "key": key}).encode())
    return os.path.join(root, f"shard-{{000000..{num_shards - 1:06d}}}.tar")


def time_to_first_batch(make, state: dict | None) -> float:
    loader = make()
    start = time.perf_counter()
    if state is not None:
        loader.load_state_dict(state)
    next(iter(loader))
    return time.perf_counter() - start


def bytes_taken_in() -> int:
    """Bytes this thread has read through read calls, from files and pipes alike (Linux; not /proc/self/io,
    which adds the reads of reaped children: the `cat` of a pipe:)."""
    with open("/proc/thread-self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def shared_shard(args, env: dict) -> int:
    """--shared-shard K (see the module docstring)."""
    k = args.shared_shard
    with tempfile.TemporaryDirectory() as root:
        url = expand_sources(write_shards(root, 1, args.shard_size, args.source_size))[0][0]
        shard_bytes = os.path.getsize(url)
        sources = {"local tar (seeks over the others' data)": url, "pipe:cat (streams)": f"pipe:cat {url}"}
        runs = {name: [] for name in sources}
        for _ in range(args.repeats):
            for name, source in sources.items():
                before, start, keys = bytes_taken_in(), time.perf_counter(), []
                for slot in range(k):
                    keys += [s["__key__"] for s in iter_tar_samples(source, Counter(),
                                                                    keep=lambda i, slot=slot: i % k == slot)]
                runs[name].append((bytes_taken_in() - before, time.perf_counter() - start))
                assert len(keys) == len(set(keys)) == args.shard_size, "every sample read once"
    rows = {name: {"bytes_read": statistics.median(b for b, _ in r),
                   "seconds": round(statistics.median(t for _, t in r), 4), "runs": [[b, round(t, 4)] for b, t in r]}
            for name, r in runs.items()}
    result = {"benchmark": "bench_resume --shared-shard", "environment": env,
              "load_average_1m_at_end": round(os.getloadavg()[0], 2), "config": vars(args) | {"out": None},
              "slots": k, "shard_samples": args.shard_size, "shard_bytes": shard_bytes, "rows": rows}
    out = args.out or os.path.join(RESULTS, "bench_resume_shared_shard_cpu")
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    table = "".join(f"| {name} | {row['bytes_read'] / 1e6:.2f} MB | {row['bytes_read'] / shard_bytes:.2f} | "
                    f"{row['seconds']:.3f} |\n" for name, row in rows.items())
    with open(out + ".md", "w") as f:
        f.write(f"# bench_resume --shared-shard (cpu)\n\n{env['device']}; commit {env['git_commit'][:10]}; "
                f"{env['time_utc']}; load average {env['load_average_1m']} at the start, "
                f"{result['load_average_1m_at_end']} at the end\n\n"
                f"{k} slots share one shard of {args.shard_size} samples ({args.source_size}px JPEGs and json "
                f"records, {shard_bytes / 1e6:.2f} MB, in the page cache); each slot reads its samples "
                f"(index % {k} == slot). Bytes: taken in by the reading thread, all slots together; seconds: "
                f"median of {args.repeats} alternating runs.\n\n"
                f"| shard read as | bytes read, {k} slots | / shard size | seconds, {k} slots |\n"
                f"|---|---|---|---|\n"
                f"{table}")
    print(json.dumps(result, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=120)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--consume", type=int, default=100_000, help="samples consumed before the resume")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=10_000)
    parser.add_argument("--source-size", type=int, default=256, help="JPEG side in the shards")
    parser.add_argument("--image-size", type=int, default=224, help="output crop of the timed starts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shared-shard", type=int, metavar="K", help="only measure K slots sharing one shard")
    parser.add_argument("--out", help="result path without extension (default: benchmarks/results/bench_resume_cpu, "
                                      "or bench_resume_shared_shard_cpu with --shared-shard)")
    args = parser.parse_args()
    if args.shared_shard:
        return shared_shard(args, environment("cpu"))
    args.out = args.out or os.path.join(RESULTS, "bench_resume_cpu")
    if args.consume > args.shards * args.shard_size:
        parser.error("--consume must stay inside one epoch (shards x shard-size)")

    env = environment("cpu")  # the commit that runs (and the load when it starts)
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        pattern = write_shards(root, args.shards, args.shard_size, args.source_size)
        written_s = time.perf_counter() - start
        cfg = DataConfig(train_data=pattern, image_size=args.image_size, context_length=32, workers=args.workers,
                         shuffle_buffer=args.shuffle_buffer, use_tags=False)
        tokenizer = ClipTokenizer(context_length=32)
        make = lambda cfg=cfg: build_train_loader(cfg, batch_size=args.batch_size, seed=0,  # noqa: E731
                                                  tokenizer=tokenizer)

        loader = make(dataclasses.replace(cfg, image_size=32))
        batches = -(-args.consume // args.batch_size)
        start = time.perf_counter()
        for _, _ in zip(range(batches), loader):
            pass
        consume_s = time.perf_counter() - start
        state = json.loads(json.dumps(loader.state_dict()))
        # fresh and resumed starts alternate, so that both meet the same load on a shared machine
        times = [(time_to_first_batch(make, None), time_to_first_batch(make, state)) for _ in range(args.repeats)]
        fresh_s, resumed_s = (statistics.median(column) for column in zip(*times))

    consumed = batches * args.batch_size
    refs = [ref for slot in state["slots"] for ref in slot["buffer"]]
    unbuffered = {**state, "slots": [{**slot, "buffer": []} for slot in state["slots"]]}
    bytes_per_ref = (len(json.dumps(state)) - len(json.dumps(unbuffered))) / max(1, len(refs))
    per_slot_fixed = len(json.dumps(unbuffered)) / len(state["slots"])
    # a preset's node: 8 ranks x 8 workers, a 10,000-sample buffer each (configs/vitb16-large.yaml)
    preset_rank_bytes = 8 * (per_slot_fixed + 10_000 * bytes_per_ref)
    result = {
        "benchmark": "bench_resume", "environment": env, "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "config": vars(args) | {"out": None},
        "shards_written_s": round(written_s, 2), "consumed_samples": consumed,
        "consume_s": round(consume_s, 2), "state_bytes": len(json.dumps(state)),
        "buffered_refs": len(refs), "buffer_shards_reentered": len({(r[0], r[2]) for r in refs}),
        "current_shards": len(state["slots"]), "bytes_per_buffered_ref": round(bytes_per_ref, 1),
        "state_bytes_per_slot_without_buffer": round(per_slot_fixed),
        "preset_state_bytes_per_rank": round(preset_rank_bytes), "preset_state_bytes_per_node": round(8 * preset_rank_bytes),
        "fresh_first_batch_s": round(fresh_s, 3), "resumed_first_batch_s": round(resumed_s, 3),
        "starts_s": [[round(f, 3), round(r, 3)] for f, r in times],
        "ratio": round(resumed_s / fresh_s, 3), "goal_ratio": GOAL,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"# bench_resume (cpu)\n\n{env['device']}; torch {env['torch']}; commit {env['git_commit'][:10]}; "
                f"{env['time_utc']}; load average {env['load_average_1m']} at the start, "
                f"{result['load_average_1m_at_end']} at the end (the machine is shared: above the core count "
                f"means contended numbers)\n\n"
                f"{args.shards} shards x {args.shard_size} samples on local disk ({args.source_size}px JPEGs, "
                f"{args.image_size}px crops), {args.workers} workers, batch {args.batch_size}, shuffle buffer "
                f"{args.shuffle_buffer}; median of {args.repeats} starts each, alternating (all: "
                f"{result['starts_s']}).\n\n"
                f"| start | time to first batch (s) |\n|---|---|\n"
                f"| fresh (0 consumed) | {fresh_s:.3f} |\n| resumed at {consumed:,} consumed | {resumed_s:.3f} |\n\n"
                f"Ratio {result['ratio']} (goal <= {GOAL}). Reaching that point took {consume_s:.1f} s of loading "
                f"at 32px crops, decoding included (the former loader re-read every one of those samples on resume, "
                f"without decoding them). The resume entered {len(state['slots'])} current "
                f"shard(s) at their byte offsets and {result['buffer_shards_reentered']} shard(s) holding the "
                f"{len(refs):,} buffered samples.\n\n"
                f"Loader state: {result['state_bytes']:,} bytes of JSON for this rank: "
                f"{result['state_bytes_per_slot_without_buffer']:,} per slot plus {bytes_per_ref:.0f} per buffered "
                f"sample. For a preset node (8 ranks x 8 workers x a 10,000-sample buffer): "
                f"{preset_rank_bytes / 1e6:.1f} MB per rank, {8 * preset_rank_bytes / 1e6:.1f} MB per node per "
                f"checkpoint; an elastic resume reads every saved rank's file.\n")
    print(json.dumps(result, indent=1))
    return 0 if result["ratio"] <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())

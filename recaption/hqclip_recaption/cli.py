"""``hqclip-recaption``: ``run`` captions raw shards; ``make-tiny-model`` writes an offline test model.

Scale-out: start one process per GPU (torchrun or srun); each takes its rank and world size from the
environment and captions a disjoint set of shards into the same output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .backends import BACKENDS, create_backend
from .budget import DEFAULT_MAX_ALT_TEXT_TOKENS
from .prompts import DEFAULT_PROMPT_VERSION, PROMPTS, get_prompt
from .schema import CaptionLimits, caption_schema


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="caption raw shards into OUTPUT/<shard>.jsonl")
    p.add_argument("--input", required=True, nargs="+", help="shard paths, brace patterns or globs")
    p.add_argument("--output", required=True, help="output directory (one jsonl per shard, summaries)")
    p.add_argument("--backend", choices=BACKENDS, default="vllm")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per generate call (default: 512 for vllm, 8 for transformers)")
    p.add_argument("--prompt-version", choices=sorted(PROMPTS), default=DEFAULT_PROMPT_VERSION)
    p.add_argument("--max-new-tokens", type=int, default=2048,
                   help="token budget per answer; an answer cut off by it becomes a 'truncated' error record")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-pixels", type=int, default=448 * 448, help="image pixel cap in the processor")
    p.add_argument("--max-alt-text-tokens", type=int, default=DEFAULT_MAX_ALT_TEXT_TOKENS,
                   help="alt-text longer than this is cut in the prompt (the record keeps it whole); lowered to "
                        "what fits in the model's context next to the template, image and max-new-tokens")
    p.add_argument("--max-description-chars", type=int, default=CaptionLimits.max_description_chars)
    p.add_argument("--max-tags", type=int, default=CaptionLimits.max_tags)
    p.add_argument("--max-tag-chars", type=int, default=CaptionLimits.max_tag_chars)
    p.add_argument("--rank", type=int, default=None, help="default: RANK or SLURM_PROCID, else 0")
    p.add_argument("--world-size", type=int, default=None, help="default: WORLD_SIZE or SLURM_NTASKS, else 1")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("transformers backend")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="auto", help="auto = bfloat16 on cuda, float32 on cpu")
    g = p.add_argument_group("vllm backend")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--max-model-len", type=int, default=4096,
                   help="engine context; the transformers backend uses the model's own")
    g.add_argument("--load-format", default="auto", help='"dummy" = random weights, for throughput tests')
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache size (default: --gpu-memory-utilization decides on a GPU; 1 GiB on the CPU)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no compilation or CUDA graphs: a faster engine start, slower generation")


def _run(args) -> int:
    from .runner import run_job
    from .shards import expand_shards
    from .startup import BackendStartupError

    schema = caption_schema(
        CaptionLimits(
            max_description_chars=args.max_description_chars, max_tags=args.max_tags, max_tag_chars=args.max_tag_chars
        )
    )
    try:
        shards = expand_shards(args.input)  # a wrong pattern must not wait for an engine to start
        backend = _create_backend(args, schema)
    except (BackendStartupError, ValueError, ImportError) as exc:  # a missing vLLM too: one line, no traceback
        print(f"hqclip-recaption: error: {exc}", file=sys.stderr)
        return 2
    batch_size = args.batch_size or (512 if args.backend == "vllm" else 8)
    try:
        summary = run_job(
            shards,
            args.output,
            backend,
            prompt_version=args.prompt_version,
            schema=schema,
            batch_size=batch_size,
            max_pixels=args.max_pixels,
            rank=args.rank,
            world_size=args.world_size,
        )
    finally:
        backend.close()
    print(json.dumps(summary, indent=2))
    return 1 if summary["shards_failed"] else 0


def _create_backend(args, schema: dict):
    from .runner import local_gpu

    common = dict(
        model=args.model,
        prompt=get_prompt(args.prompt_version),
        schema=schema,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        max_pixels=args.max_pixels,
        max_alt_text_tokens=args.max_alt_text_tokens,
        seed=args.seed,
    )
    gpu = local_gpu()
    if gpu is not None and (args.backend == "vllm" or args.device.startswith("cuda")):
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # one GPU per data-parallel process
    if args.backend == "transformers":
        return create_backend("transformers", device=args.device, dtype=args.dtype, **common)
    return create_backend(
        "vllm",
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        load_format=args.load_format,
        dtype=args.dtype,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enforce_eager=args.enforce_eager,
        **common,
    )


def _make_tiny_model(args) -> int:
    from .tiny_model import make_tiny_model

    path = make_tiny_model(args.dir, vocab_size=args.vocab_size, seed=args.seed)
    print(f"wrote a tiny random Qwen2-VL to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hqclip-recaption", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    p = sub.add_parser("make-tiny-model", help="write a tiny random Qwen2-VL (offline) to DIR")
    p.add_argument("dir")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _run(args) if args.command == "run" else _make_tiny_model(args)


if __name__ == "__main__":
    sys.exit(main())

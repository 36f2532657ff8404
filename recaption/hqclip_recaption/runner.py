"""The recaptioning job: stream this rank's shards, caption in batches, write one jsonl per shard.

Resumability: ``OUT/<shard>.jsonl`` is written to a temporary file and renamed into place when the shard is
complete, so its existence means "done". A rerun skips done shards without opening them for writing; a
killed run leaves at most a stale temporary file, which the rerun overwrites. Every input sample yields
exactly one record; samples that cannot be captioned carry ``error`` (a kind counted in the summary) and
``error_detail``.

A backend call that raises for one bad request (vLLM rejects a whole ``LLM.generate`` batch for one invalid
prompt) costs that sample only: the batch is split in halves and retried until every request that fails, fails
alone, and becomes a ``prompt_too_long`` or ``generation_error`` record. That holds only while the backend still
works: after the retries it must answer a request it answered before (the probe). If it cannot, or has never
answered one, the failure is not the samples' (engine dead, out of memory on anything) and the run stops with
``BackendFailure``, leaving the shard in progress unfinished for a rerun instead of filling it with errors.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from PIL import Image
from tqdm import tqdm

from .backends import Backend, CaptionRequest, Generation
from .budget import PromptAltText
from .schema import CAPTION_FIELDS, CaptionError, parse_caption
from .shards import RawSample, expand_shards, iter_shard, shard_name

log = logging.getLogger(__name__)


class BackendFailure(RuntimeError):
    """The backend fails on requests it answered before: the run cannot go on."""


def generation_error_kind(exc: Exception) -> str:
    """The error kind of a request the backend failed on alone."""
    # vLLM 0.33's words (its VLLMValidationError has no type of its own for this): "This model's maximum context
    # length is M tokens. However, your prompt contains N ..." when it tokenizes the prompt, and "The decoder
    # prompt (length N) is longer than the maximum model length of M." once the image tokens are in.
    message = str(exc)
    too_long = "maximum context length" in message or "maximum model length" in message
    return "prompt_too_long" if too_long else "generation_error"


def resolve_rank(rank: int | None = None, world_size: int | None = None, env=None) -> tuple[int, int]:
    """Rank and world size: explicit values (both or neither), else torchrun's RANK/WORLD_SIZE, else SLURM's
    SLURM_PROCID/SLURM_NTASKS, else a single process."""
    env = os.environ if env is None else env
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither, got rank={rank}, world_size={world_size}")
    if rank is None:
        rank, world_size = 0, 1
        for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_var in env and size_var in env:
                rank, world_size = int(env[rank_var]), int(env[size_var])
                break
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return rank, world_size


def local_gpu(env=None) -> str | None:
    """The CUDA_VISIBLE_DEVICES value that gives this process its own GPU, or None to leave it as it is.

    torchrun (LOCAL_RANK) and srun without per-task GPU binding (SLURM_LOCALID) start one process per GPU
    that all see every GPU; each must take the one of its local rank. A launcher that already left a
    single visible GPU (srun --gpus-per-task=1) is respected. Must be applied before CUDA is initialised.
    """
    env = os.environ if env is None else env
    local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
    if local is None:
        return None
    visible = env.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible is not None else None
    if devices is not None and len(devices) <= 1:
        return None
    index = int(local)
    if devices is None:
        return str(index)
    if index >= len(devices):
        raise ValueError(f"local rank {index} has no GPU: CUDA_VISIBLE_DEVICES={visible!r}")
    return devices[index]


def assign_shards(shards: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's shards: a round-robin slice of the sorted list, disjoint across ranks and covering it."""
    return sorted(shards)[rank::world_size]


@dataclass
class RunStats:
    rank: int
    world_size: int
    shards_assigned: int = 0
    shards_done: int = 0
    shards_skipped: int = 0  # finished by an earlier run
    shards_failed: int = 0  # unreadable tar: no output written, a rerun retries it
    samples: int = 0
    captioned: int = 0
    alt_text_truncated: int = 0  # samples whose alt-text was cut to the prompt budget (the record keeps it whole)
    alt_text_special_tokens: int = 0  # samples whose alt-text lost special-token strings in the prompt (likewise)
    alt_text_empty: int = 0  # samples captioned from the image alone (no alt-text, or nothing left of it)
    batches_retried: int = 0  # backend calls that raised and were split to find the failing requests
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    wall_seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        out = asdict(self)
        out["errors"] = dict(sorted(self.errors.items()))
        out["num_errors"] = sum(self.errors.values())
        out["images_per_s"] = self.samples / self.wall_seconds if self.wall_seconds else 0.0
        out["generated_tokens_per_s"] = self.generated_tokens / self.wall_seconds if self.wall_seconds else 0.0
        out["captioned_per_generation_s"] = (
            self.captioned / self.generation_seconds if self.generation_seconds else 0.0
        )
        return out


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode to RGB. A JPEG larger than ``max_pixels`` is decoded at a reduced DCT scale (1/2, 1/4, 1/8) that
    still keeps at least ``max_pixels``: the model's processor shrinks it to that budget anyway, and the
    reduced decode is several times faster and smaller in memory."""
    image = Image.open(io.BytesIO(data))
    if max_pixels is not None and image.width * image.height > max_pixels:
        scale = (max_pixels / (image.width * image.height)) ** 0.5
        image.draft("RGB", (max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    image.load()  # decode now: a truncated file must fail here, not inside the model's processor
    return image.convert("RGB")


def alt_text_flags(alt_text: PromptAltText) -> dict:
    """The record fields telling how the prompt's alt-text differs from the record's, present only when true."""
    flags = {
        "alt_text_truncated": alt_text.truncated,
        "alt_text_special_tokens": alt_text.special_tokens > 0,
        "alt_text_empty": not alt_text.text,  # captioned from the image alone
    }
    return {name: True for name, flag in flags.items() if flag}


@dataclass
class _Pending:
    """A sample on its way to the model."""

    request: CaptionRequest
    record_flags: dict  # alt_text_flags of the request's alt-text


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Recaptioner:
    """Captions shards with a backend. Reading and decoding of the next batch overlap with generation of the
    current one (one background thread), so slow storage or big JPEGs do not idle the accelerator."""

    def __init__(
        self,
        backend: Backend,
        *,
        prompt_version: str,
        schema: dict,
        batch_size: int = 8,
        max_pixels: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = backend
        self.prompt_version = prompt_version
        self.schema = schema
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self._probe: CaptionRequest | None = None  # the last request the backend answered

    def _record(self, sample: RawSample, **fields) -> dict:
        record = {"key": sample.key, "alt_text": sample.alt_text}
        record.update({name: None for name in CAPTION_FIELDS})
        record.update(model=self.backend.model_name, prompt_version=self.prompt_version)
        record.update(fields)
        return record

    def _error(self, sample: RawSample, kind: str, detail: str, **extra) -> dict:
        return self._record(sample, error=kind, error_detail=detail, **extra)

    def _prepare(self, sample: RawSample) -> dict | _Pending:
        """A model request, or the error record of a sample that cannot reach the model."""
        if sample.image is None:
            return self._error(sample, "missing_image", "no image member for this key")
        if sample.alt_text_error:
            return self._error(sample, "unreadable_alt_text", sample.alt_text_error)
        alt_text = self.backend.prompt_alt_text(sample.alt_text)
        flags = alt_text_flags(alt_text)
        try:
            image = decode_image(sample.image, self.max_pixels)
        except Exception as exc:  # PIL raises many types for broken files
            return self._error(sample, "unreadable_image", f"{type(exc).__name__}: {exc}", **flags)
        return _Pending(CaptionRequest(image=image, alt_text=alt_text.text), flags)

    def _next_prepared(self, batches: Iterator[list[RawSample]]):
        batch = next(batches, None)
        return None if batch is None else (batch, [self._prepare(sample) for sample in batch])

    def _generate(self, requests: list[CaptionRequest], stats: RunStats) -> list[Generation | Exception]:
        """The backend's answers in order; a request that fails on its own gets its exception instead."""
        try:
            generations = self.backend.generate(requests)
        except Exception as exc:  # whatever the backend raises; sorted out by the retries and the probe
            if len(requests) == 1:
                return [exc]
            stats.batches_retried += 1
            log.warning("a backend call of %d requests failed, retrying its halves: %s: %s",
                        len(requests), type(exc).__name__, exc)
            half = len(requests) // 2
            return self._generate(requests[:half], stats) + self._generate(requests[half:], stats)
        self._probe = requests[-1]
        return generations

    def _check_backend(self, failure: Exception) -> None:
        """Raise BackendFailure unless the backend still answers the last request it answered."""
        if self._probe is None:
            raise BackendFailure(
                f"the backend failed on every request so far ({type(failure).__name__}: {failure}); stopping"
            ) from failure
        try:
            self.backend.generate([self._probe])
        except Exception as exc:
            raise BackendFailure(
                f"the backend fails on a request it answered before ({type(exc).__name__}: {exc}), after "
                f"{type(failure).__name__}: {failure}; stopping, the shard in progress is left for a rerun"
            ) from exc

    def _caption(self, samples: list[RawSample], prepared: list, stats: RunStats) -> list[dict]:
        """Records for a prepared batch, in input order."""
        pending = [(i, item) for i, item in enumerate(prepared) if isinstance(item, _Pending)]
        start = time.perf_counter()
        generations = self._generate([item.request for _, item in pending], stats) if pending else []
        failures = [gen for gen in generations if isinstance(gen, Exception)]
        if failures:
            self._check_backend(failures[0])
        stats.generation_seconds += time.perf_counter() - start
        records = list(prepared)
        for (i, item), gen in zip(pending, generations, strict=True):
            extra = item.record_flags
            if isinstance(gen, Exception):
                kind = generation_error_kind(gen)
                records[i] = self._error(samples[i], kind, f"{type(gen).__name__}: {gen}", **extra)
                continue
            stats.generated_tokens += gen.num_tokens
            try:
                caption = parse_caption(gen.text, self.schema, truncated=not gen.finished)
            except CaptionError as exc:
                records[i] = self._error(samples[i], exc.kind, str(exc), raw_output=gen.text, **extra)
                continue
            records[i] = self._record(samples[i], **caption, **extra)
        return records

    def run_shard(self, path: str, out_path: str, stats: RunStats, progress: tqdm) -> bool:
        """Caption one shard into ``out_path``; returns False (and writes nothing) if the tar is unreadable."""
        tmp_path = out_path + ".tmp"
        shard_stats = RunStats(stats.rank, stats.world_size)
        batches = _batches(iter_shard(path), self.batch_size)
        try:
            with open(tmp_path, "w", encoding="utf-8") as out, ThreadPoolExecutor(1) as reader:
                upcoming = reader.submit(self._next_prepared, batches)
                while (item := upcoming.result()) is not None:  # re-raises the reader's tar errors here
                    upcoming = reader.submit(self._next_prepared, batches)
                    samples, prepared = item
                    for record in self._caption(samples, prepared, shard_stats):
                        if "error" in record:
                            shard_stats.errors[record["error"]] += 1
                        else:
                            shard_stats.captioned += 1
                        shard_stats.alt_text_truncated += record.get("alt_text_truncated", False)
                        shard_stats.alt_text_special_tokens += record.get("alt_text_special_tokens", False)
                        shard_stats.alt_text_empty += record.get("alt_text_empty", False)
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()  # the partial file shows the shard's progress (a rerun rewrites it anyway)
                    shard_stats.samples += len(samples)
                    progress.update(len(samples))
                out.flush()
                os.fsync(out.fileno())
        except (tarfile.TarError, EOFError) as exc:
            log.error("shard %s is unreadable, left for a rerun: %s", path, exc)
            os.unlink(tmp_path)
            return False
        finally:
            # Work done on a shard counts in the throughput even when its tar turns out broken halfway.
            for name in ("samples", "captioned", "alt_text_truncated", "alt_text_special_tokens", "alt_text_empty",
                         "batches_retried", "generated_tokens", "generation_seconds"):
                setattr(stats, name, getattr(stats, name) + getattr(shard_stats, name))
            stats.errors.update(shard_stats.errors)
        os.replace(tmp_path, out_path)
        return True

    def run(self, shards: list[str], output_dir: str, *, rank: int = 0, world_size: int = 1) -> dict:
        """Caption this rank's part of ``shards`` into ``output_dir``; returns (and writes) the summary."""
        names = [shard_name(s) for s in shards]
        duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
        if duplicates:
            raise ValueError(f"input shards share output names (file name without .tar): {duplicates[:5]}")
        os.makedirs(output_dir, exist_ok=True)
        mine = assign_shards(shards, rank, world_size)
        stats = RunStats(rank, world_size, shards_assigned=len(mine))
        start = time.perf_counter()
        progress = tqdm(desc=f"recaption rank {rank}", unit="img", dynamic_ncols=True)
        try:
            for path in mine:
                out_path = os.path.join(output_dir, shard_name(path) + ".jsonl")
                if os.path.exists(out_path):
                    stats.shards_skipped += 1
                    continue
                if self.run_shard(path, out_path, stats, progress):
                    stats.shards_done += 1
                else:
                    stats.shards_failed += 1
                progress.set_postfix(errors=sum(stats.errors.values()), shards=stats.shards_done)
        finally:
            progress.close()
        stats.wall_seconds = time.perf_counter() - start
        summary = stats.summary()
        summary.update(model=self.backend.model_name, prompt_version=self.prompt_version)
        summary_path = os.path.join(output_dir, f"summary-rank{rank}.json")
        with open(summary_path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(summary_path + ".tmp", summary_path)
        return summary


def run_job(input_pattern, output_dir: str, backend: Backend, **kwargs) -> dict:
    """Expand ``input_pattern`` and run; kwargs as in ``Recaptioner`` plus ``rank`` and ``world_size``."""
    rank, world_size = resolve_rank(kwargs.pop("rank", None), kwargs.pop("world_size", None))
    recaptioner = Recaptioner(backend, **kwargs)
    return recaptioner.run(expand_shards(input_pattern), output_dir, rank=rank, world_size=world_size)

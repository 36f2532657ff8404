"""DALI training loader: `fn.readers.webdataset` (with index files) -> decode + random-resized crop + normalize
on the GPU (`device="mixed"`), sharded by rank. The same pipeline definition runs on the CPU
(`dali_device="cpu"`, DALI's `device_id=None`), which is how the tests exercise it without a GPU.

Texts, tags and tokens are produced on the host from the `.json` member with the same rules as the CPU path.
A sample whose record is unusable is dropped and counted; its batch is refilled from the next pipeline run so
that every batch has exactly `batch_size` rows.

DALI's decoders cannot skip a corrupt image (the pipeline raises), and its reader drops a sample that lacks a
member without telling anyone. So the dirt is screened once, when `hqclip-data index` writes the index files
(`write_dali_index`), and the index lists only samples with a json member and an image DALI decodes without
raising (`screen_image` says how much work that takes per format). The samples left out, and shard-level
problems (a truncated tar still indexes every complete sample before the cut), are counted under the CPU path's
reason names in a sidecar `<shard>.skipped.json`; the loader adds them to stats() once, on rank 0 (they describe
the data set, found in one pass, not this rank's share of it; the reader-time record skips are counted each time
they are read).

Sampling. Without resampling, one pipeline per rank reads its 1/world_size of the samples (DALI's shard_id),
epoch after epoch. With `resampled=true` (open_clip's --dataset-resampled) each rank reads rounds: round r draws
max(1, shards // world_size) shards with replacement from (seed, rank, r), builds a pipeline on them and reads
as many samples as they hold (about one epoch over all ranks per round), then draws the next round. Every
pipeline is seeded by (seed, rank, round), so ranks neither crop alike nor shuffle alike.

Resume: DALI's own checkpointing (reader position and RNG states) plus the round and the position inside a
pipeline run; the per-sample text choices are seeded by (seed, rank, round, run, row), so resumed batches equal
uninterrupted ones.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image

from .config import OPENAI_MEAN, OPENAI_STD, DataConfig
from .loader import summarize
from .samples import IMAGE_EXTENSIONS, SkipSample, choose, read_record
from .shards import expand_sources, iter_tar_samples
from .tags import TagVocab
from .tokenizer import ClipTokenizer

STATE_VERSION = 2
INDEX_VERSION = "v1.2"  # DALI's webdataset index format (what its wds2idx writes)
# Image formats that both PIL and DALI's decoders read.
DALI_IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "PPM", "JPEG2000"})
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ImportError("decoder='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130); "
                          "use decoder='cpu' on machines without it") from e


def dali_index_path(shard: str, index_dir: str | None) -> str:
    """shard-000001.tar -> <index_dir or the shard's folder>/shard-000001.idx (what `hqclip-data index` writes)."""
    stem = os.path.splitext(os.path.basename(shard))[0] + ".idx"
    return os.path.join(index_dir or os.path.dirname(shard), stem)


def skipped_path(index_path: str) -> str:
    """shard-000001.idx -> shard-000001.skipped.json (the sidecar counting what the index left out)."""
    return os.path.splitext(index_path)[0] + ".skipped.json"


def _ends_with_eoi(jpeg: bytes) -> bool:
    """A JPEG's last marker, EOI, is at its end (zero padding allowed). FF D9 cannot occur inside entropy-coded
    data (a data FF is followed by 00), so a cut file almost never ends with it."""
    return jpeg[-1024:].rstrip(b"\x00").endswith(b"\xff\xd9")


def screen_image(data: bytes) -> None:
    """Raises SkipSample unless DALI's decoders read `data` without raising, doing only the work that takes:

    - every image: PIL parses its header (format, size): an HTML page, an empty or garbage file, an unsupported
      format is refused without decoding anything;
    - JPEG (most web images): its entropy-coded data is decoded at 1/8 scale (libjpeg's DCT scaling: every
      coefficient is Huffman-decoded, where DALI's libjpeg-turbo raises on a bad table or a cut file, but the
      full-size inverse DCT, upsampling and colour conversion are skipped). Header checks alone do not suffice:
      one flipped byte in the tables can parse fine and still make DALI raise (tests/test_data_index.py). A JPEG
      that does not end with EOI gets a full decode instead, which refuses a cut file and keeps trailing junk;
    - other formats (PNG, WebP, ...): a full decode, which checks what DALI's decoders would stumble on.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:  # parses the header only
            if img.format not in DALI_IMAGE_FORMATS:
                raise SkipSample("unsupported_image")
            if img.format in ("JPEG", "MPO") and _ends_with_eoi(data):
                img.draft("RGB", (1, 1))  # the smallest DCT scale, 1/8
            img.load()
    except SkipSample:
        raise
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise SkipSample("corrupt_image") from None


def _screen(raw: dict) -> tuple[str, str]:
    """(image ext, "json") of a sample DALI can read; raises SkipSample with the CPU path's reason otherwise."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if image_ext is None:
        raise SkipSample("missing_image")
    if "json" not in raw:
        raise SkipSample("missing_json")
    screen_image(raw[image_ext])
    return image_ext, "json"


def write_dali_index(shard: str, index_path: str) -> dict:
    """Write the DALI index of `shard` listing only its readable samples, and the sidecar counting the rest.

    Returns the sidecar: {"shard", "samples_indexed", "reasons": {reason: count}}.
    """
    try:
        with open(shard, "rb") as f:
            compressed = f.read(6).startswith(COMPRESSED_MAGIC)
    except OSError:
        compressed = False  # iter_tar_samples counts it as 'unreadable_shard'
    if compressed:  # the index holds offsets into the raw file
        raise ValueError(f"shard: DALI reads uncompressed tar only, {shard} is compressed")
    reasons: Counter = Counter()
    lines = []
    for raw in iter_tar_samples(shard, reasons, offsets=True):
        try:
            exts = _screen(raw)
        except SkipSample as e:
            reasons[e.reason] += 1
            continue
        # one "ext offset size name" group per member; names go without spaces (the format splits on them)
        lines.append(" ".join(f"{ext} {raw['__offsets__'][ext][0]} {raw['__offsets__'][ext][1]} "
                              f"{'_'.join(raw['__offsets__'][ext][2].split())}" for ext in exts))
    with open(index_path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))
    sidecar = {"shard": shard, "samples_indexed": len(lines), "reasons": dict(reasons)}
    with open(skipped_path(index_path), "w") as f:
        json.dump(sidecar, f)
    return sidecar


def build_dali_pipeline(files: list[str], index_files: list[str], *, batch_size: int, image_size: int,
                        scale: tuple[float, float], shard_id: int, num_shards: int, seed: int, shuffle_buffer: int,
                        device_id: int | None, num_threads: int = 2, checkpoint: str | None = None):
    """Outputs (images float CHW normalized, json bytes, source info); device_id=None runs it all on the CPU."""
    require_dali()
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  enable_checkpointing=True)
    def clip_pipeline():
        jpegs, records = fn.readers.webdataset(
            paths=files, index_paths=index_files, ext=[";".join(IMAGE_EXTENSIONS), "json"],
            # the index lists only complete samples: a missing member means a stale index, never a silent drop
            missing_component_behavior="error",
            random_shuffle=shuffle_buffer > 1, initial_fill=max(1, shuffle_buffer), shard_id=shard_id,
            num_shards=num_shards, seed=seed, name="reader")
        source = fn.get_property(jpegs, key="source_info")
        images = fn.decoders.image_random_crop(
            jpegs, device="cpu" if device_id is None else "mixed", output_type=types.RGB,
            random_area=list(scale), random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        images = fn.resize(images, size=[image_size, image_size], interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[m * 255 for m in OPENAI_MEAN], std=[s * 255 for s in OPENAI_STD])
        return images, records, source

    pipe = clip_pipeline(checkpoint=checkpoint) if checkpoint else clip_pipeline()
    pipe.build()
    return pipe


class DaliTrainLoader:
    """Same contract as TrainLoader (batch dict, state_dict/load_state_dict, stats); images live on the GPU."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 tokenizer: ClipTokenizer, tag_vocab: TagVocab | None):
        require_dali()
        sources = expand_sources(cfg.train_data)
        if len(sources) != 1:
            raise ValueError("train_data: the DALI path reads one source; use decoder='cpu' for weighted sources")
        files = sources[0]
        if any("://" in f for f in files):
            raise ValueError("train_data: DALI's webdataset reader needs local files, not URLs")
        index_files = [dali_index_path(f, cfg.dali_index_dir) for f in files]
        missing = [p for p in index_files + [skipped_path(p) for p in index_files] if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"DALI index files missing (run `hqclip-data index PATTERN`): {missing[:3]}")
        # what the index left out, counted in stats(); shards with no readable sample are not given to DALI
        self._index_reasons: Counter = Counter()
        self.files, self.index_files, self.shard_samples = [], [], []
        for shard, index in zip(files, index_files, strict=True):
            with open(skipped_path(index)) as f:
                sidecar = json.load(f)
            self._index_reasons.update(sidecar["reasons"])
            if sidecar["samples_indexed"]:
                self.files.append(shard)
                self.index_files.append(index)
                self.shard_samples.append(sidecar["samples_indexed"])
        if not self.files:
            raise ValueError(f"train_data: no readable sample in {cfg.train_data} "
                             f"(index skips: {dict(self._index_reasons)})")
        if cfg.dali_device not in ("gpu", "cpu"):
            raise ValueError(f"dali_device must be 'gpu' or 'cpu', got {cfg.dali_device!r}")
        if cfg.dali_device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("decoder='dali' with dali_device='gpu' needs a CUDA device; none is visible")
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.tokenizer, self.tag_vocab = tokenizer, tag_vocab
        self.device_id = torch.cuda.current_device() if cfg.dali_device == "gpu" else None
        self.batches = 0
        self.epoch = 0
        self._reasons: Counter = Counter()
        self._ok = 0
        # Resume point: (round, pipeline run number in that round, DALI checkpoint taken before that run, rows of
        # it already used). Without resampling there is one endless round.
        self._resume: tuple[int, int, bytes | str | None, int] = (0, 0, None, 0)

    @property
    def samples(self) -> int:
        return self.batches * self.batch_size

    def _round(self, round_: int) -> tuple[list[int], int | None]:
        """(indices into self.files, samples to read) of a round; None: endless (no resampling)."""
        if not self.cfg.resampled:
            return list(range(len(self.files))), None
        rng = np.random.default_rng([self.seed, self.rank, round_, 1])
        drawn = rng.integers(0, len(self.files), size=max(1, len(self.files) // self.world_size)).tolist()
        return drawn, sum(self.shard_samples[i] for i in drawn)

    def _pipeline(self, shards: list[int], round_: int, checkpoint: str | None):
        # DALI seeds are 64-bit ints: one per (seed, rank, round), so ranks do not crop or shuffle alike
        seed = int(np.random.SeedSequence([self.seed, self.rank, round_]).generate_state(1, np.uint64)[0] >> 1)
        shard_id, num_shards = (0, 1) if self.cfg.resampled else (self.rank, self.world_size)
        return build_dali_pipeline(
            [self.files[i] for i in shards], [self.index_files[i] for i in shards], batch_size=self.batch_size,
            image_size=self.cfg.image_size, scale=tuple(self.cfg.rrc_scale), shard_id=shard_id,
            num_shards=num_shards, seed=seed, shuffle_buffer=self.cfg.shuffle_buffer, device_id=self.device_id,
            num_threads=max(1, self.cfg.workers), checkpoint=checkpoint)

    def _to_torch(self, images) -> torch.Tensor:
        tensor = images.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tensor.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device_id))
        return out

    def _rows(self, round_: int, run: int, outputs, count: int) -> list[dict]:
        """Per row of the first `count` rows of a pipeline run: texts and tags, or {"skip": reason}."""
        rows: list[dict] = []
        for i in range(count):
            raw = {"json": np.array(outputs[1][i]).tobytes()}
            rng = np.random.default_rng([self.seed, self.rank, round_, run, i])
            try:
                record = read_record(raw, tuple(self.cfg.required_fields))
                pos = choose(record, "positive_description", "alt_text", self.cfg.p_description, rng.random())
                neg = choose(record, "negative_tags", "negative_description", self.cfg.p_neg_tags, rng.random())
                if not pos or (self.cfg.use_negatives and not neg):
                    raise SkipSample("empty_text")
            except SkipSample as e:
                rows.append({"skip": e.reason})
                continue
            source = np.array(outputs[2][i]).tobytes().decode("utf-8", errors="replace")
            tags = self.tag_vocab.encode(record.get("positive_tags") or [])[: self.cfg.max_tags] \
                if self.tag_vocab is not None and self.cfg.use_tags else []
            rows.append({"key": str(record.get("key") or source), "pos": pos, "neg": neg, "tags": tags})
        return rows

    def __iter__(self):
        round_, run, checkpoint, skip_rows = self._resume
        pending: list[tuple] = []  # ((round, run, checkpoint before that run, row index), row, image)
        while True:
            shards, round_samples = self._round(round_)
            pipe = self._pipeline(shards, round_, checkpoint)
            checkpoint = pipe.checkpoint()
            runs = None if round_samples is None else -(-round_samples // self.batch_size)
            while runs is None or run < runs:
                outputs = pipe.run()
                next_checkpoint = pipe.checkpoint()
                # a round's last run may wrap into the reader's next pass: rows past the round's samples are unused
                count = self.batch_size if runs is None else min(self.batch_size,
                                                                 round_samples - run * self.batch_size)
                rows, images = self._rows(round_, run, outputs, count), self._to_torch(outputs[0])
                for i in range(skip_rows, count):
                    if "skip" in rows[i]:
                        self._reasons[rows[i]["skip"]] += 1
                    else:
                        pending.append(((round_, run, checkpoint, i), rows[i], images[i]))
                skip_rows = 0
                run, checkpoint = run + 1, next_checkpoint
                if runs is None:
                    self.epoch = run * self.batch_size * self.world_size // max(1, pipe.epoch_size("reader"))
                else:
                    self.epoch = round_  # a round reads about one epoch's worth over all ranks
                while len(pending) >= self.batch_size:
                    batch, pending = pending[: self.batch_size], pending[self.batch_size:]
                    # resume point: the oldest row not yet emitted (or the next run when none is left over)
                    self._resume = pending[0][0] if pending else (round_, run, checkpoint, 0)
                    self._ok += self.batch_size
                    self.batches += 1
                    yield self._collate(torch.stack([p[2] for p in batch]), [p[1] for p in batch])
            del pipe  # the next round's pipeline replaces it
            round_, run, checkpoint = round_ + 1, 0, None

    def _collate(self, images: torch.Tensor, rows: list[dict]) -> dict:
        batch = {"images": images, "pos_tokens": self.tokenizer([r["pos"] for r in rows]),
                 "keys": [r["key"] for r in rows]}
        if self.cfg.use_negatives:
            batch["neg_tokens"] = self.tokenizer([r["neg"] for r in rows])
        if self.tag_vocab is not None and self.cfg.use_tags:
            tag_ids = torch.full((len(rows), max(1, max(len(r["tags"]) for r in rows))), -1, dtype=torch.long)
            for i, r in enumerate(rows):
                tag_ids[i, : len(r["tags"])] = torch.tensor(r["tags"], dtype=torch.long)
            batch["tag_ids"] = tag_ids
        return batch

    def stats(self) -> dict:
        reasons = Counter(self._reasons)
        if self.rank == 0:
            reasons.update(self._index_reasons)
        return summarize(reasons, self._ok)

    def state_dict(self) -> dict:
        round_, run, checkpoint, rows_used = self._resume
        return {"version": STATE_VERSION, "decoder": "dali", "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "resampled": self.cfg.resampled, "batches": self.batches,
                "epoch": self.epoch, "resume_round": round_, "resume_run": run, "rows_used": rows_used,
                # DALI's serialized checkpoint is bytes: base64 keeps the state JSON-friendly
                "resume_checkpoint": None if checkpoint is None else base64.b64encode(
                    checkpoint if isinstance(checkpoint, bytes) else checkpoint.encode()).decode(),
                "samples_ok": self._ok, "reasons": dict(self._reasons)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("decoder") != "dali":
            raise ValueError("state: not a DALI loader state of this version")
        mine = {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "resampled": self.cfg.resampled}
        for name, value in mine.items():
            if state[name] != value:
                raise ValueError(f"state: saved {name}={state[name]} but this loader has {value}")
        self.batches, self.epoch, self._ok = state["batches"], state["epoch"], state["samples_ok"]
        checkpoint = state["resume_checkpoint"]
        self._resume = (state["resume_round"], state["resume_run"],
                        None if checkpoint is None else base64.b64decode(checkpoint), state["rows_used"])
        self._reasons = Counter(state["reasons"])

"""DataConfig: every knob of the training data pipeline (the trainer nests it in its config tree)."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional  # noqa: UP035  (OmegaConf structured configs need typing generics)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class DataConfig:
    # Shards: one pattern, or several joined by "::" (open_clip's convention), each a local path, a brace
    # pattern (shard-{000000..000099}.tar) or an fsspec URL (s3://, gs://, https://, pipe:cmd).
    train_data: str = ""
    # Sampling weight per "::"-separated source (None: equal weights).
    train_data_weights: Optional[List[float]] = None  # noqa: UP006, UP045
    # Resampled: shards drawn with replacement per worker (open_clip's --dataset-resampled); else each epoch
    # visits every shard once, split across ranks and workers without overlap.
    resampled: bool = False
    image_size: int = 224
    context_length: int = 77
    workers: int = 2
    prefetch_factor: int = 2
    # Shuffle buffer of raw (still encoded) samples, per loader worker: at most shuffle_buffer samples and, in
    # the CPU loader, at most shuffle_buffer_mib MiB of their bytes (0: no byte bound). Host memory per node:
    # ranks x workers x shuffle_buffer_mib. The DALI loader holds shuffle_buffer samples per rank (its reader's
    # initial_fill), bounded in samples only.
    shuffle_buffer: int = 1000
    shuffle_buffer_mib: float = 512.0
    pin_memory: bool = False
    # The CPU loader's images: False: float32, normalized (OpenAI mean/std) in the collate; True: uint8 pixels
    # that the train step normalizes on its device (no float pass per pixel on the CPU, a quarter of the bytes
    # to copy). The DALI loader normalizes on the GPU either way.
    normalize_on_device: bool = False
    decoder: str = "cpu"  # "cpu" (PIL in DataLoader workers) | "dali" (GPU decode; nvidia-dali needed)
    dali_device: str = "gpu"  # "gpu" (device="mixed" decode) | "cpu" (DALI's CPU-only mode, for tests)
    dali_index_dir: Optional[str] = None  # noqa: UP045  (index files from `hqclip-data index`; None: beside shards)
    # Remote shards (pipe:, fsspec URLs): a failed read is retried from the failed byte up to source_retries
    # times, the n-th retry after source_retry_backoff_s * 2**n seconds (at most 60), then the shard is given up
    # and counted ('source_failed'); every failure is counted ('source_error') and logged.
    source_retries: int = 3
    source_retry_backoff_s: float = 1.0
    # Text sampling (HQ-CLIP): positive = positive_description with probability p_description, else alt_text;
    # negative = ", ".join(negative_tags) with probability p_neg_tags, else negative_description.
    # A chosen field that is absent falls back to the other one.
    p_description: float = 0.5
    p_neg_tags: float = 0.5
    use_negatives: bool = True
    use_tags: bool = True  # emit tag_ids (needs a TagVocab)
    # Fields a sample must have (non-empty) to be used; others are optional. Plain CLIP on raw shards:
    # required_fields=[] with use_negatives=false (the alt text then also comes from a .txt member).
    required_fields: List[str] = field(default_factory=list)  # noqa: UP006
    rrc_scale: List[float] = field(default_factory=lambda: [0.9, 1.0])  # noqa: UP006
    max_tags: int = 32  # tag_ids width cap per sample
    # Annotations joined while reading (hqclip_fast.data.annotations; `hqclip-data join` writes the same into the
    # shards instead): a folder of files named after the shards (X.tar <-> X.json/.jsonl/.parquet) or an index
    # from `hqclip-data annotations index` (.sqlite). A sample's id is annotation_id_field of its .json (img2dataset
    # writes uid), else its tar key; an annotation's id is annotation_key_field (default: uid, key, id or
    # sample_id); annotation_map names fields beyond the known synonyms (ours -> theirs).
    annotations: Optional[str] = None  # noqa: UP045
    annotation_id_field: str = "uid"
    annotation_key_field: Optional[str] = None  # noqa: UP045
    annotation_map: Dict[str, str] = field(default_factory=dict)  # noqa: UP006

    def validate(self) -> None:
        if self.decoder not in ("cpu", "dali"):
            raise ValueError(f"decoder must be 'cpu' or 'dali', got {self.decoder!r}")
        if self.annotations and self.decoder == "dali":
            raise ValueError("annotations (joined while reading) work with decoder 'cpu'; for DALI, write them into "
                             "the shards with `hqclip-data join` first")
        if self.dali_device not in ("gpu", "cpu"):
            raise ValueError(f"dali_device must be 'gpu' or 'cpu', got {self.dali_device!r}")
        for name in ("p_description", "p_neg_tags"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("image_size", "context_length", "prefetch_factor", "max_tags"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.workers < 0 or self.shuffle_buffer < 0 or self.shuffle_buffer_mib < 0:
            raise ValueError("workers, shuffle_buffer and shuffle_buffer_mib must be >= 0")
        if self.source_retries < 0 or self.source_retry_backoff_s < 0:
            raise ValueError("source_retries and source_retry_backoff_s must be >= 0")
        if len(self.rrc_scale) != 2 or not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ValueError(f"rrc_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.rrc_scale}")

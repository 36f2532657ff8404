"""The training config: one tree of dataclasses, read from a YAML preset plus dotted `key=value` overrides.

OmegaConf's structured configs do the parsing and type checking; a key that the tree does not have, or a value
of the wrong type, is a ValueError naming the key. The data section is the data pipeline's own `DataConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hqclip_fast.data.config import DataConfig
from hqclip_fast.optim import WEIGHT_DECAY_RULES
from hqclip_fast.schedule import SCHEDULES


@dataclass
class ModelConfig:
    name: str = "hqclip-tiny"  # open_clip config name (ViT-B-16, ...) or an hqclip-* CPU config
    # create_model keyword overrides: image_size, context_length, attn_backend, pack_text, vision_cfg, text_cfg...
    overrides: dict[str, Any] = field(default_factory=dict)
    # Weights to start from (hqclip_fast.pretrained): a file (.safetensors, a state dict or an open_clip_train
    # epoch_N.pt, read with weights_only), a folder holding one, hf-hub:org/name, or an open_clip pretrained tag
    # of model.name ("openai", ...); positional embeddings are resized to data.image_size / context_length.
    pretrained: str | None = None
    cache_dir: str | None = None  # Hugging Face cache for hf-hub: and tags (open_clip's --cache-dir)
    # Locking (LiT), open_clip's semantics: a locked tower trains only its last unlocked groups / layers; frozen
    # parameters get no optimizer state. lock_image_freeze_bn_stats: a locked ResNet's BatchNorm keeps its statistics.
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    # Tag vocabulary (tags.json from `hqclip-data tags build` or the synthetic set): the size of the short-tag
    # head and the ids the loader emits. Used when loss.stc_weight > 0.
    tag_vocab: str | None = None
    # Start the tag head's bias at -log V (each tag's probability 1/(V+1)) instead of nn.Linear's near-zero
    # init, where the V absent tags of every image would add V * log 2 to a summed tag loss and swamp the rest
    # for thousands of steps (RetinaNet's prior init, Lin et al. 2017).
    tag_bias_prior: bool = True


@dataclass
class LossConfig:
    """HQ-CLIP loss weights; plain CLIP is hni_weight=0, stc_weight=0 (and data without negatives/tags)."""

    hni_weight: float = 0.0
    stc_weight: float = 0.0
    # "sum_over_tags": the tag BCE summed over the vocabulary and averaged over samples, so stc_weight keeps its
    # strength whatever the vocabulary size; "mean_over_tags" also divides by V (hqclip_fast.loss.STC_REDUCTIONS).
    stc_reduction: str = "sum_over_tags"
    negatives_in_softmax: bool = True
    impl: str = "auto"  # "auto" | "reference" | "chunked" | "triton"
    # Several ranks: "auto" (cost model, hqclip_fast/loss/exchange.py) | "ring" (impl=triton) | "all_gather"
    exchange: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    # Which parameters decay (hqclip_fast.optim): "open_clip" (open_clip_train's rule: ndim >= 2, not norms,
    # biases or the logit scale; embeddings decay) or "skip_embeddings" (also no decay on *embedding*).
    weight_decay_rule: str = "open_clip"
    # Gradient accumulation (open_clip's --accum-freq): each step trains on accum_freq batches of batch_size per
    # rank with the loss over all of them (exact: hqclip_fast.train.TrainStep); steps count optimizer steps.
    accum_freq: int = 1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 0
    schedule: str = "cosine"  # after the warmup: "cosine" | "const" | "const-cooldown" (open_clip's)
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio (open_clip's cosine: 0)
    # const-cooldown: the last cooldown_steps decay from lr to cooldown_end_lr as (1 - progress) ** cooldown_power
    cooldown_steps: int = 0
    cooldown_power: float = 1.0
    cooldown_end_lr: float = 0.0


@dataclass
class ParallelConfig:
    param_dtype: str = "fp32"  # "fp32" | "bf16" (bf16 parameters and compute, fp32 reduction: FSDP2 policy)
    activation_checkpointing: bool = False
    compile: bool = False
    # HSDP (torchtitan's names): dp_replicate x dp_shard = the ranks. 0 = default: shard within a node
    # (LOCAL_WORLD_SIZE ranks) and replicate across nodes. dp_replicate=1: plain FSDP over all ranks.
    dp_replicate: int = 0
    dp_shard: int = 0
    sync_batchnorm: bool = False  # BatchNorm statistics over all ranks (open_clip's --use-bn-sync; GPU only)


@dataclass
class CheckpointConfig:
    # Where checkpoints go: null = <run_dir>/checkpoints, or any folder or fsspec URL (s3://bucket/run, gs://...,
    # file://...; the protocol's fsspec package, e.g. s3fs or gcsfs, must be installed).
    folder: str | None = None
    every_steps: int = 1000  # also written at the last step; 0 = only at the last step
    keep_last: int = 2
    resume: bool = True  # continue from the latest complete checkpoint under <run_dir>/checkpoints
    # Write checkpoints in the background (training goes on; a second save waits for the first).
    async_save: bool = True
    # Several ranks: how often they vote on a preemption signal (in the background; a signal stops the run at
    # most this many steps + 1 after it arrived, see hqclip_fast.preemption).
    preemption_vote_every: int = 10


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = only at the end
    # `hqclip-data synthetic` manifest: its zero-shot and hard-negative sets are evaluated.
    synthetic_manifest: str | None = None
    # User data: zero-shot shards (key.cls) or an image folder (one sub-folder per class) ...
    zeroshot: str | None = None
    classnames: str | None = None  # text file, one class name per line (default for folders: folder names)
    templates: str | None = None  # text file, one prompt per line with {} for the class name
    # ... and image-text shards (key.json with positive_text/negative_text, or annotation records).
    image_text: str | None = None
    batch_size: int = 256


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    # Weights & Biases (the wandb extra; open_clip's --report-to wandb); WANDB_MODE=offline logs without a network.
    wandb: bool = False
    wandb_project: str = "hqclip-fast"
    wandb_name: str | None = None  # the run's display name (default: wandb's)
    wandb_notes: str = ""
    progress_bar: bool = True


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # metrics, TensorBoard, checkpoints and the resolved config go here
    seed: int = 0
    steps: int = 1000
    batch_size: int = 64  # per rank and micro-batch; the global batch is batch_size * world_size * accum_freq
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda"
    cpu_threads: int = 0  # torch.set_num_threads on CPU; 0 leaves torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _config_error(err: OmegaConfBaseException, source: str, key: str = "?") -> ValueError:
    key = getattr(err, "full_key", None) or key
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    return ValueError(f"config key '{key}' ({source}): {message}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check: bool = True) -> TrainConfig:
    """Defaults <- YAML preset at `path` <- `key=value` overrides (dotted keys, YAML values).

    Keys and types are always checked; check=False skips the checks across fields (`validate`), for a preset
    that a caller completes afterwards."""
    merged = OmegaConf.structured(TrainConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: no such file {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _config_error(err, str(path)) from None
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"config override {override!r} must look like key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as err:
            raise _config_error(err, f"override {override!r}", override.split("=", 1)[0]) from None
    cfg: TrainConfig = OmegaConf.to_object(merged)
    if check:
        validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks across fields that types alone do not catch."""
    checks = [
        (cfg.steps >= 1, "steps", "must be >= 1"),
        (cfg.batch_size >= 1, "batch_size", "must be >= 1"),
        (cfg.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda"),
        (cfg.optim.lr > 0, "optim.lr", "must be > 0"),
        (cfg.optim.accum_freq >= 1, "optim.accum_freq", "must be >= 1"),
        (cfg.model.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups", "must be >= 0"),
        (cfg.model.lock_text_unlocked_layers >= 0, "model.lock_text_unlocked_layers", "must be >= 0"),
        (len(cfg.optim.betas) == 2, "optim.betas", "must have two values"),
        (0 <= cfg.optim.warmup_steps <= cfg.steps, "optim.warmup_steps", "must be in [0, steps]"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0"),
        (cfg.optim.schedule in SCHEDULES, "optim.schedule", f"must be one of {list(SCHEDULES)}"),
        (cfg.optim.schedule != "const-cooldown" or 1 <= cfg.optim.cooldown_steps <= cfg.steps,
         "optim.cooldown_steps", "must be in [1, steps] for optim.schedule=const-cooldown"),
        (cfg.optim.cooldown_power > 0, "optim.cooldown_power", "must be > 0"),
        (cfg.optim.cooldown_end_lr >= 0, "optim.cooldown_end_lr", "must be >= 0"),
        (cfg.optim.weight_decay_rule in WEIGHT_DECAY_RULES, "optim.weight_decay_rule",
         f"must be one of {sorted(WEIGHT_DECAY_RULES)}"),
        (cfg.parallel.param_dtype in ("fp32", "bf16"), "parallel.param_dtype", "must be fp32 or bf16"),
        (cfg.parallel.dp_replicate >= 0, "parallel.dp_replicate", "must be >= 0 (0 = default)"),
        (cfg.parallel.dp_shard >= 0, "parallel.dp_shard", "must be >= 0 (0 = default)"),
        (cfg.loss.exchange in ("auto", "ring", "all_gather"), "loss.exchange", "must be auto, ring or all_gather"),
        (cfg.loss.hni_weight >= 0, "loss.hni_weight", "must be >= 0"),
        (cfg.loss.stc_weight >= 0, "loss.stc_weight", "must be >= 0"),
        (cfg.loss.stc_reduction in ("sum_over_tags", "mean_over_tags"), "loss.stc_reduction",
         "must be sum_over_tags or mean_over_tags"),
        (cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1"),
        (cfg.checkpoint.preemption_vote_every >= 1, "checkpoint.preemption_vote_every", "must be >= 1"),
        (cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0"),
        (cfg.log.every_steps >= 1, "log.every_steps", "must be >= 1"),
    ]
    for ok, key, rule in checks:
        if not ok:
            raise ValueError(f"config key '{key}' {rule}")
    # Loss terms need their inputs from the data.
    if cfg.loss.hni_weight > 0 and not cfg.data.use_negatives:
        raise ValueError("config key 'loss.hni_weight' > 0 needs data.use_negatives=true")
    if cfg.loss.stc_weight > 0 and not (cfg.data.use_tags and cfg.model.tag_vocab):
        raise ValueError("config key 'loss.stc_weight' > 0 needs data.use_tags=true and model.tag_vocab")
    try:
        cfg.data.validate()
    except ValueError as err:
        raise ValueError(f"config section 'data': {err}") from None
    for key, data_key in (("image_size", "image_size"), ("context_length", "context_length")):
        if key in cfg.model.overrides and cfg.model.overrides[key] != getattr(cfg.data, data_key):
            raise ValueError(f"config key 'model.overrides.{key}'={cfg.model.overrides[key]} disagrees with "
                             f"'data.{data_key}'={getattr(cfg.data, data_key)}; set data.{data_key} only")


def num_tags(cfg: TrainConfig) -> int:
    """Size of the short-tag head: the tag vocabulary's when the run trains STC, else 0 (no head)."""
    if cfg.loss.stc_weight <= 0:
        return 0
    from hqclip_fast.data.tags import TagVocab

    return len(TagVocab.load(cfg.model.tag_vocab))


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """create_model overrides of a run: the image size and context length follow the data section."""
    return {**cfg.model.overrides, "image_size": cfg.data.image_size, "context_length": cfg.data.context_length}


def checkpoint_folder(cfg: TrainConfig) -> str | Path:
    """The run's checkpoint folder: checkpoint.folder (a path or an fsspec URL), else <run_dir>/checkpoints."""
    return cfg.checkpoint.folder or Path(cfg.run_dir) / "checkpoints"


def save_run_config(cfg: TrainConfig, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config a training run saved in its folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"run_dir: {run_dir} has no config.yaml (is it a training run folder?)")
    return load_config(path)

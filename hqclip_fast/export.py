"""`hqclip-export`: a training checkpoint -> a consolidated open_clip checkpoint.

The output folder holds:
- `open_clip_pytorch_model.bin` (torch.save, the default) or `open_clip_model.safetensors` (`--format
  safetensors`): the full state dict under open_clip's key names (tag head dropped); this is what
  `open_clip.create_model_and_transforms(name, pretrained=<that file>)` loads for a built-in open_clip name;
- `open_clip_config.json`: {"model_cfg", "preprocess_cfg"}, so `create_model_and_transforms("local-dir:<folder>")`
  also works, for any architecture;
- `<model name>.json`: the bare model config, for `open_clip.add_model_config(<that file>)` when the name is not
  one of open_clip's built-ins (the `hqclip-*` CPU configs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hqclip_fast.checkpoint import latest_checkpoint, load_model_weights
from hqclip_fast.config import TrainConfig, checkpoint_folder, load_run_config, model_kwargs, num_tags
from hqclip_fast.model import CLIP, create_model
from hqclip_fast.parallelize import one_dim_logit_scale_
from hqclip_fast.serialization import save_weights

# The names open_clip looks for first in a `local-dir:` folder.
WEIGHTS_FILES = {"bin": "open_clip_pytorch_model.bin", "safetensors": "open_clip_model.safetensors"}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def open_clip_model_config(model: CLIP) -> dict:
    """The model's config in open_clip's JSON layout (our runtime-only options left out)."""
    cfg = model.config.to_dict()
    return {key: cfg[key] for key in ("embed_dim", "quick_gelu", "vision_cfg", "text_cfg")}


def export_open_clip(model: CLIP, model_name: str, out_dir: str | Path, weights_format: str = "bin") -> Path:
    """Write `model` (plain, unsharded) as an open_clip checkpoint folder; returns the weights file.
    `weights_format`: "bin" (torch.save) or "safetensors"."""
    if weights_format not in WEIGHTS_FILES:
        raise ValueError(f"weights_format must be one of {sorted(WEIGHTS_FILES)}, got {weights_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().float().cpu().contiguous() for k, v in model.open_clip_state_dict().items()}
    weights = out_dir / WEIGHTS_FILES[weights_format]
    save_weights(state_dict, weights)
    model_cfg = open_clip_model_config(model)
    preprocess_cfg = {
        "size": model_cfg["vision_cfg"]["image_size"],
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (out_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    (out_dir / f"{model_name}.json").write_text(json.dumps(model_cfg, indent=2))
    return weights


def model_from_run(cfg: TrainConfig) -> CLIP:
    """A plain model with the architecture of the run (tag head included when the run trained one), its logit
    scale 1-D as the trainer's parallelize step makes it, so that checkpoints load as saved."""
    model = create_model(cfg.model.name, num_tags=num_tags(cfg), **model_kwargs(cfg))
    one_dim_logit_scale_(model)
    return model


def load_trained_model(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[CLIP, TrainConfig]:
    """The model of a training run (its latest checkpoint unless `checkpoint` is given), on the CPU."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    folder = checkpoint_folder(cfg)
    path = checkpoint if checkpoint else latest_checkpoint(folder)
    if path is None:
        raise ValueError(f"run_dir: no complete checkpoint under {folder}")
    model = model_from_run(cfg)
    load_model_weights(path, model)
    return model.eval(), cfg


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hqclip-export", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="training run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoints/step_XXXXXXXX folder (default: latest)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", choices=sorted(WEIGHTS_FILES), default="bin",
                        help=f"weights file: {WEIGHTS_FILES['bin']} (torch.save, default) or {WEIGHTS_FILES['safetensors']}")
    args = parser.parse_args(argv)
    model, cfg = load_trained_model(args.run, args.checkpoint)
    weights = export_open_clip(model, cfg.model.name, args.out, args.format)
    print(json.dumps({"weights": str(weights), "model": cfg.model.name, "local_dir": f"local-dir:{args.out}"}))


if __name__ == "__main__":
    cli()

"""Recipes of open_clip_train in hqclip-fast: config keys for schedules, weight decay, locking, accumulation."""

import pytest

from hqclip_fast.config import load_config


@pytest.mark.parametrize("override, key", [
    ("optim.weight_decay_rule=embeddings", "optim.weight_decay_rule"),
    ("optim.schedule=linear", "optim.schedule"),
    ("optim.schedule=const-cooldown", "optim.cooldown_steps"),  # cooldown_steps left at 0
    ("optim.cooldown_power=0", "optim.cooldown_power"),
    ("optim.cooldown_end_lr=-1", "optim.cooldown_end_lr"),
    ("optim.accum_freq=0", "optim.accum_freq"),
    ("model.lock_text_unlocked_layers=-1", "model.lock_text_unlocked_layers"),
])
def test_bad_recipe_settings_name_the_key(override, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config(None, [override])


def test_recipe_defaults_are_open_clip_trains():
    cfg = load_config(None, [])
    assert cfg.optim.weight_decay_rule == "open_clip" and cfg.optim.schedule == "cosine"
    assert (cfg.optim.cooldown_power, cfg.optim.cooldown_end_lr) == (1.0, 0.0)  # --lr-cooldown-power/-end


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from hqclip_fast.data.synthetic import write_synthetic

    return write_synthetic(str(tmp_path_factory.mktemp("synthetic")), num_samples=64, shard_size=32, seed=2,
                           image_size=32, num_zeroshot=12, num_hardneg=8)


def run_overrides(synthetic, run_dir, steps=4):
    return [f"run_dir={run_dir}", f"steps={steps}", "batch_size=4", "device=cpu", "cpu_threads=1", "seed=5",
            "model.name=hqclip-micro", f"data.train_data={synthetic['train']}", "data.image_size=32",
            "data.context_length=36", "data.workers=0", "data.shuffle_buffer=8", "loss.impl=reference",
            "checkpoint.every_steps=0", "log.every_steps=1", "log.progress_bar=false", "log.tensorboard=false"]


def logged(run_dir, key):
    from hqclip_fast.metrics import read_metrics

    return [r[key] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_trainer_follows_the_configured_schedule(synthetic, tmp_path):
    from hqclip_fast.train import train

    train(load_config(None, run_overrides(synthetic, tmp_path, steps=6) + [
        "optim.lr=0.2", "optim.warmup_steps=1", "optim.schedule=const-cooldown", "optim.cooldown_steps=2",
        "optim.cooldown_end_lr=0.1"]))
    assert logged(tmp_path, "lr") == pytest.approx([0.2, 0.2, 0.2, 0.2, 0.2, 0.15])


def test_trainer_accumulates_micro_batches(synthetic, tmp_path):
    from hqclip_fast.train import train

    summary = train(load_config(None, run_overrides(synthetic, tmp_path, steps=2) + [
        "optim.accum_freq=3", f"model.tag_vocab={synthetic['tags']}", "loss.hni_weight=1", "loss.stc_weight=1"]))
    assert summary["global_batch_size"] == 12 and summary["steps"] == 2
    assert all(value > 0 for value in logged(tmp_path, "stc"))


def _tokens_into_transformer(tower, images):
    seen = []
    handle = tower.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    tower(images)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("rate", [0.5, 0.75, 0.99])
def test_patch_dropout_keeps_open_clips_token_count_in_training_only(rate):
    import torch
    from test_model_openclip import open_clip_model

    from hqclip_fast.model import create_model

    images = torch.randn(3, 3, 32, 32)
    torch.manual_seed(0)
    ours = create_model("hqclip-micro", patch_dropout=rate)
    plain = create_model("hqclip-micro")
    plain.load_state_dict(ours.state_dict())  # no parameter of its own: open_clip state dicts still match
    theirs = open_clip_model("hqclip-micro", patch_dropout=rate)
    # 16 patches + the class token; open_clip's batch-first tower, token count on dim 1
    assert _tokens_into_transformer(ours.visual.train(), images) == \
        (3, 1 + max(1, int(16 * (1 - rate))), 64) == tuple(_tokens_into_transformer(theirs.visual.train(), images))
    assert not torch.allclose(ours.encode_image(images), plain.encode_image(images))
    ours.eval()
    assert _tokens_into_transformer(ours.visual, images)[1] == 17
    torch.testing.assert_close(ours.encode_image(images), plain.encode_image(images))


def test_patch_dropout_keeps_the_class_token():
    import torch

    from hqclip_fast.model import create_model

    model = create_model("hqclip-micro", patch_dropout=0.5).train()
    seen = []
    handle = model.visual.ln_pre.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.encode_image(torch.randn(2, 3, 32, 32))
    handle.remove()
    cls = model.visual.class_embedding + model.visual.positional_embedding[0]
    torch.testing.assert_close(seen[0][:, 0], cls.expand(2, -1))
    with pytest.raises(ValueError, match="patch_dropout"):
        create_model("hqclip-rn-micro", patch_dropout=0.5)


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from hqclip_fast.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"log.wandb=true needs the wandb package: pip install 'hqclip-fast\[wandb\]'"):
        MetricsLogger(tmp_path, enabled=False, wandb={"project": "p"})


def test_wandb_offline_logs_every_record_and_resumes_the_same_run(synthetic, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb (the optional 'wandb' extra) is not installed")
    from hqclip_fast.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged_steps = []
    original = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, **kwargs):
        logged_steps.append((step, data["train/loss"]))
        return original(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    overrides = run_overrides(synthetic, tmp_path, steps=2) + ["log.wandb=true", "log.wandb_project=test"]
    train(load_config(None, overrides))
    train(load_config(None, overrides + ["steps=3"]))  # resumes from the checkpoint at step 2
    assert [(step, loss) for step, loss in logged_steps] == list(zip([1, 2, 3], logged(tmp_path, "loss")))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2 and all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs)


def test_finetune_preset_starts_from_open_clips_openai_vit_l_14(tmp_path, monkeypatch):
    from pathlib import Path

    import huggingface_hub.constants

    from hqclip_fast.pretrained import resolve_pretrained

    preset = Path(__file__).resolve().parent.parent / "configs" / "vitl14-openai-finetune.yaml"
    cfg = load_config(preset, ["model.tag_vocab=tags.json"])
    assert (cfg.model.name, cfg.model.pretrained, cfg.loss.hni_weight, cfg.loss.stc_weight) == \
        ("ViT-L-14-quickgelu", "openai", 1.0, 1.0)
    assert cfg.steps * cfg.batch_size * 64 == pytest.approx(1.0e9, rel=1e-4)  # one pass over VLM-1B on 64 GPUs
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"timm/vit_large_patch14_clip_224\.openai"):
        resolve_pretrained(cfg.model.pretrained, cfg.model.name, str(tmp_path))

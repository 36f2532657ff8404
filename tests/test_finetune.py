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

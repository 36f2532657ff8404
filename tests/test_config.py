"""The training config: presets parse, overrides apply, bad keys and values are errors that name the key."""

from pathlib import Path

import pytest

from hqclip_fast.config import TrainConfig, load_config, load_run_config, model_kwargs, save_run_config
from hqclip_fast.data.config import DataConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ["demo.yaml", "vitb16-large.yaml", "vitl14-xlarge.yaml"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_parse(preset):
    cfg = load_config(CONFIGS / preset, ["model.tag_vocab=tags.json"])
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.data, DataConfig)
    assert cfg.steps > 0 and cfg.batch_size > 0


def test_presets_follow_their_scale():
    large = load_config(CONFIGS / "vitb16-large.yaml", ["model.tag_vocab=tags.json"])
    assert (large.model.name, large.data.image_size, large.parallel.param_dtype) == ("ViT-B-16", 224, "bf16")
    assert large.steps * large.batch_size * 32 == pytest.approx(1.28e9, rel=1e-3)  # 32 ranks
    xlarge = load_config(CONFIGS / "vitl14-xlarge.yaml", ["model.tag_vocab=tags.json"])
    assert xlarge.model.name == "ViT-L-14" and xlarge.parallel.activation_checkpointing
    assert xlarge.steps * xlarge.batch_size * 352 == pytest.approx(12.8e9, rel=1e-3)  # 352 ranks


def test_overrides_take_yaml_values_and_win_over_the_preset():
    cfg = load_config(CONFIGS / "demo.yaml", ["steps=70", "optim.betas=[0.8,0.9]", "data.p_description=0.25",
                                             "model.overrides.pack_text=true", "loss.hni_weight=0",
                                             "model.tag_vocab=t.json"])
    assert cfg.steps == 70 and cfg.optim.betas == [0.8, 0.9] and cfg.data.p_description == 0.25
    assert cfg.loss.hni_weight == 0.0 and cfg.loss.stc_weight == 5.0  # untouched preset value
    assert model_kwargs(cfg) == {"pack_text": True, "image_size": 64, "context_length": 36}


def test_defaults_without_a_preset():
    cfg = load_config(None, [])
    assert cfg == TrainConfig()


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1e-3", "optim.lrr"),              # mistyped key
    ("data.p_descripton=0.3", "data.p_descripton"),  # mistyped key in the data helper's section
    ("nonsense=1", "nonsense"),                   # unknown top-level key
    ("steps=many", "steps"),                      # wrong type
    ("loss.hni_weight=[1,2]", "loss.hni_weight"),  # wrong type
    ("model=3", "model"),                         # a section replaced by a value
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config(CONFIGS / "demo.yaml", ["model.tag_vocab=t.json", override])


def test_bad_key_in_a_yaml_file_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"'optim.learning_rate'.*bad.yaml"):
        load_config(bad)


@pytest.mark.parametrize("overrides, key", [
    (["steps=0"], "steps"),
    (["optim.warmup_steps=20", "steps=10"], "optim.warmup_steps"),
    (["optim.lr=0"], "optim.lr"),
    (["parallel.param_dtype=fp16"], "parallel.param_dtype"),
    (["loss.stc_weight=1"], "loss.stc_weight"),             # STC without a tag vocabulary
    (["loss.hni_weight=1", "data.use_negatives=false"], "loss.hni_weight"),  # HNI without negatives
    (["model.overrides.image_size=96"], "model.overrides.image_size"),  # disagrees with data.image_size
    (["device=tpu"], "device"),
    (["loss.stc_reduction=mean"], "loss.stc_reduction"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config(None, overrides)


def test_data_section_is_validated_by_its_owner():
    with pytest.raises(ValueError, match="data.*p_description"):
        load_config(None, ["data.p_description=1.5"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["steps"])
    with pytest.raises(ValueError, match="no such file"):
        load_config("does/not/exist.yaml")


def test_run_config_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["model.tag_vocab=t.json", "steps=111"])
    save_run_config(cfg, tmp_path)
    assert load_run_config(tmp_path) == cfg
    with pytest.raises(ValueError, match="config.yaml"):
        load_run_config(tmp_path / "elsewhere")

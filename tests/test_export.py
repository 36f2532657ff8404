"""hqclip-export: a training checkpoint becomes an open_clip checkpoint that open_clip itself loads."""

import json

import open_clip
import pytest
import torch

from hqclip_fast.checkpoint import Checkpointer
from hqclip_fast.config import load_config, save_run_config
from hqclip_fast.export import cli as export_cli
from hqclip_fast.export import export_open_clip, model_from_run
from hqclip_fast.optim import build_optimizer

MODEL = "hqclip-micro"


# A ViT and a ResNet image tower (whose BatchNorm running statistics must be exported too), with image sizes.
@pytest.fixture(scope="module", params=[("hqclip-micro", 32), ("hqclip-rn-micro", 64)], ids=lambda p: p[0])
def trained_run(request, tmp_path_factory):
    """A run folder as the trainer leaves it: config.yaml and a DCP checkpoint of a model with a tag head."""
    name, size = request.param
    run = tmp_path_factory.mktemp("run")
    tags = run / "tags.json"
    tags.write_text(json.dumps({"tags": ["red", "blue", "cube"], "counts": [3, 2, 1]}))
    cfg = load_config(None, [f"model.name={name}", f"data.image_size={size}", "data.context_length=20",
                             "loss.stc_weight=1.0", f"model.tag_vocab={tags}", f"run_dir={run}"])
    save_run_config(cfg, run)
    torch.manual_seed(0)
    model = model_from_run(cfg)
    assert model.tag_head is not None and model.logit_scale.shape == (1,)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    out = model(torch.randn(4, 3, size, size), torch.randint(1, 1000, (4, 20)))  # train mode: BatchNorm stats move
    (out["image_features"] * out["text_features"]).sum().mul(out["logit_scale"]).backward()
    opt.step()  # weights move away from their init: the export must carry trained values
    with torch.no_grad():
        model.logit_scale.fill_(3.3)
    Checkpointer(run / "checkpoints").save(1, model, opt, {})
    return run, model.eval(), name, size


def test_export_loads_in_open_clip_by_name_and_matches(trained_run, tmp_path, capsys):
    run, model, name, size = trained_run
    export_cli(["--run", str(run), "--out", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    assert printed["weights"] == str(weights)

    exported_cfg = json.loads((tmp_path / f"{name}.json").read_text())
    assert isinstance(exported_cfg["vision_cfg"]["layers"], list if name == "hqclip-rn-micro" else int)
    open_clip.add_model_config(tmp_path / f"{name}.json")  # not a built-in open_clip name
    oc_model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    oc_model.eval()
    assert float(oc_model.logit_scale.detach()) == pytest.approx(3.3)
    torch.manual_seed(1)
    images, tokens = torch.randn(3, 3, size, size), torch.randint(1, 49000, (3, 20))
    tokens[:, -1] = 49407  # an end-of-text token: open_clip pools at the argmax id
    with torch.no_grad():
        torch.testing.assert_close(oc_model.encode_image(images), model.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(oc_model.encode_text(tokens), model.encode_text(tokens), rtol=1e-4, atol=1e-5)
    # open_clip's eval transform is sized from the exported config.
    assert preprocess.transforms[0].size in (size, [size], (size, size))


def test_export_loads_through_open_clip_local_dir(trained_run, tmp_path):
    run, model, _, _ = trained_run
    export_cli(["--run", str(run), "--out", str(tmp_path)])
    oc_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    expected = model.open_clip_state_dict()
    got = oc_model.state_dict()
    assert set(expected) <= set(got)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = load_config(None, [f"model.name={MODEL}", "data.image_size=32"])
    save_run_config(cfg, tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        export_cli(["--run", str(tmp_path), "--out", str(tmp_path / "out")])


def test_safetensors_export_loads_in_open_clip_by_name_and_local_dir(trained_run, tmp_path):
    run, model, name, _ = trained_run
    export_cli(["--run", str(run), "--out", str(tmp_path), "--format", "safetensors"])
    weights = tmp_path / "open_clip_model.safetensors"
    assert weights.exists() and not (tmp_path / "open_clip_pytorch_model.bin").exists()
    open_clip.add_model_config(tmp_path / f"{name}.json")
    by_name, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    local_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    for key, value in model.open_clip_state_dict().items():
        assert torch.equal(by_name.state_dict()[key], value), key
        assert torch.equal(local_dir.state_dict()[key], value), key
    with pytest.raises(ValueError, match="weights_format"):
        export_open_clip(model, name, tmp_path, "pickle")

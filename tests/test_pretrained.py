"""model.pretrained: every form of checkpoint an open_clip user has, made here by open_clip itself (no download)."""


import open_clip
import pytest
import torch
from test_model_openclip import open_clip_model, randomize_

from hqclip_fast.config import load_config
from hqclip_fast.model import create_model
from hqclip_fast.pretrained import load_pretrained, resolve_pretrained
from hqclip_fast.serialization import UnsafeFileError, save_weights

NAME = "hqclip-micro"


@pytest.fixture(scope="module")
def theirs():
    """open_clip's CLIP with hqclip-micro's architecture and non-trivial weights."""
    torch.manual_seed(0)
    model = open_clip_model(NAME)
    randomize_(model, seed=1)
    return model


def assert_loaded(ours, theirs):
    got, want = ours.open_clip_state_dict(), theirs.state_dict()
    assert set(got) <= set(want)
    for key, value in got.items():
        assert torch.equal(value, want[key].reshape(value.shape)), key


def open_clip_train_checkpoint(model, path, epoch=3):
    """What open_clip_train/main.py saves as epoch_N.pt under DDP: epoch, name, module.-prefixed state dict and the
    optimizer's state (after one AdamW step, so it holds moments)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.logit_scale.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.save({"epoch": epoch, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, path)


def test_open_clip_train_checkpoint(theirs, tmp_path):
    model = open_clip_model(NAME)
    model.load_state_dict(theirs.state_dict())
    path = tmp_path / "epoch_3.pt"
    open_clip_train_checkpoint(model, path)
    ours = create_model(NAME)
    assert load_pretrained(ours, str(path), NAME) == path
    assert_loaded(ours, model)


@pytest.mark.parametrize("filename", ["weights.bin", "weights.pt", "weights.safetensors"])
def test_bare_state_dict_and_safetensors(theirs, tmp_path, filename):
    save_weights({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / filename)
    ours = create_model(NAME)
    load_pretrained(ours, str(tmp_path / filename), NAME)
    assert_loaded(ours, theirs)


def hub_cache(root, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache as huggingface_hub lays it out: refs/main names the snapshot holding the files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, state in files.items():
        save_weights(state, snapshot / name)
    return snapshot


def test_open_clip_pytorch_model_bin_from_a_hub_cache(theirs, tmp_path):
    snapshot = hub_cache(tmp_path, "org/tiny-clip", {"open_clip_pytorch_model.bin": theirs.state_dict()})
    for spec in ("hf-hub:org/tiny-clip", str(snapshot), f"local-dir:{snapshot}"):
        ours = create_model(NAME)
        assert load_pretrained(ours, spec, NAME, cache_dir=str(tmp_path)) == snapshot / "open_clip_pytorch_model.bin"
        assert_loaded(ours, theirs)


def test_hub_cache_prefers_safetensors_as_open_clip_does(theirs, tmp_path):
    snapshot = hub_cache(tmp_path, "org/tiny-clip", {
        "open_clip_pytorch_model.bin": {k: torch.zeros_like(v) for k, v in theirs.state_dict().items()},
        "open_clip_model.safetensors": {k: v.contiguous() for k, v in theirs.state_dict().items()}})
    assert resolve_pretrained("hf-hub:org/tiny-clip", NAME, str(tmp_path)) == snapshot / "open_clip_model.safetensors"
    assert resolve_pretrained(str(snapshot), NAME) == snapshot / "open_clip_model.safetensors"


def test_pretrained_tag_resolves_through_open_clips_table_to_the_cache(tmp_path):
    """`openai` for ViT-B-32-quickgelu is, in open_clip's table, timm/vit_base_patch32_clip_224.openai on the hub."""
    repo = open_clip.get_pretrained_cfg("ViT-B-32-quickgelu", "openai")["hf_hub"].strip("/")
    snapshot = hub_cache(tmp_path, repo, {"open_clip_pytorch_model.bin": {"x": torch.zeros(1)}})
    assert resolve_pretrained("openai", "ViT-B-32-quickgelu", str(tmp_path)) == \
        snapshot / "open_clip_pytorch_model.bin"


def test_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=rf"open_clip_pytorch_model\.bin.*org/absent.*{tmp_path}.*offline"):
        resolve_pretrained("hf-hub:org/absent", NAME, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"vit_base_patch32_clip_224\.openai.*{tmp_path}.*offline"):
        resolve_pretrained("openai", "ViT-B-32-quickgelu", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"not an open_clip pretrained tag of ViT-B-32.*openai"):
        resolve_pretrained("no-such-file-or-tag", "ViT-B-32", str(tmp_path))


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript archive")
def test_torchscript_archive_is_refused_without_running_it(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(UnsafeFileError, match="TorchScript"):
        load_pretrained(create_model(NAME), str(path), NAME)


def test_positional_embeddings_resized_as_open_clip_resizes_them(theirs, tmp_path):
    """Weights of a 32 px, 36-token model into a 48 px, 20-token one (grid 4 -> 6): our embeddings equal those
    open_clip's own load_checkpoint makes for an open_clip model of the new size."""
    path = tmp_path / "small.bin"
    save_weights(theirs.state_dict(), path)
    bigger = open_clip_model(NAME, image_size=48, context_length=20)
    open_clip.load_checkpoint(bigger, str(path))
    ours = create_model(NAME, image_size=48, context_length=20)
    load_pretrained(ours, str(path), NAME)
    assert ours.visual.positional_embedding.shape == (37, 64) and ours.text.positional_embedding.shape == (20, 64)
    assert_loaded(ours, bigger)
    assert not torch.equal(ours.visual.positional_embedding[1:17], theirs.visual.positional_embedding[1:])


def test_trainer_builds_its_model_from_model_pretrained(theirs, tmp_path):
    from hqclip_fast.runtime import Runtime
    from hqclip_fast.train import build_model

    path = tmp_path / "epoch_1.pt"
    model = open_clip_model(NAME)
    model.load_state_dict(theirs.state_dict())
    open_clip_train_checkpoint(model, path, epoch=1)
    cfg = load_config(None, [f"model.name={NAME}", f"model.pretrained={path}", "data.image_size=32",
                             "data.context_length=77"])
    ours = build_model(cfg, Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert_loaded(ours, model)


def test_tag_trained_with_quick_gelu_warns_on_a_plain_gelu_model(tmp_path):
    """open_clip warns when a tag's activation differs from the model's; so do we (before loading anything)."""
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    hub_cache(tmp_path, repo, {"open_clip_pytorch_model.bin": {"x": torch.zeros(1)}})
    with torch.device("meta"):
        plain = create_model("ViT-B-32")
    with pytest.warns(UserWarning, match="quick_gelu=True but the model has quick_gelu=False"), \
            pytest.raises(ValueError, match="does not match the model"):
        load_pretrained(plain, "openai", "ViT-B-32", str(tmp_path))


def test_hqclip_eval_resolves_pretrained_as_training_does(theirs, tmp_path):
    """hqclip-eval --pretrained takes the forms model.pretrained takes: here hf-hub: from a hub cache, with the
    architecture file hqclip-export writes beside the weights."""
    from argparse import Namespace

    from hqclip_fast.eval import _load_model

    snapshot = hub_cache(tmp_path, "org/tiny-clip", {"open_clip_pytorch_model.bin": theirs.state_dict()})
    args = Namespace(run=None, model=NAME, pretrained="hf-hub:org/tiny-clip", cache_dir=str(tmp_path),
                     image_size=None)
    model, image_size, _ = _load_model(args)
    assert_loaded(model, theirs)
    (snapshot / f"{NAME}.json").write_text('{"image_size": 48}')
    model, image_size, _ = _load_model(args)
    assert image_size == 48  # the exported architecture; the positional embedding resized as open_clip does

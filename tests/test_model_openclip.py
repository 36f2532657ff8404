"""hqclip_fast.model against open_clip: config shapes, state-dict round trip, embedding equality."""

import dataclasses
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from hqclip_fast.model import create_model, get_config, list_models, load_open_clip_state_dict

REQUIRED = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu",
            "RN50", "RN101", "RN50x4", "RN50-quickgelu", "RN101-quickgelu"]
EOT = 49407


def open_clip_model(name, **overrides):
    """open_clip's CLIP built from our config numbers (for the hqclip-* configs that open_clip lacks)."""
    cfg = get_config(name, **overrides)
    return open_clip.model.CLIP(
        embed_dim=cfg.embed_dim, quick_gelu=cfg.quick_gelu,
        vision_cfg=dataclasses.asdict(cfg.vision_cfg), text_cfg=dataclasses.asdict(cfg.text_cfg),
    )


def randomize_(model, seed):
    """Fresh non-trivial values for every weight (LayerNorm and BatchNorm gains and biases included) and for the
    BatchNorm running statistics (so eval mode does not just normalize by mean 0, variance 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))


def random_tokens(batch, length, seed, vocab=49408):
    """Start token, random words, EOT at a random position (some at the last slot), zero padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    lengths[0] = length
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = EOT - 1
        tokens[i, 1 : n - 1] = torch.randint(1, vocab - 2, (n - 2,), generator=g)
        tokens[i, n - 1] = EOT
    return tokens


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_required_names_listed():
    names = list_models()
    for name in REQUIRED + ["hqclip-tiny", "hqclip-micro", "hqclip-rn-micro"]:
        assert name in names


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith("hqclip")])
def test_state_dict_shapes_equal_open_clip(name):
    # Meta tensors: full-size configs without allocating their weights.
    with torch.device("meta"):
        ours = create_model(name)
        theirs = open_clip.create_model(name, pretrained=None, device="meta")
    got = {k: tuple(v.shape) for k, v in ours.open_clip_state_dict().items()}
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert got == want
    assert type(ours.text.transformer.resblocks[0].mlp.gelu).__name__ == \
        type(theirs.transformer.resblocks[0].mlp.gelu).__name__
    assert type(ours.visual).__name__ == type(theirs.visual).__name__  # VisionTransformer or ModifiedResNet


@pytest.mark.parametrize("name,overrides", [
    ("hqclip-micro", {}),
    ("hqclip-micro", {"vision_cfg": {"pool_type": "avg"}}),
    ("hqclip-tiny", {"context_length": 32}),
    ("hqclip-tiny", {"quick_gelu": True, "image_size": 48}),
    ("hqclip-rn-micro", {}),
    ("hqclip-rn-micro", {"quick_gelu": True, "image_size": 96, "vision_cfg": {"layers": [2, 1, 3, 1]}}),
])
def test_embeddings_equal_open_clip_both_directions(name, overrides):
    theirs = open_clip_model(name, **overrides).eval()
    randomize_(theirs, seed=1)
    ours = create_model(name, **overrides).eval()
    load_open_clip_state_dict(ours, theirs.state_dict())

    size = ours.config.vision_cfg.image_size
    images = torch.randn(3, 3, size, size)
    tokens = random_tokens(5, ours.config.text_cfg.context_length, seed=2)
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), theirs.encode_image(images)) <= 1e-4
        assert rel_err(ours.encode_text(tokens), theirs.encode_text(tokens)) <= 1e-4
        assert rel_err(ours.encode_text(tokens, packed=True), theirs.encode_text(tokens)) <= 1e-4

    # And back: our weights (perturbed again) load strictly into open_clip and still agree.
    randomize_(ours, seed=3)
    theirs.load_state_dict(ours.open_clip_state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), theirs.encode_image(images)) <= 1e-4
        assert rel_err(ours.encode_text(tokens), theirs.encode_text(tokens)) <= 1e-4


def test_resnet_train_mode_matches_open_clip_outputs_gradients_and_running_stats():
    # Train mode: BatchNorm normalizes by the batch statistics and updates its running statistics.
    theirs = open_clip_model("hqclip-rn-micro").train()
    randomize_(theirs, seed=4)
    ours = load_open_clip_state_dict(create_model("hqclip-rn-micro").train(), theirs.state_dict())
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    a, b = ours.encode_image(images), theirs.encode_image(images)
    assert rel_err(a, b) <= 1e-4
    grads_a = dict(zip([n for n, _ in ours.visual.named_parameters()],
                       torch.autograd.grad(a.square().sum(), list(ours.visual.parameters()))))
    grads_b = dict(zip([n for n, _ in theirs.visual.named_parameters()],
                       torch.autograd.grad(b.square().sum(), list(theirs.visual.parameters()))))
    assert grads_a.keys() == grads_b.keys()
    # The key bias gets a gradient of zero up to rounding (softmax ignores a shift shared by all keys): the
    # tolerance has a floor relative to the largest gradient.
    largest = max(g.abs().max() for g in grads_b.values())
    for name, grad in grads_b.items():
        assert (grads_a[name] - grad).abs().max() <= 1e-3 * grad.abs().max() + 1e-5 * largest, name
    theirs_sd = theirs.state_dict()
    for key, value in ours.open_clip_state_dict().items():
        if "running_" in key or "num_batches" in key:
            torch.testing.assert_close(value, theirs_sd[key], msg=key)


def test_fresh_resnet_starts_like_open_clip():
    # open_clip's init: every bottleneck's last BatchNorm gain is zero; attention-pool projections scaled.
    model = create_model("hqclip-rn-micro")
    for stage in model.visual.stages:
        for block in stage:
            assert torch.count_nonzero(block.bn3.weight) == 0
    pool = model.visual.attnpool
    assert pool.positional_embedding.shape == (2 * 2 + 1, 16 * 32)
    assert 0.5 < pool.q_proj.weight.std().item() * 512**0.5 < 1.5
    assert model.config.vision_cfg.heads == 16 * 32 // 64


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_takes_bf16_gain_and_bias_like_nn_batch_norm(momentum):
    # What FSDP2 mixed precision hands the layer: bf16 activations, gain and bias; fp32 running statistics.
    from hqclip_fast.model.resnet import BatchNorm2d

    g = torch.Generator().manual_seed(8)
    ours, ref = BatchNorm2d(5, momentum=momentum), torch.nn.BatchNorm2d(5, momentum=momentum)
    weight, bias = torch.randn(5, generator=g).bfloat16(), torch.randn(5, generator=g).bfloat16()
    ours.weight, ours.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
    with torch.no_grad():
        ref.weight.copy_(weight.float()), ref.bias.copy_(bias.float())
    x = (2 + 3 * torch.randn(6, 5, 7, 9, generator=g)).bfloat16()
    for _ in range(2):  # train mode: batch statistics, running statistics updated
        got = ours(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref(x.float()), atol=2e-2, rtol=1e-2)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), msg=name)
    got = ours.eval()(x)
    torch.testing.assert_close(got.float(), ref.eval()(x.float()), atol=2e-2, rtol=1e-2)
    got.float().sum().backward()
    assert ours.weight.grad.dtype == torch.bfloat16 and ours.weight.grad.abs().sum() > 0


def test_full_vit_b_32_round_trip():
    theirs = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    ours = load_open_clip_state_dict(create_model("ViT-B-32").eval(), theirs.state_dict())
    images = torch.randn(2, 3, 224, 224)
    tokens = open_clip.tokenize(["a photo of a red cube", "two dogs playing in the snow near a wooden fence"])
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), theirs.encode_image(images)) <= 1e-4
        assert rel_err(ours.encode_text(tokens), theirs.encode_text(tokens)) <= 1e-4
        out = ours(images, tokens)
        ref = theirs(images, tokens)
    assert rel_err(out["image_features"], ref[0]) <= 1e-4
    assert rel_err(out["text_features"], ref[1]) <= 1e-4
    assert torch.allclose(out["logit_scale"], ref[2])
    fresh = open_clip.create_model("ViT-B-32", pretrained=None)
    fresh.load_state_dict(ours.open_clip_state_dict(), strict=True)


def test_full_rn50_image_tower_round_trip():
    # The text tower is the ViT models' (tested above); this covers full-size stages, strides and 32 heads.
    theirs = open_clip.create_model("RN50", pretrained=None).eval()
    randomize_(theirs.visual, seed=7)  # live residual branches (bn3 gains start at 0), non-trivial BN stats
    ours = load_open_clip_state_dict(create_model("RN50").eval(), theirs.state_dict())
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), theirs.encode_image(images)) <= 1e-4
    open_clip.create_model("RN50", pretrained=None).load_state_dict(ours.open_clip_state_dict(), strict=True)


def test_load_is_strict_and_names_keys():
    model = create_model("hqclip-micro")
    sd = model.open_clip_state_dict()
    missing = {k: v for k, v in sd.items() if k != "visual.ln_post.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['visual.ln_post.bias'\]"):
        load_open_clip_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['logit_bias'\]"):
        load_open_clip_state_dict(model, {**sd, "logit_bias": torch.zeros(())})
    bad = {**sd, "text_projection": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="text_projection"):
        load_open_clip_state_dict(model, bad)


def test_load_accepts_training_checkpoint_and_attn_mask():
    src = create_model("hqclip-micro")
    sd = src.open_clip_state_dict()
    sd["attn_mask"] = torch.zeros(77, 77)  # derived buffer some open_clip checkpoints hold
    checkpoint = {"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}
    dst = load_open_clip_state_dict(create_model("hqclip-micro"), checkpoint)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_forward_contract_with_tags_and_negatives():
    torch.manual_seed(0)
    model = create_model("hqclip-micro", num_tags=7)
    images = torch.randn(4, 3, 32, 32)
    texts, negs = random_tokens(4, 20, seed=5), random_tokens(4, 20, seed=6)
    out = model(images, texts, negs)
    assert out["logit_scale"].shape == ()
    assert torch.allclose(out["logit_scale"], model.logit_scale.exp())
    for key in ("image_features", "text_features", "neg_text_features"):
        assert out[key].shape == (4, 64)
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out["text_features"], F.normalize(model.encode_text(texts), dim=-1), atol=1e-6)
    assert torch.allclose(out["neg_text_features"], F.normalize(model.encode_text(negs), dim=-1), atol=1e-6)
    assert out["tag_features"] is out["image_features"]
    assert torch.equal(out["tag_weight"], model.tag_head.weight) and torch.equal(out["tag_bias"], model.tag_head.bias)
    assert out["tag_weight"].shape == (7, 64) and out["tag_bias"].shape == (7,)
    assert not any(k.startswith("tag_head") for k in model.open_clip_state_dict())
    # Gradients reach both towers, the temperature and the tag head.
    (out["tag_features"] @ out["tag_weight"].T + out["tag_bias"]).sum().backward()
    out = model(images, texts)
    assert out["neg_text_features"] is None and "tag_weight" in out
    loss = (out["image_features"] * out["text_features"]).sum() * out["logit_scale"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tag_bias_starts_at_the_prior_unless_asked_not_to():
    torch.manual_seed(0)
    prior = create_model("hqclip-micro", num_tags=50).tag_head.bias
    assert torch.allclose(prior, torch.full((50,), -math.log(50)))
    torch.manual_seed(0)
    linear = create_model("hqclip-micro", num_tags=50, tag_bias_prior=False).tag_head.bias
    assert linear.abs().max() <= 1 / math.sqrt(64) and linear.std() > 0  # nn.Linear's uniform init


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model name 'ViT-X'"):
        create_model("ViT-X")
    with pytest.raises(ValueError, match="unknown model override 'widht'"):
        create_model("hqclip-micro", widht=3)
    with pytest.raises(ValueError, match="attn_backend"):
        create_model("hqclip-micro", attn_backend="magic")
    with pytest.raises(ValueError, match="unsupported vision_cfg"):
        create_model("hqclip-micro", vision_cfg={"ls_init_value": 0.1})
    with pytest.raises(ValueError, match="pool_type must be one of"):
        create_model("hqclip-micro", vision_cfg={"pool_type": "max"})
    with pytest.raises(ValueError, match=r"vision_cfg.layers must be .* list of 4"):
        create_model("hqclip-rn-micro", vision_cfg={"layers": [1, 1, 1]})
    with pytest.raises(ValueError, match="vision_cfg.image_size must be a multiple of 32"):
        create_model("hqclip-rn-micro", image_size=48)
    with pytest.raises(ValueError, match="vision_cfg.patch_size must be None for a ResNet"):
        create_model("hqclip-rn-micro", patch_size=16)
    with pytest.raises(ValueError, match="vision_cfg.patch_size must be a positive int for a ViT"):
        create_model("hqclip-micro", patch_size=None)
    with pytest.raises(ValueError, match="images must have shape"):
        create_model("hqclip-rn-micro").encode_image(torch.zeros(2, 3, 32, 32))
    model = create_model("hqclip-micro", context_length=16)
    with pytest.raises(ValueError, match="context_length 16"):
        model.encode_text(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="images must have shape"):
        model.encode_image(torch.zeros(2, 3, 48, 48))

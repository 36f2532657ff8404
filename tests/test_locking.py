"""Locked and partly locked towers (LiT) with open_clip's semantics, on one process and under FSDP2."""

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from dist_helpers import gloo_group
from test_model_openclip import open_clip_model, random_tokens

from hqclip_fast.model import create_model, load_open_clip_state_dict
from hqclip_fast.optim import build_optimizer


def trainable(model, open_clip_names=True):
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n[len("text."):] if open_clip_names and n.startswith("text.") else n for n in names}


def locked_pair(name, image=None, text=None, freeze_bn_stats=False):
    ours, theirs = create_model(name), open_clip_model(name)
    if image is not None:
        ours.lock_image_tower(image, freeze_bn_stats)
        theirs.lock_image_tower(image, freeze_bn_stats)
    if text is not None:
        ours.lock_text_tower(text)
        theirs.lock_text_tower(text)
    return ours, theirs


@pytest.mark.parametrize("name,image,text", [
    ("hqclip-micro", 0, None), ("hqclip-micro", 1, None), ("hqclip-micro", 2, None), ("hqclip-micro", 3, None),
    ("hqclip-micro", 4, None), ("hqclip-micro", 9, None), ("hqclip-micro", None, 0), ("hqclip-micro", None, 1),
    ("hqclip-micro", None, 2), ("hqclip-micro", None, 3), ("hqclip-micro", None, 9), ("hqclip-micro", 2, 2),
    ("hqclip-rn-micro", 0, None), ("hqclip-rn-micro", None, 2), ("hqclip-rn-micro", 0, 1),
])
def test_trainable_parameters_equal_open_clips(name, image, text):
    ours, theirs = locked_pair(name, image, text)
    assert trainable(ours) == trainable(theirs)


def test_trainable_lists_per_model_family():
    """The lists themselves, for one partial lock of each tower (hqclip-micro: 2 blocks per tower)."""
    vit, _ = locked_pair("hqclip-micro", image=2, text=2)
    block = {"ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"}
    assert trainable(vit, open_clip_names=False) == {
        "logit_scale",
        *(f"visual.transformer.resblocks.1.{p}" for p in block), "visual.ln_post.weight", "visual.ln_post.bias",
        "visual.proj",
        *(f"text.transformer.resblocks.1.{p}" for p in block), "text.ln_final.weight", "text.ln_final.bias",
        "text.text_projection"}
    resnet, _ = locked_pair("hqclip-rn-micro", image=0, text=1)
    assert trainable(resnet, open_clip_names=False) == {"logit_scale", "text.text_projection"}


def test_resnet_tower_locks_whole_and_unlocked_counts_are_checked():
    with pytest.raises(ValueError, match="ResNet image tower locks whole"):
        create_model("hqclip-rn-micro").lock_image_tower(1)
    with pytest.raises(ValueError, match="lock_text_unlocked_layers must be >= 0"):
        create_model("hqclip-micro").lock_text_tower(-1)


def test_frozen_batch_norm_statistics_as_open_clips_frozen_batch_norm():
    """freeze_bn_stats: in training mode the locked ResNet normalizes by its running statistics, leaves them as
    they are, and encodes as open_clip's tower with FrozenBatchNorm2d does."""
    ours, theirs = locked_pair("hqclip-rn-micro", image=0, freeze_bn_stats=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # not those FrozenBatchNorm2d replaced
                raise AssertionError("open_clip left a BatchNorm unfrozen")
        for key, buf in theirs.state_dict().items():
            if key.endswith(("running_mean", "running_var", "bn3.weight")):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
        plain = open_clip_model("hqclip-rn-micro").state_dict()
        load_open_clip_state_dict(ours, {**plain, **theirs.state_dict()})
    before = copy.deepcopy(ours.state_dict())
    images = torch.randn(4, 3, 64, 64, generator=g)
    ours.train(), theirs.train()
    got = ours.encode_image(images)
    torch.testing.assert_close(got, theirs.encode_image(images), atol=1e-5, rtol=1e-5)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key  # no running statistic (or batch count) moved
    unfrozen = create_model("hqclip-rn-micro")
    unfrozen.load_state_dict(before)
    assert not torch.allclose(unfrozen.train().encode_image(images), got)  # batch statistics differ


def test_frozen_parameters_get_no_optimizer_state():
    model = create_model("hqclip-micro")
    model.lock_image_tower(1)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    out = model(torch.randn(2, 3, 32, 32), random_tokens(2, 77, seed=0))
    (out["logit_scale"] * out["image_features"] @ out["text_features"].T).sum().backward()
    optimizer.step()
    assert {id(p) for p in optimizer.state} == {id(p) for p in model.parameters() if p.requires_grad}


def _fsdp_locked_worker(rank, world_size, init_file, run_dir):
    from torch.optim.lr_scheduler import LambdaLR

    from hqclip_fast.checkpoint import Checkpointer
    from hqclip_fast.loss import HQCLIPLoss
    from hqclip_fast.parallelize import parallelize_model
    from hqclip_fast.train import TrainStep

    torch.set_num_threads(1)
    with gloo_group(init_file, rank, world_size):
        for name, size in (("hqclip-micro", 32), ("hqclip-rn-micro", 64)):
            torch.manual_seed(0)
            model = create_model(name)
            model.lock_image_tower(1 if name == "hqclip-micro" else 0, freeze_bn_stats=True)
            model.lock_text_tower(2)
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            model = parallelize_model(model)
            optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
            step = TrainStep(model, HQCLIPLoss(impl="reference"), optimizer, LambdaLR(optimizer, lambda s: 1.0),
                             device=torch.device("cpu"), grad_clip=1.0, bf16_autocast=False, use_negatives=False,
                             use_tags=False)
            g = torch.Generator().manual_seed(rank)
            batch = {"images": torch.randn(4, 3, size, size, generator=g),
                     "pos_tokens": random_tokens(4, 77, seed=rank)}
            out = model(batch["images"], batch["pos_tokens"])
            (out["logit_scale"] * out["image_features"] @ out["text_features"].T).sum().backward()
            for n, p in model.named_parameters():  # FSDP2 reduced (and so filled) only the trainable gradients
                assert (p.grad is None) == (n in frozen), n
            model.zero_grad(set_to_none=True)
            step(batch)
            for n, p in model.named_parameters():
                changed = not torch.equal(p.full_tensor().reshape(initial[n].shape), initial[n])
                assert changed == (n not in frozen), n
            for key, value in model.state_dict().items():  # frozen BatchNorm: statistics and counts unchanged
                if "running" in key or "num_batches" in key:
                    assert torch.equal(value, initial[key]), key
            assert len(optimizer.state) == len(list(model.parameters())) - len(frozen)
            Checkpointer(os.path.join(run_dir, name), keep_last=1).save(1, model, optimizer, {})


@pytest.mark.distributed
def test_locked_towers_under_fsdp2_on_two_gloo_ranks(tmp_path):
    """Frozen parameters stay put, get no gradient (no reduce) and no optimizer state; checkpoints still save."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_fsdp_locked_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)


def test_trainer_applies_the_locks_of_its_config():
    from hqclip_fast.config import load_config
    from hqclip_fast.runtime import Runtime
    from hqclip_fast.train import build_model

    cfg = load_config(None, ["model.name=hqclip-micro", "model.lock_image=true", "model.lock_image_unlocked_groups=1",
                             "model.lock_text=true", "data.image_size=32"])
    model = build_model(cfg, Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert trainable(model, open_clip_names=False) == {"logit_scale", "visual.proj"}


def test_sync_batchnorm_converts_following_norms_and_keeps_frozen_ones():
    from hqclip_fast.parallelize import sync_batch_norm_

    model = create_model("hqclip-rn-micro")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sync_batch_norm_(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 19 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    locked = create_model("hqclip-rn-micro")
    locked.lock_image_tower(0, freeze_bn_stats=True)
    sync_batch_norm_(locked)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in locked.visual.modules())


def test_sync_batchnorm_on_cpu_ranks_is_a_clear_error_and_single_process_a_no_op(tmp_path):
    from hqclip_fast.parallelize import parallelize_model

    model = parallelize_model(create_model("hqclip-rn-micro"), sync_batchnorm=True)  # no group: nothing to sync
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    with gloo_group(tmp_path / "init", 0, 1):
        with pytest.raises(ValueError, match="SyncBatchNorm synchronizes GPU tensors only"):
            parallelize_model(create_model("hqclip-rn-micro"), sync_batchnorm=True)

"""Exact gradient accumulation (open_clip's feature-cache method): accum 4 x b gives the gradients of 1 x 4b."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from dist_helpers import gloo_group
from test_model_openclip import random_tokens

from hqclip_fast.loss import HQCLIPLoss
from hqclip_fast.model import create_model
from hqclip_fast.train import TrainStep

NUM_TAGS = 6


def make_batch(n, seed):
    """A batch with negatives and -1 padded tag ids (the width varies by batch, as the loader's does)."""
    g = torch.Generator().manual_seed(seed)
    tags = torch.randint(0, NUM_TAGS, (n, 2 + seed % 3), generator=g)
    tags[0, -1] = -1
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "pos_tokens": random_tokens(n, 20, seed),
            "neg_tokens": random_tokens(n, 20, seed + 100), "tag_ids": tags}


def split(batch, k):
    """k micro-batches of one batch, each with its tag ids trimmed to its own widest row."""
    parts = [{key: value.chunk(k)[i] for key, value in batch.items()} for i in range(k)]
    for part in parts:
        width = int((part["tag_ids"] >= 0).sum(1).max())
        part["tag_ids"] = part["tag_ids"][:, :width]
    return parts


def step_for(model, group=None, **model_kwargs):
    loss = HQCLIPLoss(hni_weight=1.0, stc_weight=0.5, negatives_in_softmax=True, impl="reference")
    return TrainStep(model, loss, None, None, device=torch.device("cpu"), grad_clip=0.0, bf16_autocast=False,
                     use_negatives=True, use_tags=True)


def gradients(model):
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name] = grad.clone()
    return out


def accumulated_and_whole(build, batch, k):
    whole_model, accum_model = build(), build()
    whole = step_for(whole_model).backward(batch)
    accum = step_for(accum_model).backward(split(batch, k))
    return (whole, gradients(whole_model)), (accum, gradients(accum_model))


def assert_same(whole, accum):
    (loss_w, grads_w), (loss_a, grads_a) = whole, accum
    torch.testing.assert_close(loss_a[0].total, loss_w[0].total, atol=1e-6, rtol=1e-5)
    for term in ("clip", "hni", "stc"):
        assert getattr(loss_w[0], term) > 0, term  # every HQ-CLIP term is in the comparison
    assert grads_w.keys() == grads_a.keys()
    for name, grad in grads_w.items():
        scale = grad.abs().max()
        assert scale > 0, name
        # fp32 summation order differs: compare to the tensor's largest entry (embedding rows summed over tokens)
        error = (grads_a[name] - grad).abs().max() / scale
        assert error < 1e-5, f"{name}: accumulated gradient differs by {error:.2e} of its largest entry"


def build_model(**overrides):
    torch.manual_seed(0)
    return create_model("hqclip-micro", num_tags=NUM_TAGS, context_length=20, **overrides)


def test_accum_4_x_b_gives_the_gradients_of_1_x_4b():
    assert_same(*accumulated_and_whole(build_model, make_batch(8, seed=1), 4))


def test_accum_with_patch_dropout_recomputes_the_same_patches():
    """Reference: the 4 micro-batches encoded with a graph one after the other (so they draw the patches the cached
    pass draws), one loss over their features, one backward. The accumulated step matches it only if every
    recomputation replays its micro-batch's random state."""
    batch, k = make_batch(8, seed=4), 4
    reference_model, accum_model = build_model(patch_dropout=0.5), build_model(patch_dropout=0.5)
    step = step_for(reference_model)
    torch.manual_seed(7)
    outs = [reference_model(m["images"], m["pos_tokens"], neg_texts=m["neg_tokens"]) for m in split(batch, k)]
    features = {key: torch.cat([o[key] for o in outs]) for key in
                ("image_features", "text_features", "neg_text_features", "tag_features")}
    step._loss(features, outs[0], batch["tag_ids"]).total.backward()
    torch.manual_seed(7)
    accum = step_for(accum_model).backward(split(batch, k))
    after = torch.rand(1)
    torch.manual_seed(7)
    for _ in range(k):  # the random state after the step is the one after a single pass
        reference_model.visual.drop_patches(torch.zeros(2, 17, 1))
    assert torch.equal(after, torch.rand(1))
    grads = gradients(reference_model)
    assert_same((accum, grads), (accum, gradients(accum_model)))


def test_accumulation_is_not_open_clips_k_fold_temperature_gradient():
    """open_clip's loop backpropagates the temperature in every micro-step (k times its gradient); ours once."""
    (_, whole), (_, accum) = accumulated_and_whole(build_model, make_batch(8, seed=2), 4)
    ratio = accum["logit_scale"] / whole["logit_scale"]
    assert ratio.item() == pytest.approx(1.0, rel=1e-4)


def _fsdp_worker(rank, world_size, init_file):
    from hqclip_fast.parallelize import parallelize_model

    torch.set_num_threads(1)
    with gloo_group(init_file, rank, world_size):
        batch = make_batch(8, seed=10 + rank)  # this rank's 4b; the loss sees both ranks' samples
        assert_same(*accumulated_and_whole(lambda: parallelize_model(build_model()), batch, 4))


@pytest.mark.distributed
def test_accum_on_two_gloo_ranks_under_fsdp2(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)

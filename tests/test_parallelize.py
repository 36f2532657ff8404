"""parallelize_model: activation checkpointing, compile, FSDP2 on CPU gloo ranks against one process."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import gloo_group

from hqclip_fast.loss import hqclip_loss
from hqclip_fast.model import create_model, to_open_clip_state_dict
from hqclip_fast.parallelize import full_open_clip_state_dict, full_state_dict, parallelize_model

EOT = 49407
# A ViT and a ResNet image tower (BatchNorm: per-batch statistics in training, running-statistics buffers).
MODELS = ["hqclip-micro", "hqclip-rn-micro"]


def image_size(name):
    return create_model(name).config.vision_cfg.image_size


def is_running_stat(name):
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def make_batch(n, seed=0, image_size=32, length=20):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)

    def tokens():
        t = torch.zeros(n, length, dtype=torch.long)
        for i, k in enumerate(torch.randint(2, length + 1, (n,), generator=g).tolist()):
            t[i, : k - 1] = torch.randint(1, EOT - 1, (k - 1,), generator=g)
            t[i, k - 1] = EOT
        return t

    texts, negs = tokens(), tokens()
    tags = torch.randint(-1, 5, (n, 3), generator=g)
    return images, texts, negs, tags


def train_step(model, optimizer, batch):
    images, texts, negs, tags = batch
    out = model(images, texts, neg_texts=negs)
    loss = hqclip_loss(out["image_features"], out["text_features"], out["logit_scale"],
                       neg_text_features=out["neg_text_features"], hni_weight=0.5,
                       tag_features=out["tag_features"], tag_weight=out["tag_weight"], tag_bias=out["tag_bias"],
                       tag_targets=tags, stc_weight=0.3, impl="reference")
    loss.total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out, loss.total.detach()


@pytest.mark.parametrize("name", MODELS)
def test_single_process_activation_checkpointing_keeps_names_and_values(name):
    torch.manual_seed(0)
    plain = create_model(name, num_tags=5)
    wrapped = parallelize_model(copy.deepcopy(plain), activation_checkpointing=True, param_dtype=torch.bfloat16)
    assert wrapped.logit_scale.shape == (1,)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    sd = full_open_clip_state_dict(wrapped)
    assert sd["logit_scale"].shape == () and sd.keys() == plain.open_clip_state_dict().keys()

    # The comparison below covers the BatchNorm running statistics: the recomputation in backward must not
    # update them a second time.
    batch = make_batch(6, image_size=image_size(name))
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.5)
    opt_b = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    out_a, loss_a = train_step(plain, opt_a, batch)
    out_b, loss_b = train_step(wrapped, opt_b, batch)
    assert out_b["logit_scale"].shape == ()
    torch.testing.assert_close(loss_b, loss_a)
    for (name, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values()):
        torch.testing.assert_close(b.reshape(a.shape), a, msg=name)
    with torch.no_grad():  # the trainer's clamp works on the 1-D parameter
        wrapped.logit_scale.clamp_(0, 1.0)
    assert wrapped(*batch[:2])["logit_scale"].item() == pytest.approx(torch.e, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_compile_on_and_off_give_the_same_outputs(name):
    # Inductor needs ~1 min to compile even this model on 2 CPU cores; aot_eager traces and runs the same
    # graphs (dynamo + AOT autograd) and keeps the test fast. The GPU benchmark uses inductor.
    torch.manual_seed(0)
    plain = create_model(name)
    compiled = parallelize_model(copy.deepcopy(plain), compile=True, compile_backend="aot_eager")
    assert list(compiled.state_dict()) == list(plain.state_dict())
    images, texts, _, _ = make_batch(5, seed=1, image_size=image_size(name))
    for packed in (False, True):
        a = plain.encode_image(images).sum() + plain.encode_text(texts, packed=packed).square().sum()
        b = compiled.encode_image(images).sum() + compiled.encode_text(texts, packed=packed).square().sum()
        torch.testing.assert_close(b, a)
        towers_a = [p for n, p in plain.named_parameters() if n != "logit_scale"]
        towers_b = [p for n, p in compiled.named_parameters() if n != "logit_scale"]
        grads_a = torch.autograd.grad(a, towers_a)
        grads_b = torch.autograd.grad(b, towers_b)
        for (name, _), ga, gb in zip(plain.named_parameters(), grads_a, grads_b):
            torch.testing.assert_close(gb.reshape(ga.shape), ga, msg=name, atol=1e-5, rtol=1e-4)
    for key, value in plain.state_dict().items():  # running statistics updated once per forward, as in eager
        torch.testing.assert_close(compiled.state_dict()[key].reshape(value.shape), value, msg=key)


def per_rank_image_batches_(model, world_size):
    """Make ``model`` encode images in ``world_size`` separate pieces: on one process, the BatchNorm statistics
    that each FSDP rank computes on its own part of the batch (the loss still sees the whole batch)."""
    encode = model.encode_image
    model.encode_image = lambda images: torch.cat([encode(part) for part in images.chunk(world_size)])


def reference_step(name, batch, world_size, autocast=False):
    """One SGD step over the full batch on this process (no group): (initial state, loss, model, rank 0's
    BatchNorm running statistics, which are those of one forward over rank 0's part of the batch)."""
    torch.manual_seed(0)
    model = create_model(name, num_tags=5)
    initial = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.encode_image(batch[0][: len(batch[0]) // world_size])
    rank0_stats = {k: v.clone() for k, v in model.state_dict().items() if is_running_stat(k)}
    model.load_state_dict(initial)
    per_rank_image_batches_(model, world_size)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        _, loss = train_step(model, torch.optim.SGD(model.parameters(), lr=0.5), batch)
    return initial, loss, model, rank0_stats


def update_error(got, want, initial):
    """Largest difference of two updates, relative to the largest entry of the reference update."""
    update, ref_update = got - initial, want - initial
    return float((update - ref_update).abs().max() / ref_update.abs().max().clamp_min(1e-12))


def update_errors(model, initial, ref_model):
    ref = ref_model.state_dict()
    return {k: update_error(v, ref[k], initial[k]) for k, v in model.state_dict().items()
            if v.is_floating_point() and not is_running_stat(k)}


def _fsdp_worker(rank, world_size, init_file, name):
    torch.set_num_threads(1)
    batch = make_batch(8, seed=3, image_size=image_size(name))
    local = tuple(t[rank * 4 : rank * 4 + 4] for t in batch)
    # The whole fixed order (AC, per-block compile, FSDP2) in fp32, then bf16 mixed precision. The ResNet (one
    # compile, to save time): eager AC in fp32 (BatchNorm's recomputation has its own path there, see
    # parallelize.checkpoint_block), then AC and compile in bf16 (compiled blocks with fp32 BatchNorm groups).
    compiled = dict(activation_checkpointing=True, compile=True, compile_backend="aot_eager")
    cases = [compiled, dict(param_dtype=torch.bfloat16)]
    if name == "hqclip-rn-micro":
        cases = [dict(activation_checkpointing=True), dict(compiled, param_dtype=torch.bfloat16)]

    references = [reference_step(name, batch, world_size) for _ in cases]
    # bf16 noise through BatchNorm's backward reaches ~20% of the ResNet stem's update; measure it on this
    # process (autocast bf16), and allow the FSDP bf16 step twice that (0.08 at least).
    bf16_noise = update_errors(reference_step(name, batch, world_size, autocast=True)[2], *references[1][::2])
    with gloo_group(init_file, rank, world_size):
        for case, (initial, ref_loss, ref_model, rank0_stats) in zip(cases, references):
            model = create_model(name, num_tags=5)
            model.load_state_dict(initial)
            model = parallelize_model(model, **case)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            out, loss = train_step(model, optimizer, local)
            bf16 = case.get("param_dtype") == torch.bfloat16
            assert out["image_features"].dtype == (torch.bfloat16 if bf16 else torch.float32)
            dist.all_reduce(loss)
            tol = dict(atol=3e-2, rtol=3e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loss / world_size, ref_loss, **tol)

            state = full_state_dict(model)
            if rank == 0:
                for key, want in ref_model.state_dict().items():
                    want = rank0_stats.get(key, want)
                    got = state[key].reshape(want.shape)
                    assert got.dtype == want.dtype, key  # sharded master weights stay fp32
                    if bf16 and want.is_floating_point():
                        # bf16 compute: the update agrees to bf16 precision, relative to its size
                        err, limit = update_error(got, want, initial[key]), max(0.08, 2 * bf16_noise.get(key, 0))
                        assert err < limit, f"{key}: bf16 update differs by {err:.3f} of its size (> {limit:.3f})"
                    else:
                        torch.testing.assert_close(got, want, msg=f"{case} {key}", **tol)
                assert set(to_open_clip_state_dict(state)) == set(ref_model.open_clip_state_dict())
            else:
                assert state == {}
            if not bf16:  # encode_* are FSDP forward methods: callable directly on the sharded model
                with torch.no_grad():
                    # (ref_model.visual: the reference's encode_image splits the batch, see per_rank_image_batches_)
                    torch.testing.assert_close(model.encode_image(local[0]), ref_model.visual(local[0]),
                                               **tol)
                    torch.testing.assert_close(model.encode_text(local[1]), ref_model.encode_text(local[1]),
                                               **tol)
            full_open_clip_state_dict(model)  # collective: must not hang or fail on any rank
            with torch.no_grad():  # the trainer's clamp on the sharded 1-D parameter
                model.logit_scale.clamp_(0, 1.0)
                assert model(*local[:2])["logit_scale"].item() == pytest.approx(torch.e, rel=1e-2)


@pytest.mark.distributed
@pytest.mark.parametrize("name", MODELS)
def test_fsdp2_step_on_two_gloo_ranks_equals_single_process(tmp_path, name):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), name), nprocs=2, join=True)


def _fp32_logit_scale_worker(rank, world_size, init_file):
    torch.set_num_threads(1)
    batch = make_batch(4, seed=5, image_size=image_size("hqclip-micro"))
    local = tuple(t[rank * 2 : rank * 2 + 2] for t in batch)
    with gloo_group(init_file, rank, world_size):
        torch.manual_seed(0)
        model = create_model("hqclip-micro", num_tags=5)
        with torch.no_grad():  # a value that bf16 cannot hold: 1 + 2^-12
            model.logit_scale.fill_(1 + 2**-12)
        model = parallelize_model(model, param_dtype=torch.bfloat16)
        images, texts, negs, tags = local
        out = model(images, texts, neg_texts=negs)
        assert out["image_features"].dtype == torch.bfloat16  # the towers still compute in bf16
        assert out["logit_scale"].dtype == torch.float32
        assert out["tag_weight"].dtype == torch.float32
        parameter = model.logit_scale.full_tensor()
        assert parameter.dtype == torch.float32 and parameter.item() == 1 + 2**-12
        assert torch.equal(out["logit_scale"], torch.exp(parameter.reshape(())))

        loss = hqclip_loss(out["image_features"], out["text_features"], out["logit_scale"],
                           neg_text_features=out["neg_text_features"], hni_weight=0.5,
                           tag_features=out["tag_features"], tag_weight=out["tag_weight"],
                           tag_bias=out["tag_bias"], tag_targets=tags, stc_weight=0.3, impl="reference")
        # This rank's gradient w.r.t. the parameter (d exp(p) / dp = exp(p)); FSDP must hand every rank the
        # mean over ranks.
        (d_scale,) = torch.autograd.grad(loss.total, out["logit_scale"], retain_graph=True)
        own = (d_scale * out["logit_scale"]).detach().reshape(1)
        loss.total.backward()
        mean = own.clone()
        dist.all_reduce(mean)
        mean /= world_size
        grad = model.logit_scale.grad.full_tensor()
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, mean, rtol=1e-6, atol=0)
        others = [torch.empty_like(own) for _ in range(world_size)]
        dist.all_gather(others, own)
        assert not torch.equal(others[0], others[1])  # the ranks' gradients differ: the mean is a real check


@pytest.mark.distributed
def test_bf16_fsdp_keeps_the_logit_scale_fp32_and_reduces_its_gradient(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_fp32_logit_scale_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_data_parallel_dims_default_to_shard_within_a_node():
    from hqclip_fast.parallelize import data_parallel_dims

    assert data_parallel_dims(512, 8) == (64, 8)  # 64 nodes of 8 GPUs
    assert data_parallel_dims(8, 8) == (1, 8)  # one node: plain FSDP
    assert data_parallel_dims(512, 8, dp_replicate=1) == (1, 512)
    assert data_parallel_dims(512, 8, dp_shard=16) == (32, 16)  # shard over node pairs
    assert data_parallel_dims(512, 8, dp_replicate=128) == (128, 4)
    for bad in (dict(dp_replicate=3), dict(dp_shard=3), dict(dp_replicate=4, dp_shard=4)):
        with pytest.raises(ValueError, match="dp_replicate x parallel.dp_shard"):
            data_parallel_dims(512, 8, **bad)
    with pytest.raises(ValueError, match=">= 0"):
        data_parallel_dims(8, 8, dp_shard=-1)


def _hsdp_steps(model, batches, rank, world_size):
    """Two SGD steps on this rank's quarter of each batch: (global losses, full state dict on rank 0). (Not
    Adam: it divides the attention key bias's gradient, zero up to rounding, by its own size.)"""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for batch in batches:
        b = len(batch[0]) // world_size
        _, loss = train_step(model, optimizer, tuple(t[rank * b:(rank + 1) * b] for t in batch))
        dist.all_reduce(loss)
        losses.append(loss / world_size)
    return torch.stack(losses), full_state_dict(model)


def _hsdp_worker(rank, world_size, init_file):
    from torch.distributed.tensor import Replicate, Shard

    from hqclip_fast.parallelize import data_parallel_mesh

    torch.set_num_threads(1)
    name = "hqclip-micro"
    batches = [make_batch(8, seed=s, image_size=image_size(name)) for s in (7, 8)]
    torch.manual_seed(0)
    initial = create_model(name, num_tags=5).state_dict()

    def fresh():
        model = create_model(name, num_tags=5)
        model.load_state_dict(initial)
        return model

    single = fresh()  # one process, the whole batch
    single_opt = torch.optim.SGD(single.parameters(), lr=0.5)
    single_losses = torch.stack([train_step(single, single_opt, batch)[1] for batch in batches])
    with gloo_group(init_file, rank, world_size):
        fsdp = parallelize_model(fresh(), mesh=data_parallel_mesh("cpu", 1, 4))
        hsdp = parallelize_model(fresh(), mesh=data_parallel_mesh("cpu", 2, 2))
        weight = hsdp.visual.transformer.resblocks[0].mlp.c_fc.weight
        assert weight.device_mesh.mesh_dim_names == ("dp_replicate", "dp_shard")
        assert weight.placements == (Replicate(), Shard(0))
        fsdp_losses, fsdp_state = _hsdp_steps(fsdp, batches, rank, world_size)
        hsdp_losses, hsdp_state = _hsdp_steps(hsdp, batches, rank, world_size)
        tol = dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fsdp_losses, single_losses, **tol)
        torch.testing.assert_close(hsdp_losses, single_losses, **tol)
        if rank == 0:
            for key, want in single.state_dict().items():
                torch.testing.assert_close(fsdp_state[key].reshape(want.shape), want, msg=key, **tol)
                torch.testing.assert_close(hsdp_state[key].reshape(want.shape), want, msg=key, **tol)


@pytest.mark.distributed
def test_hsdp_2x2_steps_equal_fsdp_and_one_process(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_hsdp_worker, args=(4, str(tmp_path / "init")), nprocs=4, join=True)

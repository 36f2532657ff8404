"""parallelize_model: activation checkpointing, compile, FSDP2 on CPU gloo ranks against one process."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hqclip_fast.loss import hqclip_loss
from hqclip_fast.model import create_model, to_open_clip_state_dict
from hqclip_fast.parallelize import full_open_clip_state_dict, full_state_dict, parallelize_model

EOT = 49407


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


def test_single_process_activation_checkpointing_keeps_names_and_values():
    torch.manual_seed(0)
    plain = create_model("hqclip-micro", num_tags=5)
    wrapped = parallelize_model(copy.deepcopy(plain), activation_checkpointing=True, param_dtype=torch.bfloat16)
    assert wrapped.logit_scale.shape == (1,)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    sd = full_open_clip_state_dict(wrapped)
    assert sd["logit_scale"].shape == () and sd.keys() == plain.open_clip_state_dict().keys()

    batch = make_batch(6)
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
def test_compile_on_and_off_give_the_same_outputs():
    # Inductor needs ~1 min to compile even this model on 2 CPU cores; aot_eager traces and runs the same
    # graphs (dynamo + AOT autograd) and keeps the test fast. The GPU benchmark uses inductor.
    torch.manual_seed(0)
    plain = create_model("hqclip-micro")
    compiled = parallelize_model(copy.deepcopy(plain), compile=True, compile_backend="aot_eager")
    assert list(compiled.state_dict()) == list(plain.state_dict())
    images, texts, _, _ = make_batch(5, seed=1)
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


def _fsdp_worker(rank, world_size, init_file):
    torch.set_num_threads(1)
    batch = make_batch(8, seed=3)
    local = tuple(t[rank * 4 : rank * 4 + 4] for t in batch)
    # The whole fixed order (AC, per-block compile, FSDP2) in fp32, then bf16 mixed precision.
    cases = [dict(activation_checkpointing=True, compile=True, compile_backend="aot_eager"),
             dict(param_dtype=torch.bfloat16)]

    # References first, on this one process with no group: the full batch, one SGD step.
    references = []
    for _ in cases:
        torch.manual_seed(0)
        model = create_model("hqclip-micro", num_tags=5)
        initial = copy.deepcopy(model.state_dict())
        _, loss = train_step(model, torch.optim.SGD(model.parameters(), lr=0.5), batch)
        references.append((initial, loss, model))

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for case, (initial, ref_loss, ref_model) in zip(cases, references):
            model = create_model("hqclip-micro", num_tags=5)
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
                for name, want in ref_model.state_dict().items():
                    got = state[name].reshape(want.shape)
                    assert got.dtype == torch.float32, name  # sharded master weights stay fp32
                    if bf16:  # bf16 compute: the SGD update agrees to bf16 precision, relative to its size
                        update, ref_update = got - initial[name], want - initial[name]
                        err = (update - ref_update).abs().max() / ref_update.abs().max().clamp_min(1e-12)
                        assert err < 0.08, f"{name}: bf16 update differs by {float(err):.3f} of its size"
                    else:
                        torch.testing.assert_close(got, want, msg=f"{case} {name}", **tol)
                assert set(to_open_clip_state_dict(state)) == set(ref_model.open_clip_state_dict())
            else:
                assert state == {}
            if not bf16:  # encode_* are FSDP forward methods: callable directly on the sharded model
                with torch.no_grad():
                    torch.testing.assert_close(model.encode_image(local[0]), ref_model.encode_image(local[0]),
                                               **tol)
                    torch.testing.assert_close(model.encode_text(local[1]), ref_model.encode_text(local[1]),
                                               **tol)
            full_open_clip_state_dict(model)  # collective: must not hang or fail on any rank
            with torch.no_grad():  # the trainer's clamp on the sharded 1-D parameter
                model.logit_scale.clamp_(0, 1.0)
                assert model(*local[:2])["logit_scale"].item() == pytest.approx(torch.e, rel=1e-2)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp2_step_on_two_gloo_ranks_equals_single_process(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)

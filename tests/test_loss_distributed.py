"""Distributed semantics on gloo CPU ranks against one process on the concatenated batch.

Mean over ranks of each term == the global term; local input gradients (the gathered ones summed back to
their owners by the all-gather's backward) == world_size x the global gradient, so DDP averaging gives it;
replicated leaves' gradients average to the global gradient. Also: open_clip's local_loss + gather_with_grad
ClipLoss gives the same per-rank CLIP value, unequal local batches raise ValueError on every rank, and a
subgroup passed as `group` is used instead of the default group.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from dist_helpers import gloo_group

from hqclip_fast.loss import hqclip_loss

BATCH, DIM, NUM_TAGS, MAX_TAGS = 5, 6, 9, 4  # local batch
OPTIONS = {"hni_weight": 0.4, "stc_weight": 0.7}
REPLICATED = ("logit_scale", "tag_weight", "tag_bias")
PER_SAMPLE = ("image_features", "text_features", "neg_text_features", "tag_features")


def global_inputs(world_size, dtype):
    gen = torch.Generator().manual_seed(world_size)
    n = world_size * BATCH

    def features():
        return F.normalize(torch.randn(n, DIM, generator=gen, dtype=torch.float64), dim=1).to(dtype)

    targets = torch.randint(-1, NUM_TAGS, (n, MAX_TAGS), generator=gen)
    targets[:, 1] = targets[:, 0]
    return {"image_features": features(), "text_features": features(), "neg_text_features": features(),
            "logit_scale": torch.tensor(8.0, dtype=dtype), "tag_features": features(),
            "tag_weight": torch.randn(NUM_TAGS, DIM, generator=gen, dtype=torch.float64).to(dtype),
            "tag_bias": torch.randn(NUM_TAGS, generator=gen, dtype=torch.float64).to(dtype),
            "tag_targets": targets}


def run_loss(inputs, impl, **options):
    leaves = {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    out = hqclip_loss(**leaves, **options, impl=impl)
    out.total.backward()
    terms = {k: getattr(out, k).detach() for k in ("total", "clip", "hni", "stc")}
    return terms, {k: v.grad for k, v in leaves.items() if v.is_floating_point()}


def _worker(rank, world_size, dtype, out_dir):
    from hqclip_fast.loss import chunked

    torch.set_num_threads(1)
    chunked.CHUNK_ROWS, chunked.CHUNK_COLS = 2, 3
    with gloo_group(out_dir / "init", rank, world_size):
        full = global_inputs(world_size, dtype)
        local = {k: v if k in REPLICATED else v[rank * BATCH:(rank + 1) * BATCH] for k, v in full.items()}
        out = {impl: run_loss(local, impl, **OPTIONS) for impl in ("reference", "chunked")}
        out["chunked-nisFalse"] = run_loss(local, "chunked", **OPTIONS, negatives_in_softmax=False)
        plain = hqclip_loss(local["image_features"], local["text_features"], local["logit_scale"], impl="chunked")
        open_clip_value = float("nan")
        if world_size == 2:  # importing open_clip costs seconds per process: one world size is enough
            from open_clip.loss import ClipLoss

            open_clip_value = float(ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                             world_size=world_size)(
                local["image_features"], local["text_features"], local["logit_scale"]))
        # Shapes are checked once per shape: a shape new on every rank is checked on every rank; a change on
        # only some ranks needs the debug flag (rank 0's full batch was checked above).
        uneven_errors = []
        for uneven_batch, flag in ((BATCH - 1 - rank, "0"), (BATCH - rank, "1")):
            os.environ["HQCLIP_CHECK_SHAPES"] = flag
            uneven = local["image_features"][:uneven_batch]
            try:
                hqclip_loss(uneven, uneven, local["logit_scale"], impl="chunked")
                uneven_errors.append("")
            except ValueError as err:
                uneven_errors.append(str(err))
        subgroup_total = None
        if world_size == 3:  # `group` is honoured: ranks 0 and 1 alone
            subgroup = dist.new_group([0, 1])
            if rank < 2:
                subgroup_total = run_loss(local, "chunked", **OPTIONS, group=subgroup)[0]["total"]
        torch.save((out, open_clip_value, float(plain.clip), uneven_errors, subgroup_total),
                   out_dir / f"rank{rank}.pt")



@pytest.mark.distributed
@pytest.mark.parametrize("world_size,dtype", [(2, torch.float64), (3, torch.float32)])
def test_ranks_match_single_process(world_size, dtype, tmp_path):
    mp.spawn(_worker, args=(world_size, dtype, tmp_path), nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)

    full = global_inputs(world_size, dtype)
    for key, options in (("reference", OPTIONS), ("chunked", OPTIONS),
                         ("chunked-nisFalse", {**OPTIONS, "negatives_in_softmax": False})):
        expected_terms, expected_grads = run_loss(full, "reference", **options)
        for term, expected in expected_terms.items():
            mean = sum(r[0][key][0][term] for r in results) / world_size
            torch.testing.assert_close(mean, expected, **tol, msg=f"{key} {term}")
        for name in PER_SAMPLE:  # DDP averages: the concatenated local gradients / n
            got = torch.cat([r[0][key][1][name] for r in results]) / world_size
            torch.testing.assert_close(got, expected_grads[name], **tol, msg=f"{key} {name}")
        for name in REPLICATED:
            got = sum(r[0][key][1][name] for r in results) / world_size
            torch.testing.assert_close(got, expected_grads[name], **tol, msg=f"{key} {name}")

    if world_size == 3:
        first_two = {k: v if k in REPLICATED else v[:2 * BATCH] for k, v in full.items()}
        expected_terms, _ = run_loss(first_two, "reference", **OPTIONS)
        mean = (results[0][4] + results[1][4]) / 2
        torch.testing.assert_close(mean, expected_terms["total"], **tol)
        assert results[2][4] is None

    for _, open_clip_value, plain_clip, uneven_errors, _ in results:
        if world_size == 2:
            assert plain_clip == pytest.approx(open_clip_value, rel=1e-5)
        assert len(uneven_errors) == 2
        assert all("image_features" in error and "every rank" in error for error in uneven_errors)

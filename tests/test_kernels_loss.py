"""impl="triton" against impl="reference": values and every gradient, all option combinations, fp32 and bf16.

Kernels run on the `device` fixture (tests/conftest.py): the GPU when there is one, else the CPU through
Triton's interpreter (TRITON_INTERPRET=1), so shapes are small and odd, and the interpreter's 16 x 16 tiles are
smaller than them. The reference runs in fp64 on the same (bf16- or fp32-valued) inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from hqclip_fast.loss import hqclip_loss

# Loss values are fp32 for either input dtype: the kernels' tile products are exact in fp32 (ieee for fp32
# inputs; bf16 x bf16 products on tensor cores, or upcast in the interpreter), leaving fp32 accumulation and
# the GPU's exp2/log2 approximations, a few fp32 ulps: well inside 2e-4 relative.
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def grad_tolerance(dtype, reference):
    """bf16 gradients are rounded once at the end: allow about two bf16 ulps of the largest entry."""
    if dtype == torch.float32:
        return TOL[dtype]
    return dict(rtol=2e-2, atol=max(2e-3, 1e-2 * reference.abs().max().item()))


def _features(batch, dim, dtype, generator):
    return F.normalize(torch.randn(batch, dim, generator=generator), dim=1).to(dtype)


def _inputs(batch, dim, dtype, device, *, negatives, tags, bias, scale=14.3, seed=0):
    """Drawn on the CPU (the same values on every device), returned on `device`."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "image_features": _features(batch, dim, dtype, g),
        "text_features": _features(batch, dim, dtype, g),
        "logit_scale": torch.tensor(scale),
    }
    if negatives:
        inputs["neg_text_features"] = _features(batch, dim, dtype, g)
    if tags:
        num_tags = 13
        targets = torch.randint(-1, num_tags, (batch, 5), generator=g)
        targets[0, :3] = 4  # a repeated id counts once
        targets[-1, :] = -1  # a row with no tags
        inputs["tag_features"] = _features(batch, dim, dtype, g)
        inputs["tag_weight"] = (0.3 * torch.randn(num_tags, dim, generator=g)).to(dtype)
        inputs["tag_bias"] = torch.randn(num_tags, generator=g) if bias else None
        inputs["tag_targets"] = targets
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _run(impl, inputs, **options):
    leaves = {k: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
              else v for k, v in inputs.items()}
    out = hqclip_loss(**leaves, impl=impl, **options)
    out.total.backward()
    grads = {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    return out, grads


def _fp64(inputs):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def assert_matches(inputs, dtype, **options):
    out, grads = _run("triton", inputs, **options)
    ref, ref_grads = _run("reference", _fp64(inputs), **options)
    for name in ("total", "clip", "hni", "stc"):
        got = getattr(out, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, getattr(ref, name).float(), **TOL[torch.float32],
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        assert grad.dtype == inputs[name].dtype, name
        reference = ref_grads[name].float()
        torch.testing.assert_close(grad.float(), reference, **grad_tolerance(dtype, reference), msg=lambda m, name=name: f"{name}: {m}")


SHAPES = [(1, 16), (7, 16), (37, 40)]
NEGATIVE_MODES = {  # (negatives given, in softmax, hni weight)
    "none": (False, True, 0.0),
    "softmax": (True, True, 0.0),
    "pair": (True, False, 0.7),
    "softmax+pair": (True, True, 0.7),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(NEGATIVE_MODES))
@pytest.mark.parametrize("batch,dim", SHAPES)
def test_contrastive_terms_match_reference(batch, dim, mode, dtype, device):
    negatives, in_softmax, hni_weight = NEGATIVE_MODES[mode]
    inputs = _inputs(batch, dim, dtype, device, negatives=negatives, tags=False, bias=False, seed=batch)
    assert_matches(inputs, dtype, negatives_in_softmax=in_softmax, hni_weight=hni_weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_every_term_together_matches_reference(bias, dtype, device):
    inputs = _inputs(37, 40, dtype, device, negatives=True, tags=True, bias=bias, seed=3)
    assert_matches(inputs, dtype, hni_weight=0.5, stc_weight=2.0)


@pytest.mark.parametrize("stc_reduction", ["sum_over_tags", "mean_over_tags"])
def test_each_stc_reduction_matches_reference(stc_reduction, device):
    inputs = _inputs(7, 16, torch.float32, device, negatives=False, tags=True, bias=True, seed=4)
    assert_matches(inputs, torch.float32, stc_weight=1.5, stc_reduction=stc_reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pair_negatives_in_row_chunks_match_reference(dtype, device, monkeypatch):
    """The HNI dot products run in row chunks (bounded fp32 temporaries): 5-row chunks over 37 rows, the last
    one short, give the reference values and gradients."""
    from hqclip_fast.loss import fused

    monkeypatch.setattr(fused, "_PAIR_CHUNK_BYTES", 5 * 4 * 40)
    assert len(fused._RowwiseDot._chunks(37, 40)) == 8
    inputs = _inputs(37, 40, dtype, device, negatives=True, tags=False, bias=False, seed=5)
    assert_matches(inputs, dtype, negatives_in_softmax=False, hni_weight=0.9)


@pytest.mark.parametrize("in_softmax", [True, False], ids=["softmax+pair", "pair"])
def test_whole_loss_compiles_without_graph_breaks(in_softmax, device):
    """hqclip_loss(impl="triton") with every term inside torch.compile(fullgraph=True): the kernels are custom
    ops, the HNI dot products an autograd Function, the backend lookup a sys.modules read."""
    import hqclip_fast.loss.fused  # noqa: F401  (imported before tracing, as any eager step would)

    inputs = _inputs(13, 24, torch.float32, device, negatives=True, tags=True, bias=True, seed=8)
    options = dict(negatives_in_softmax=in_softmax, hni_weight=0.6, stc_weight=1.5, impl="triton")

    def loss_fn(**kwargs):
        return hqclip_loss(**kwargs, **options).total

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves = {k: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
              else v for k, v in inputs.items()}
    got, want = compiled(**leaves), loss_fn(**leaves)
    torch.testing.assert_close(got, want)
    grad_leaves = [v for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    for a, b in zip(torch.autograd.grad(got, grad_leaves), torch.autograd.grad(want, grad_leaves)):
        torch.testing.assert_close(a, b)
    # Out-of-range tag ids still fail inside the compiled graph (a device-side check there). Checked on the
    # CPU only: on a GPU a device-side assert would end the CUDA context of the whole test process.
    if device.type == "cpu":
        leaves["tag_targets"] = torch.full_like(leaves["tag_targets"], 13)
        with pytest.raises(RuntimeError, match="tag_targets"):
            compiled(**leaves)


def test_scale_100_with_poorly_aligned_rows(device):
    """Rows whose best logit is 100 next to rows whose logits all sit near 0 or -100: a fixed shift
    would underflow; per-row and per-column running maxima must not."""
    inputs = _inputs(37, 40, torch.float32, device, negatives=True, tags=False, bias=False, scale=100.0, seed=5)
    image, text = inputs["image_features"], inputs["text_features"]
    image[:9] = text[:9]  # perfectly aligned rows: diagonal logit exactly s
    image[9:18] = -text[9:18]  # anti-aligned rows: diagonal logit -s
    inputs["neg_text_features"][18:22] = image[18:22]  # negatives that win their rows
    out, grads = _run("triton", inputs, hni_weight=1.0)
    assert torch.isfinite(out.total)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert_matches(inputs, torch.float32, hni_weight=1.0)


def test_triton_is_deterministic(device):
    inputs = _inputs(37, 40, torch.bfloat16, device, negatives=True, tags=True, bias=True, seed=11)
    first, first_grads = _run("triton", inputs, hni_weight=0.5, stc_weight=1.0)
    second, second_grads = _run("triton", inputs, hni_weight=0.5, stc_weight=1.0)
    assert torch.equal(first.total, second.total)
    for name in first_grads:
        assert torch.equal(first_grads[name], second_grads[name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_realistic_shape_on_gpu(dtype, device):
    if device.type != "cuda":
        pytest.skip("needs a CUDA device: a 4099 x 4099 sweep is too slow for Triton's CPU interpreter")
    inputs = _inputs(4099, 512, dtype, device, negatives=True, tags=True, bias=True, seed=7)
    assert_matches(inputs, dtype, hni_weight=0.5, stc_weight=1.0)
    first, first_grads = _run("triton", inputs, hni_weight=0.5, stc_weight=1.0)
    second, second_grads = _run("triton", inputs, hni_weight=0.5, stc_weight=1.0)
    assert torch.equal(first.total, second.total)
    for name in first_grads:
        assert torch.equal(first_grads[name], second_grads[name]), f"{name} differs between two runs"


def test_float64_is_refused_with_a_clear_error(device):
    inputs = _inputs(7, 16, torch.float64, device, negatives=False, tags=False, bias=False)
    with pytest.raises(ValueError, match="float64"):
        hqclip_loss(**inputs, impl="triton")

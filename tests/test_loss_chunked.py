"""The chunked loss against the reference: every option, odd shapes, fp32/bf16, all gradients, gradcheck."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hqclip_fast.loss import chunked, hqclip_loss, reference


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # Tile sizes that divide none of the test shapes, so partial tiles and local-range edges are exercised.
    monkeypatch.setattr(chunked, "CHUNK_ROWS", 4)
    monkeypatch.setattr(chunked, "CHUNK_COLS", 3)


def make_inputs(batch, dim, num_tags, max_tags, dtype, seed, *, scale=9.0, with_bias=True):
    gen = torch.Generator().manual_seed(seed)

    def features(n):
        return F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1).to(dtype)

    image, text = features(batch), features(batch)
    neg = F.normalize(text.double() + 0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64),
                      dim=1).to(dtype)
    tag_targets = torch.randint(-1, num_tags, (batch, max_tags), generator=gen)
    if max_tags >= 2:
        tag_targets[::2, 1] = tag_targets[::2, 0]  # repeated ids (and repeated padding)
    return {
        "image_features": image, "text_features": text, "logit_scale": torch.tensor(scale),
        "neg_text_features": neg,
        "tag_features": features(batch),
        "tag_weight": (0.5 * torch.randn(num_tags, dim, generator=gen, dtype=torch.float64)).to(dtype),
        "tag_bias": torch.randn(num_tags, generator=gen, dtype=torch.float64).to(dtype) if with_bias else None,
        "tag_targets": tag_targets,
    }


def run(impl, inputs, **options):
    """Loss output and the gradient of every floating input, on fresh leaves."""
    leaves = {k: v.detach().clone().requires_grad_() if v is not None and v.is_floating_point() else v
              for k, v in inputs.items()}
    out = hqclip_loss(**leaves, **options, impl=impl)
    (1.5 * out.total).backward()
    grads = {k: v.grad for k, v in leaves.items()
             if isinstance(v, torch.Tensor) and v.is_floating_point() and v.grad is not None}
    return out, grads


OPTIONS = [  # (use negatives, negatives_in_softmax, hni_weight, stc: None | "bias" | "no_bias")
    (neg, in_softmax, hni, stc)
    for neg, in_softmax, hni, stc in itertools.product([False, True], [True, False], [0.0, 0.4],
                                                      [None, "bias", "no_bias"])
    if neg or (in_softmax and hni == 0.0)
]


def _select(inputs, neg, in_softmax, hni, stc):
    selected = dict(inputs)
    options = {"negatives_in_softmax": in_softmax, "hni_weight": hni, "stc_weight": 0.0}
    if not neg:
        selected["neg_text_features"] = None
    if stc is None:
        for k in ("tag_features", "tag_weight", "tag_bias", "tag_targets"):
            selected[k] = None
    else:
        options["stc_weight"] = 0.8
        if stc == "no_bias":
            selected["tag_bias"] = None
    return selected, options


# Gradients: fp32 rounding of softmax terms that cancel leaves ~1e-6 of the O(scale) gradient scale.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=1e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: f"neg{int(o[0])}-sm{int(o[1])}-hni{o[2]}-stc{o[3]}")
def test_chunked_matches_reference(option, dtype):
    batch, dim, num_tags, max_tags = 13, 7, 11, 5
    inputs, options = _select(make_inputs(batch, dim, num_tags, max_tags, dtype, seed=len(str(option))), *option)
    expected, expected_grads = run("reference", inputs, **options)
    out, grads = run("chunked", inputs, **options)
    for name in ("total", "clip", "hni", "stc"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
        assert getattr(out, name).dtype == torch.float32
    assert grads.keys() == expected_grads.keys()
    assert "logit_scale" in grads
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCES[dtype], msg=name)


@pytest.mark.parametrize("batch,dim,num_tags,max_tags", [(1, 1, 1, 1), (2, 5, 3, 0), (9, 4, 8, 3), (24, 6, 7, 6)])
def test_odd_shapes_all_terms(batch, dim, num_tags, max_tags):
    inputs = make_inputs(batch, dim, num_tags, max_tags, torch.float32, seed=batch)
    options = {"hni_weight": 0.5, "stc_weight": 1.3}
    expected, expected_grads = run("reference", inputs, **options)
    out, grads = run("chunked", inputs, **options)
    torch.testing.assert_close(out.total, expected.total, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCES[torch.float32], msg=name)


@pytest.mark.parametrize("stc_reduction", ["sum_over_tags", "mean_over_tags"])
def test_each_stc_reduction_matches_reference(stc_reduction):
    inputs = make_inputs(9, 4, 8, 3, torch.float32, seed=2)
    options = {"stc_weight": 1.3, "stc_reduction": stc_reduction}
    expected, expected_grads = run("reference", inputs, **options)
    out, grads = run("chunked", inputs, **options)
    torch.testing.assert_close(out.stc, expected.stc, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **TOLERANCES[torch.float32], msg=name)


@pytest.mark.parametrize("rows", [(0, 5), (5, 10), (10, 15), (3, 11)])
@pytest.mark.parametrize("softmax_negatives", [False, True])
def test_contrastive_sums_on_a_rank_slice(rows, softmax_negatives):
    """One rank's view of a gathered batch: local rows/columns in the middle or at either end."""
    gen = torch.Generator().manual_seed(sum(rows))
    image, text, neg = (torch.randn(15, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    start, stop = rows

    def sums(impl):
        leaves = [t.clone().requires_grad_() for t in (image, text, neg, torch.tensor(2.5, dtype=torch.float64))]
        i, t, n, s = leaves
        result = impl.contrastive_sums(i, t, s, rows=rows, softmax_negatives=n if softmax_negatives else None,
                                       pair_negatives=n[start:stop])
        torch.autograd.backward(result, [torch.tensor(0.7), torch.tensor(-1.9), torch.tensor(0.3)])
        return result, [x.grad for x in leaves]

    expected, expected_grads = sums(reference)
    got, grads = sums(chunked)
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logit_spread_is_exact(dtype):
    """Logits spread over more than exp's range within a tile (fp32: normalized features at scale 100;
    fp64: unnormalized features): the shared-shift column sums underflow and the affected columns must be
    recomputed exactly; no fixed maximum anywhere."""
    gen = torch.Generator().manual_seed(0)
    direction = torch.zeros(8, dtype=torch.float64)
    direction[0] = 1
    image = F.normalize(direction + 0.3 * torch.randn(11, 8, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.05 * torch.randn(11, 8, generator=gen, dtype=torch.float64), dim=1)
    text[4] = -direction  # logit ~ -100 against every image, while each tile holds diagonals ~ +100
    if dtype == torch.float64:
        image, text = 4 * image, 4 * text  # a spread beyond fp64's exp range too
    inputs = {"image_features": image.to(dtype), "text_features": text.to(dtype),
              "logit_scale": torch.tensor(100.0, dtype=dtype)}
    expected, expected_grads = run("reference", inputs)
    out, grads = run("chunked", inputs)
    assert torch.isfinite(out.total)
    tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-5)
    torch.testing.assert_close(out.total, expected.total, **tolerance)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **tolerance, msg=name)


def test_gradcheck_float64():
    inputs = make_inputs(5, 3, 4, 3, torch.float64, seed=11, scale=3.0)
    names = ["image_features", "text_features", "logit_scale", "neg_text_features", "tag_features",
             "tag_weight", "tag_bias"]
    leaves = [inputs[k].detach().clone().double().requires_grad_() for k in names]

    def total(image, text, scale, neg, tag_features, tag_weight, tag_bias):
        out = hqclip_loss(image, text, scale, neg_text_features=neg, hni_weight=0.6, tag_features=tag_features,
                          tag_weight=tag_weight, tag_bias=tag_bias, tag_targets=inputs["tag_targets"],
                          stc_weight=0.9, impl="chunked")
        return out.clip, out.hni, out.stc

    assert torch.autograd.gradcheck(total, leaves)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materializes_the_logits():
    batch, dim, num_tags, max_tags = 16, 3, 17, 4  # b * B = 256, b * V = 272; inputs hold at most 64 entries
    inputs = make_inputs(batch, dim, num_tags, max_tags, torch.float32, seed=2)
    leaves = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    with _LargestTensor() as mode:
        out = hqclip_loss(**leaves, hni_weight=0.5, stc_weight=0.5, impl="chunked")
        out.total.backward()
    assert mode.largest <= max(batch * dim, num_tags * dim, batch * max_tags, 4 * 3 * 2)
    with _LargestTensor() as mode:
        hqclip_loss(**{k: v.detach() for k, v in leaves.items()}, hni_weight=0.5, stc_weight=0.5,
                    impl="reference")
    assert mode.largest >= batch * batch  # the check above can see a logit matrix

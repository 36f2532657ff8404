"""The reference loss against open_clip's ClipLoss and against the issue's formulas written out longhand."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from hqclip_fast.loss import HQCLIPLoss, hqclip_loss


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _features(gen, n, dim):
    return F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("batch,dim", [(1, 3), (6, 5), (17, 9)])
def test_clip_part_matches_open_clip(batch, dim):
    gen = torch.Generator().manual_seed(batch)
    image, text = _features(gen, batch, dim), _features(gen, batch, dim)
    scale = torch.tensor(13.0, dtype=torch.float64)
    ours = [_leaf(t) for t in (image, text, scale)]
    theirs = [_leaf(t) for t in (image, text, scale)]
    out = hqclip_loss(*ours, impl="reference")
    expected = ClipLoss()(*theirs)
    torch.testing.assert_close(out.clip, expected)
    torch.testing.assert_close(out.total, expected)
    assert out.hni.item() == 0 and out.stc.item() == 0
    out.total.backward()
    expected.backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)


def _longhand(image, text, neg, scale, negatives_in_softmax, tag_features, tag_weight, tag_bias, tag_targets,
              stc_reduction="sum_over_tags"):
    """The issue's definitions, one sample at a time, in float64."""
    batch = len(image)
    i2t = t2i = hni = 0.0
    for i in range(batch):
        terms = [math.exp(scale * float(image[i] @ text[j])) for j in range(batch)]
        if neg is not None and negatives_in_softmax:
            terms += [math.exp(scale * float(image[i] @ neg[k])) for k in range(batch)]
        i2t += -scale * float(image[i] @ text[i]) + math.log(sum(terms))
        t2i += -scale * float(text[i] @ image[i]) + math.log(
            sum(math.exp(scale * float(text[i] @ image[j])) for j in range(batch)))
        if neg is not None:
            pos, negl = scale * float(image[i] @ text[i]), scale * float(image[i] @ neg[i])
            hni += -math.log(math.exp(pos) / (math.exp(pos) + math.exp(negl)))
    clip = (i2t / batch + t2i / batch) / 2
    stc = 0.0
    if tag_weight is not None:
        num_tags = len(tag_weight)
        for i in range(batch):
            labels = {int(t) for t in tag_targets[i] if t >= 0}
            for v in range(num_tags):
                z = float(tag_features[i] @ tag_weight[v]) + (float(tag_bias[v]) if tag_bias is not None else 0.0)
                p = 1 / (1 + math.exp(-z))
                stc += -math.log(p) if v in labels else -math.log(1 - p)
        stc /= batch * (num_tags if stc_reduction == "mean_over_tags" else 1)
    return clip, hni / batch, stc


@pytest.mark.parametrize("stc_reduction", ["sum_over_tags", "mean_over_tags"])
@pytest.mark.parametrize("negatives_in_softmax", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_matches_longhand_definitions(negatives_in_softmax, with_bias, stc_reduction):
    gen = torch.Generator().manual_seed(3)
    batch, dim, num_tags = 5, 4, 7
    image, text, neg = (_features(gen, batch, dim) for _ in range(3))
    tag_weight = torch.randn(num_tags, dim, generator=gen, dtype=torch.float64)
    tag_bias = torch.randn(num_tags, generator=gen, dtype=torch.float64) if with_bias else None
    tag_targets = torch.tensor([[0, 3, -1], [6, 6, 2], [-1, -1, -1], [1, 1, 1], [5, -1, 4]])
    scale, hni_weight, stc_weight = 4.5, 0.3, 2.0
    out = hqclip_loss(image, text, torch.tensor(scale, dtype=torch.float64), neg_text_features=neg,
                      negatives_in_softmax=negatives_in_softmax, hni_weight=hni_weight,
                      tag_features=image, tag_weight=tag_weight, tag_bias=tag_bias, tag_targets=tag_targets,
                      stc_weight=stc_weight, stc_reduction=stc_reduction, impl="reference")
    clip, hni, stc = _longhand(image, text, neg, scale, negatives_in_softmax, image, tag_weight, tag_bias,
                               tag_targets, stc_reduction)
    assert out.clip.item() == pytest.approx(clip, rel=1e-12)
    assert out.hni.item() == pytest.approx(hni, rel=1e-12)
    assert out.stc.item() == pytest.approx(stc, rel=1e-12)
    assert out.total.item() == pytest.approx(clip + hni_weight * hni + stc_weight * stc, rel=1e-12)


def test_module_passes_its_options():
    gen = torch.Generator().manual_seed(5)
    image, text, neg = (_features(gen, 4, 3) for _ in range(3))
    scale = torch.tensor(2.0, dtype=torch.float64)
    module = HQCLIPLoss(hni_weight=0.7, negatives_in_softmax=False, impl="reference")
    out = module(image, text, scale, neg_text_features=neg)
    expected = hqclip_loss(image, text, scale, neg_text_features=neg, hni_weight=0.7,
                           negatives_in_softmax=False, impl="reference")
    torch.testing.assert_close(out.total, expected.total)
    with_softmax = hqclip_loss(image, text, scale, neg_text_features=neg, hni_weight=0.7, impl="reference")
    assert with_softmax.clip.item() > out.clip.item()  # extra columns only add to the image->text denominator
    assert "hni_weight=0.7" in repr(module)


def test_summed_tag_loss_does_not_depend_on_the_vocabulary_size():
    """The same images and true tags, with 7 or 7 + 993 tags: the extra tags are absent and predicted absent
    (as after the head's bias has learned how rare they are). Summed over the tags, the term barely moves, so
    stc_weight keeps its strength; averaged over the tags, it shrinks by the vocabulary's growth."""
    gen = torch.Generator().manual_seed(8)
    batch, dim = 6, 5
    image, text = _features(gen, batch, dim), _features(gen, batch, dim)
    weight = torch.randn(7, dim, generator=gen, dtype=torch.float64)
    targets = torch.tensor([[0, 3], [6, 2], [1, -1], [4, 5], [2, 2], [-1, -1]])
    big_weight = torch.cat([weight, torch.zeros(993, dim, dtype=torch.float64)])
    bias, big_bias = torch.zeros(7, dtype=torch.float64), torch.cat([torch.zeros(7), torch.full((993,), -15.0)])

    def stc(w, b, reduction):
        return hqclip_loss(image, text, torch.tensor(3.0), tag_features=image, tag_weight=w, tag_bias=b.double(),
                           tag_targets=targets, stc_weight=1.0, stc_reduction=reduction, impl="reference").stc.item()

    small, big = stc(weight, bias, "sum_over_tags"), stc(big_weight, big_bias, "sum_over_tags")
    assert big == pytest.approx(small, rel=1e-3)
    assert stc(big_weight, big_bias, "mean_over_tags") == pytest.approx(big / 1000, rel=1e-12)
    assert stc(weight, bias, "mean_over_tags") == pytest.approx(small / 7, rel=1e-12)


def test_unknown_stc_reduction_is_refused():
    gen = torch.Generator().manual_seed(1)
    image = _features(gen, 2, 3)
    with pytest.raises(ValueError, match="stc_reduction must be one of"):
        hqclip_loss(image, image, torch.tensor(1.0), stc_reduction="mean", impl="reference")
    with pytest.raises(ValueError, match="stc_reduction must be one of"):
        HQCLIPLoss(stc_reduction="sum")

"""Bad input raises ValueError naming the argument; impl dispatch is explicit."""

import sys
import types

import pytest
import torch

from hqclip_fast.loss import HQCLIPLoss, api, hqclip_loss
from hqclip_fast.loss.api import get_impl


def _valid():
    gen = torch.Generator().manual_seed(0)
    return {
        "image_features": torch.randn(4, 3, generator=gen), "text_features": torch.randn(4, 3, generator=gen),
        "logit_scale": torch.tensor(5.0), "neg_text_features": torch.randn(4, 3, generator=gen),
        "hni_weight": 0.5, "tag_features": torch.randn(4, 3, generator=gen),
        "tag_weight": torch.randn(6, 3, generator=gen), "tag_bias": torch.randn(6, generator=gen),
        "tag_targets": torch.tensor([[0, 5], [-1, -1], [2, 2], [1, -1]]), "stc_weight": 0.5,
    }


CASES = {
    "text_features": {"text_features": torch.randn(5, 3)},
    "neg_text_features": {"neg_text_features": torch.randn(4, 2)},
    "image_features": {"image_features": torch.randn(4, 3, 1)},
    "logit_scale": {"logit_scale": torch.tensor([1.0, 2.0])},
    "hni_weight": {"neg_text_features": None},
    "tag_targets": {"tag_targets": torch.tensor([[0, 6], [-1, -1], [2, 2], [1, -1]])},
    "tag_targets ": {"tag_targets": torch.tensor([[0, -2], [-1, -1], [2, 2], [1, -1]])},
    "tag_targets  ": {"tag_targets": torch.zeros(4, 2)},
    "tag_targets   ": {"tag_targets": torch.zeros(3, 2, dtype=torch.long)},
    "tag_targets    ": {"tag_targets": None},
    "tag_weight": {"tag_weight": torch.randn(6, 4)},
    "tag_weight ": {"tag_weight": None},
    "tag_features": {"tag_features": None},
    "tag_features ": {"tag_features": torch.randn(5, 3)},
    "tag_bias": {"tag_bias": torch.randn(5)},
    "stc_weight": {"stc_weight": -1.0},
    "hni_weight ": {"hni_weight": float("nan")},
    "impl": {"impl": "fast"},
}


@pytest.mark.parametrize("argument", list(CASES))
def test_bad_input_names_the_argument(argument):
    kwargs = {**_valid(), **CASES[argument]}
    kwargs.setdefault("impl", "reference")
    with pytest.raises(ValueError, match=argument.strip()):
        hqclip_loss(kwargs.pop("image_features"), kwargs.pop("text_features"), kwargs.pop("logit_scale"), **kwargs)


def test_valid_input_passes_and_unused_inputs_are_ignored():
    kwargs = _valid()
    out = hqclip_loss(kwargs.pop("image_features"), kwargs.pop("text_features"), kwargs.pop("logit_scale"),
                      **kwargs, impl="reference")
    assert torch.isfinite(out.total)
    # weights of zero: the unused inputs are not needed and not checked
    out = hqclip_loss(torch.randn(2, 3), torch.randn(2, 3), 1.0, tag_targets=torch.tensor([[99]]), impl="chunked")
    assert out.stc.item() == 0 and out.hni.item() == 0


def test_empty_batch():
    with pytest.raises(ValueError, match="image_features"):
        hqclip_loss(torch.randn(0, 3), torch.randn(0, 3), torch.tensor(1.0), impl="reference")


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="impl"):
        HQCLIPLoss(impl="nope")
    with pytest.raises(ValueError, match="hni_weight"):
        HQCLIPLoss(hni_weight=-0.1)


def test_impl_dispatch():
    cpu = torch.device("cpu")
    assert get_impl("auto", cpu).__name__ == "hqclip_fast.loss.chunked"
    assert get_impl("reference", cpu).__name__ == "hqclip_fast.loss.reference"
    with pytest.raises(ValueError, match="impl"):
        get_impl("chunky", cpu)


@pytest.mark.parametrize("why", ["missing", "unavailable"])
def test_unusable_triton_backend(monkeypatch, why):
    if why == "missing":
        monkeypatch.setitem(api._IMPLS, "triton", "hqclip_fast.loss.no_such_module")
    else:
        fake = types.ModuleType("fake_fused")
        fake.is_available = lambda: False
        monkeypatch.setitem(sys.modules, "fake_fused", fake)
        monkeypatch.setitem(api._IMPLS, "triton", "fake_fused")
    with pytest.raises(ValueError, match="impl='triton' is unavailable"):
        hqclip_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor(1.0), impl="triton")
    # "auto" falls back to chunked, also for CUDA tensors (only the device type is looked at here)
    assert get_impl("auto", torch.device("cuda")).__name__ == "hqclip_fast.loss.chunked"

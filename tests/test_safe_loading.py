"""Loading a checkpoint or an export runs no code from it: a planted pickle is refused with a clear error, and the
code it carries (here: creating a marker file) never runs. Each plant is first shown to be live: plain
unpickling does run it."""

import json
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from hqclip_fast.checkpoint import Checkpointer, load_model_weights
from hqclip_fast.eval import cli as eval_cli
from hqclip_fast.export import export_open_clip
from hqclip_fast.model import create_model
from hqclip_fast.optim import build_optimizer
from hqclip_fast.serialization import UnsafeFileError, load_weights

MODEL, SIZE = "hqclip-micro", 32


class _Plant:
    """Unpickling it creates `marker` (any callable could stand where `open` does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _assert_live(data: bytes, marker) -> None:
    """Plain pickle runs the planted call: the refusals below are what stops it."""
    pickle.loads(data).close()
    assert marker.exists()
    marker.unlink()


@pytest.fixture
def checkpoint(tmp_path):
    """A real checkpoint folder of a small model: (folder, model, optimizer)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    folder = Checkpointer(tmp_path / "ckpt").save(1, model, optimizer, {"loader": {"position": 3}})
    return folder, model, optimizer


def test_checkpoint_holds_its_trainer_state_as_json(checkpoint):
    folder, _, _ = checkpoint
    state = json.loads((folder / "rank0.json").read_text())
    assert state["step"] == 1 and state["loader"] == {"position": 3}
    assert set(state["rng"]) >= {"python", "numpy", "torch"}


def test_planted_checkpoint_metadata_is_refused(checkpoint, tmp_path):
    folder, model, optimizer = checkpoint
    marker = tmp_path / "metadata-ran"
    planted = pickle.dumps(_Plant(marker))
    _assert_live(planted, marker)
    (folder / ".metadata").write_bytes(planted)

    with pytest.raises(UnsafeFileError, match=r"refusing to load .*\.metadata: its pickle refers to .*open"):
        Checkpointer(folder.parent).load(folder, model, optimizer)
    with pytest.raises(UnsafeFileError, match="could run code"):
        load_model_weights(folder, model)  # what hqclip-export and `hqclip-eval --run` read
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected an existing checkpoint", "ignore:torch.distributed is disabled")
def test_planted_non_tensor_checkpoint_entry_is_refused(checkpoint, tmp_path):
    """DCP stores non-tensor entries (the optimizer's hyperparameters) as pickles and loads them with
    weights_only=False; ours are checked with weights_only=True first."""
    folder, model, optimizer = checkpoint
    marker = tmp_path / "entry-ran"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    optim_sd["param_groups"][0]["lr"] = _Plant(marker)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder), no_dist=True)  # rewrites the folder
    assert not marker.exists()

    with pytest.raises(UnsafeFileError, match=r"refusing to load checkpoint entry optim\.param_groups.*io\.open"):
        Checkpointer(folder.parent).load(folder, model, optimizer)
    assert not marker.exists()
    # The plant is live: DCP's own loader runs it.
    dcp.load({"model": get_state_dict(model, optimizer)[0], "optim": get_state_dict(model, optimizer)[1]},
             checkpoint_id=str(folder), no_dist=True)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("as_state_dict", [True, False], ids=["torch-save", "raw-pickle"])
def test_planted_export_is_refused(tmp_path, capsys, as_state_dict):
    torch.manual_seed(0)
    weights = export_open_clip(create_model(MODEL, image_size=SIZE).eval(), MODEL, tmp_path / "export")
    marker = tmp_path / "export-ran"
    if as_state_dict:  # a state dict whose one entry runs code
        torch.save({"visual.conv1.weight": _Plant(marker)}, weights)
    else:
        weights.write_bytes(pickle.dumps(_Plant(marker)))
    _assert_live(pickle.dumps(_Plant(marker)), marker)

    with pytest.raises(UnsafeFileError, match=f"refusing to load {weights}: .*could run code"):
        load_weights(weights)
    with pytest.raises(SystemExit):  # hqclip-eval --pretrained: a usage error naming the refusal
        eval_cli(["--model", MODEL, "--image-size", str(SIZE), "--pretrained", str(weights),
                  "--zeroshot", str(tmp_path), "--classnames", str(tmp_path)])
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()

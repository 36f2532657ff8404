"""Evaluation shared by 2 gloo CPU ranks equals one process on the whole sets: zero-shot top-1/top-5, retrieval
R@k and hard-negative accuracy, on an FSDP2-sharded model, with set sizes that 2 does not divide (so one rank
has an extra batch and the other must keep its encode calls in step with blank inputs), and a damaged sample in
each set. Each rank decodes only its share of the shards. `hqclip-eval` under torchrun's environment does the
same and only rank 0 reports."""

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path

import braceexpand
import pytest
import torch
import torch.multiprocessing as mp
from data_helpers import write_tar
from dist_helpers import free_port, gloo_group

from hqclip_fast.config import EvalConfig
from hqclip_fast.data import ClipTokenizer
from hqclip_fast.data import loader as data_loader
from hqclip_fast.data.synthetic import write_synthetic
from hqclip_fast.eval import EvalSuite
from hqclip_fast.eval import cli as eval_cli
from hqclip_fast.eval_ranks import EvalRanks
from hqclip_fast.export import export_open_clip
from hqclip_fast.model import create_model

MODEL, SIZE, CONTEXT, BATCH = "hqclip-micro", 32, 77, 3
NUM_IMAGES = 7  # good ones per set: shares of 4 and 3 images, i.e. 2 and 1 batches of 3
# A damaged sample in each set, at a tar position of rank 1's share (odd): rank 1 decodes 3 good images and it.
DAMAGED_AT = {"zeroshot": (1, b"0"), "hardneg": (3, b'{"positive_text": "a", "negative_text": "b"}')}


def _insert_damaged_sample(shard: str, position: int, target: tuple[str, bytes]) -> None:
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members[2 * position:2 * position] = [("damaged.jpg", b"not a jpeg"), target]  # 2 members per sample
    write_tar(shard, members)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    written = write_synthetic(str(out), num_samples=4, shard_size=30, seed=6, image_size=SIZE,
                              num_zeroshot=NUM_IMAGES, num_hardneg=NUM_IMAGES)
    for split, (position, target) in DAMAGED_AT.items():
        (shard,) = braceexpand.braceexpand(written[split])
        _insert_damaged_sample(shard, position, ("damaged." + ("cls" if split == "zeroshot" else "json"), target))
    return str(out / "manifest.json")


@contextlib.contextmanager
def _counting_decodes():
    """Yields a list that gets (set, key) for every image the eval datasets decode in this process."""
    decoded, real_decode = [], data_loader.decode_image
    data_loader.decode_image = lambda raw: decoded.append(
        (Path(raw["__url__"]).parent.name, raw["__key__"])) or real_decode(raw)
    try:
        yield decoded
    finally:
        data_loader.decode_image = real_decode


def _model():
    torch.manual_seed(0)
    return create_model(MODEL, image_size=SIZE, context_length=CONTEXT).eval()


def _suite(manifest: str) -> EvalSuite:
    return EvalSuite.from_config(EvalConfig(synthetic_manifest=manifest, batch_size=BATCH), SIZE)


def _check_edge_cases(ranks: EvalRanks) -> None:
    """Shares of 3 and 2 rows gather in the global order; a rank with nothing to share takes part (a set
    smaller than the world); row counts that are no i % world share are an error on every rank."""
    rows = torch.arange(ranks.rank, 5, ranks.world_size, dtype=torch.float32).view(-1, 1).repeat(1, 2)
    assert torch.equal(ranks.gather(rows), torch.arange(5.0).view(-1, 1).repeat(1, 2))
    tiny = torch.ones(1, 4) if ranks.rank == 0 else torch.empty(0, 0)
    assert torch.equal(ranks.gather(tiny), torch.ones(1, 4))
    calls = []
    encoded = list(ranks.lockstep([10] if ranks.rank == 0 else [], lambda x: calls.append(x) or x, blank=lambda: -1))
    assert encoded == ([10] if ranks.rank == 0 else []) and calls == ([10] if ranks.rank == 0 else [-1])
    with pytest.raises(ValueError, match="share"):
        ranks.gather(torch.zeros(3 if ranks.rank == 0 else 0, 2))
    # Shares by sample index (build_eval_dataset's): any sizes, holes; rows come back sorted by index.
    index = [0, 3, 4] if ranks.rank == 0 else [6, 1]
    rows = torch.tensor(index, dtype=torch.float32).view(-1, 1).repeat(1, 2)
    assert torch.equal(ranks.gather(rows, index), torch.tensor([0.0, 1, 3, 4, 6]).view(-1, 1).repeat(1, 2))
    tiny_index = [7] if ranks.rank == 0 else []
    assert torch.equal(ranks.gather(tiny, tiny_index), torch.ones(1, 4))
    with pytest.raises(ValueError, match="more than one row"):
        ranks.gather(torch.zeros(1, 2), [5])  # both ranks hold sample 5


def _eval_cli_as_torchrun_rank(rank: int, world_size: int, port: int, manifest: str, out_dir: str) -> str:
    """hqclip-eval in the environment torchrun gives a worker; returns what it printed."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        eval_cli(["--model", MODEL, "--image-size", str(SIZE), "--pretrained",
                  str(Path(out_dir, "export", "open_clip_pytorch_model.bin")), "--synthetic-manifest", manifest,
                  "--batch-size", str(BATCH), "--out", str(Path(out_dir, f"cli_rank{rank}.json"))])
    return printed.getvalue()


def _worker(rank: int, world_size: int, cli_port: int, manifest: str, out_dir: str) -> None:
    from hqclip_fast.parallelize import parallelize_model

    torch.set_num_threads(1)
    with gloo_group(Path(out_dir, "init"), rank, world_size):
        ranks = EvalRanks.current("cpu")
        assert (ranks.rank, ranks.world_size) == (rank, world_size)
        _check_edge_cases(ranks)

        model = parallelize_model(_model())  # FSDP2: every encode call is a collective
        images_seen = []  # (batch size, blank?) per encode_image call
        model.visual.register_forward_hook(
            lambda module, args, out: images_seen.append((args[0].shape[0], bool((args[0] == 0).all()))))
        with _counting_decodes() as decoded:
            results = _suite(manifest).run(model, ClipTokenizer(CONTEXT), "cpu", ranks=ranks)
    printed = _eval_cli_as_torchrun_rank(rank, world_size, cli_port, manifest, out_dir)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"results": results, "images_seen": images_seen, "decoded": decoded, "cli_printed": printed}))


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_metrics(manifest, tmp_path):
    with _counting_decodes() as decoded:
        expected = _suite(manifest).run(_model(), ClipTokenizer(CONTEXT), "cpu")
    assert len(decoded) == 2 * (NUM_IMAGES + 1)  # the damaged samples are decoded (and skipped) too
    assert expected["zeroshot_samples"] == expected["retrieval_samples"] == expected["hard_negative_samples"] == 7
    assert {"zeroshot_top1", "zeroshot_top5", "image_to_text_R@1", "text_to_image_R@5", "hard_negative_acc"} \
        <= set(expected)

    export_open_clip(_model(), MODEL, tmp_path / "export")
    mp.spawn(_worker, args=(2, free_port(), manifest, str(tmp_path)), nprocs=2, join=True)
    outputs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for output in outputs:
        assert output["results"] == expected
    # Each rank encoded only its share: rank 0 four images per set, rank 1 three plus one blank batch.
    assert [tuple(call) for call in outputs[0]["images_seen"]] == [(3, False), (1, False)] * 2
    assert [tuple(call) for call in outputs[1]["images_seen"]] == [(3, False), (1, True)] * 2
    # Each rank decoded only its share: the samples at its tar positions (i % 2 == rank), damaged ones included.
    for rank, output in enumerate(outputs):
        mine = [call for split in DAMAGED_AT for call in [c for c in decoded if c[0] == split][rank::2]]
        assert [tuple(call) for call in output["decoded"]] == mine
    assert ("hardneg", "damaged") in mine and ("zeroshot", "damaged") in mine  # rank 1's
    # hqclip-eval: rank 0 prints and writes the whole sets' metrics, rank 1 reports nothing.
    assert json.loads(outputs[0]["cli_printed"]) == json.loads((tmp_path / "cli_rank0.json").read_text()) == expected
    assert outputs[1]["cli_printed"] == "" and not (tmp_path / "cli_rank1.json").exists()


def _sharded_worker(rank: int, world_size: int, manifest: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(Path(out_dir, "init"), rank, world_size):
        with _counting_decodes() as decoded:
            results = _suite(manifest).run(_model(), ClipTokenizer(CONTEXT), "cpu", ranks=EvalRanks.current("cpu"))
    Path(out_dir, f"sharded{world_size}_rank{rank}.json").write_text(json.dumps({"results": results,
                                                                                 "decoded": decoded}))


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_sets_of_several_shards_are_shared_by_whole_shards(world_size, tmp_path):
    """7 images per set in shards of 2 (4 shards): on 2 and 3 ranks each rank reads whole shards of its own
    (uneven shares: 4 + 3 or 3 + 2 + 2 images), and every metric equals one process's."""
    written = write_synthetic(str(tmp_path / "data"), num_samples=4, shard_size=2, seed=6, image_size=SIZE,
                              num_zeroshot=NUM_IMAGES, num_hardneg=NUM_IMAGES)
    manifest = str(tmp_path / "data" / "manifest.json")
    shards = {split: list(braceexpand.braceexpand(written[split])) for split in ("zeroshot", "hardneg")}
    assert {len(s) for s in shards.values()} == {4}
    with _counting_decodes() as decoded:
        expected = _suite(manifest).run(_model(), ClipTokenizer(CONTEXT), "cpu")
    mp.spawn(_sharded_worker, args=(world_size, manifest, str(tmp_path)), nprocs=world_size,
             join=True)
    outputs = [json.loads((tmp_path / f"sharded{world_size}_rank{r}.json").read_text()) for r in range(world_size)]
    for output in outputs:
        assert output["results"] == expected
    def keys(url):
        with tarfile.open(url) as tar:
            return {name.split(".")[0] for name in tar.getnames()}

    per_rank = [sorted(tuple(call) for call in output["decoded"]) for output in outputs]
    for rank, calls in enumerate(per_rank):  # only samples of its own shards
        mine = {(split, key) for split, urls in shards.items() for url in urls[rank::world_size] for key in keys(url)}
        assert calls and set(calls) <= mine
    assert sorted(call for calls in per_rank for call in calls) == sorted(tuple(call) for call in decoded)

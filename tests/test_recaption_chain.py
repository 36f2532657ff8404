"""From raw shards to an evaluated model through the project's own tools, with each recaptioner backend:
`hqclip-data synthetic` -> `hqclip-recaption run` -> `hqclip-data join` -> `hqclip-data tags build` ->
`hqclip-train` (a few steps) -> `hqclip-eval`. Every sample survives each step, and the trainer reads the
recaptioned texts, not the synthetic set's own descriptions."""

import json
from pathlib import Path

import pytest
import torch
from hqclip_recaption.cli import main as recaption_main
from hqclip_recaption.schema import CAPTION_FIELDS, max_answer_tokens
from recaption_helpers import BACKENDS, LIMIT_ARGS, LIMITS, MAX_PIXELS, backend_args, require

from hqclip_fast.config import load_config
from hqclip_fast.data import ClipTokenizer, build_train_loader
from hqclip_fast.data.cli import main as data_main
from hqclip_fast.eval import cli as eval_cli
from hqclip_fast.train import cli as train_cli

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
NUM_TRAIN, NUM_ZEROSHOT, NUM_HARDNEG = 6, 12, 4


def _json_lines(text: str) -> dict:
    """The last line of a command's output that is a JSON object (the commands print one report)."""
    return json.loads(next(line for line in reversed(text.strip().splitlines()) if line.startswith("{")))


def _records(folder: Path) -> dict[str, dict]:
    return {r["key"]: r for path in sorted(folder.glob("*.jsonl")) for r in map(json.loads, path.open())}


def _shard_records(shard_glob) -> dict[str, dict]:
    import tarfile

    out = {}
    for path in sorted(shard_glob):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    out[record["key"]] = record
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-vl")
    assert recaption_main(["make-tiny-model", str(path)]) == 0
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_raw_shards_to_an_evaluated_model(backend_name, tiny_model, tmp_path, capsys):
    require(backend_name)
    raw, annotations, joined = tmp_path / "raw", tmp_path / "annotations", tmp_path / "joined"
    assert data_main(["synthetic", "--out", str(raw), "--num-samples", str(NUM_TRAIN), "--shard-size", "4",
                      "--num-zeroshot", str(NUM_ZEROSHOT), "--num-hardneg", str(NUM_HARDNEG),
                      "--image-size", "32"]) == 0
    original = _shard_records((raw / "train").glob("*.tar"))
    assert len(original) == NUM_TRAIN
    capsys.readouterr()

    # The recaptioner reads the alt-text of the project's own shards (the record's alt_text field).
    assert recaption_main(["run", "--input", str(raw / "train" / "*.tar"), "--output", str(annotations),
                           *backend_args(backend_name), "--model", tiny_model, "--batch-size", "4",
                           "--max-new-tokens", str(max_answer_tokens(LIMITS)), "--max-pixels", str(MAX_PIXELS),
                           *LIMIT_ARGS]) == 0
    captions = _records(annotations)
    assert sorted(captions) == sorted(original)
    for key, record in captions.items():
        assert "error" not in record and "alt_text_empty" not in record, record
        assert record["alt_text"] == original[key]["alt_text"] != ""
    capsys.readouterr()

    assert data_main(["join", str(raw / "train" / "shard-{000000..000001}.tar"), str(annotations),
                      "--out", str(joined)]) == 0
    report = _json_lines(capsys.readouterr().out)
    assert (report["samples"], report["matched"], report["unmatched_images"], report["unmatched_annotations"]) == (
        NUM_TRAIN, NUM_TRAIN, 0, 0)
    assert report["problems"] == {}
    joined_records = _shard_records(joined.glob("*.tar"))
    for key, record in joined_records.items():
        assert {f: record[f] for f in CAPTION_FIELDS} == {f: captions[key][f] for f in CAPTION_FIELDS}
        assert record["alt_text"] == original[key]["alt_text"]

    tags = tmp_path / "tags.json"
    assert data_main(["tags", "build", str(joined / "*.tar"), "--out", str(tags)]) == 0
    vocabulary = set(json.loads(tags.read_text())["tags"])
    assert vocabulary and len(vocabulary) <= sum(len(r["positive_tags"]) for r in captions.values())

    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "steps=2", "batch_size=3", f"data.train_data={joined}/*.tar",
                 f"model.tag_vocab={tags}", f"eval.synthetic_manifest={raw}/manifest.json", "eval.every_steps=0",
                 "checkpoint.every_steps=0", "log.every_steps=1", "data.workers=0", "log.progress_bar=false",
                 "optim.warmup_steps=1"]
    train_cli(["--config", str(DEMO_CONFIG), *overrides])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    train_rows = [row for row in logged if "samples_ok" in row]
    assert train_rows and all(row["samples_skipped"] == 0 for row in train_rows)

    # The trainer's own loader with the run's resolved config: two epochs' worth of batches hold every sample,
    # each with its recaptioned description as the positive text (the demo config trains on descriptions only).
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = ClipTokenizer(cfg.data.context_length)
    loader = iter(build_train_loader(cfg.data, batch_size=cfg.batch_size, tokenizer=tokenizer))
    batches = [next(loader) for _ in range(2 * NUM_TRAIN // cfg.batch_size)]
    keys = [k for batch in batches for k in batch["keys"]]
    assert set(keys) == set(original)
    pos_tokens = torch.cat([batch["pos_tokens"] for batch in batches])
    assert torch.equal(pos_tokens, tokenizer([captions[k]["positive_description"] for k in keys]))
    assert not torch.equal(pos_tokens, tokenizer([original[k]["positive_description"] for k in keys]))

    results = tmp_path / "eval.json"
    capsys.readouterr()
    eval_cli(["--run", str(run_dir), "--synthetic-manifest", str(raw / "manifest.json"), "--out", str(results)])
    metrics = json.loads(results.read_text())
    assert (metrics["zeroshot_samples"], metrics["hard_negative_samples"]) == (NUM_ZEROSHOT, NUM_HARDNEG)
    assert 0.0 <= metrics["zeroshot_top1"] <= 1.0

"""The GPU campaign's plumbing on the CPU: collect_gpu_results.py turns campaign folders into issue 8's JSON
format and refuses inputs that would make a dishonest file; gpu_campaign.py rebuilds a cut-off bench_loss run.

The inputs here are small hand-made files in the benchmark scripts' own formats (their values are arbitrary
inputs, not measurements); the dry run `gpu_campaign.sh --device cpu` exercises the real scripts.
"""

import importlib.util
import json
import random
import sys
import tarfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GPU = "NVIDIA H100 80GB HBM3"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


collector = _load("collect_gpu_results")
campaign = _load("gpu_campaign")


def _loss_file(dim, negatives, batches, rng, skip_open_clip_at=None, device=GPU):
    impls = ["triton", "triton_2pass", "chunked", "gemm_floor"] + ([] if negatives else ["open_clip", "inf_cl"])
    cases = []
    for batch in batches:
        for impl in impls:
            case = {"impl": impl, "batch_size": batch, "dim": dim, "negatives": negatives}
            if impl == "open_clip" and batch == skip_open_clip_at:
                case["skipped"] = "failed: CUDA out of memory"
            else:
                case.update(time_ms_median=rng.uniform(1, 50), peak_extra_mib=rng.uniform(1, 4000), loss=3.0)
                if impl != "gemm_floor":
                    case["max_rel_err"] = rng.uniform(1e-6, 1e-2)
            cases.append(case)
    return {"device": "cuda", "device_name": device, "dim": dim, "dtype": "bfloat16", "negatives": negatives,
            "cases": cases}


def _train_file(batch, compiled, rng, device=GPU):
    rows = [{"name": name, "samples_per_s": rng.uniform(500, 3000), "flops_per_sample": 1e11, "mfu": rng.uniform(0.2, 0.6)}
            for name in ("hqclip-fast, CLIP loss", "open_clip_train", "hqclip-fast, HQ-CLIP loss")]
    return {"device": device, "device_type": "cuda", "rows": rows,
            "settings": {"model": "ViT-B-16", "batch_size": batch, "image_size": 224, "compile": compiled,
                         "precision": "bf16"}}


def _campaign_folder(root: Path, name: str, *, rng, device=GPU, commit="abc123", device_type="cuda",
                     loss=True, train=True) -> Path:
    folder = root / name
    (folder / "loss").mkdir(parents=True)
    (folder / "train").mkdir()
    env = {"date": "2026-12-01T10:00:00+00:00", "device_type": device_type, "device": device, "torch": "2.11.0",
           "triton": "3.6.0", "commit": commit}
    (folder / "env.json").write_text(json.dumps(env))
    steps = [{"name": "bench_loss D768-noneg", "status": "ok", "seconds": 100.0}]
    (folder / "campaign.json").write_text(json.dumps({"stages": ["loss", "train"], "steps": steps}))
    if loss:
        for negatives in (False, True):
            data = _loss_file(768, negatives, [4096, 32768], rng, skip_open_clip_at=4096, device=device)
            (folder / "loss" / f"loss-D768-{'neg' if negatives else 'noneg'}.json").write_text(json.dumps(data))
    if train:
        (folder / "train" / "train-b256.json").write_text(json.dumps(_train_file(256, False, rng, device)))
    return folder


def test_merged_file_has_issue_8_format(tmp_path):
    rng = random.Random(1)
    folder = _campaign_folder(tmp_path, "call1", rng=rng)
    result = collector.collect([folder])
    assert {"device", "torch", "triton", "commit", "date", "loss", "train"} <= result.keys()
    assert (result["device"], result["torch"], result["triton"], result["commit"], result["date"]) == (
        GPU, "2.11.0", "3.6.0", "abc123", "2026-12-01")
    assert len(result["loss"]) == 4  # 2 batch sizes x with/without negatives
    source = json.loads((folder / "loss" / "loss-D768-noneg.json").read_text())
    want = {c["impl"]: c for c in source["cases"] if c["batch_size"] == 32768}
    for entry in result["loss"]:
        assert set(entry) == {"B", "D", "dtype", "negatives", "ms", "peak_mib", "max_rel_err"}
        assert set(entry["ms"]) == {"hqclip_triton", "hqclip_triton_2pass", "chunked", "open_clip", "inf_cl",
                                    "gemm_floor"}
        assert set(entry["peak_mib"]) == {"hqclip_triton", "hqclip_triton_2pass", "open_clip", "inf_cl"}
    point = next(e for e in result["loss"] if e["B"] == 32768 and not e["negatives"])
    assert point["ms"]["hqclip_triton"] == pytest.approx(want["triton"]["time_ms_median"], rel=1e-3)
    assert point["ms"]["inf_cl"] == pytest.approx(want["inf_cl"]["time_ms_median"], rel=1e-3)
    assert point["peak_mib"]["open_clip"] == pytest.approx(want["open_clip"]["peak_extra_mib"], abs=0.01)
    assert point["max_rel_err"] == want["triton"]["max_rel_err"]
    # with negatives open_clip/Inf-CL did not run; at B=4096 open_clip failed: null, and the reason is kept
    negative = next(e for e in result["loss"] if e["B"] == 32768 and e["negatives"])
    assert negative["ms"]["open_clip"] is None and negative["peak_mib"]["inf_cl"] is None
    assert any(s["impl"] == "open_clip" and s["B"] == 4096 and "out of memory" in s["reason"]
               for s in result["skipped"])
    (train,) = result["train"]
    rows = {r["name"]: r for r in json.loads((folder / "train" / "train-b256.json").read_text())["rows"]}
    assert set(train) >= {"model", "batch", "image_size", "samples_per_s", "mfu"}
    assert (train["model"], train["batch"], train["image_size"]) == ("ViT-B-16", 256, 224)
    assert train["samples_per_s"] == {"hqclip_fast": round(rows["hqclip-fast, CLIP loss"]["samples_per_s"], 2),
                                      "open_clip": round(rows["open_clip_train"]["samples_per_s"], 2)}
    assert train["mfu"] == round(rows["hqclip-fast, CLIP loss"]["mfu"], 4)
    # the loss targets are computed from the B=32768, D=768 entry
    speedup = next(t for t in result["targets"] if t["target"].startswith("loss: open_clip"))
    assert speedup["value"] == pytest.approx(point["ms"]["open_clip"] / point["ms"]["hqclip_triton"], rel=1e-2)
    assert speedup["met"] == (speedup["value"] >= 2)
    table = collector.markdown(result)
    assert "| 32768 | 768 | bfloat16 | no |" in table and "ViT-B-16" in table
    # measured peaks beside the committed memory model's prediction for the same code path
    model = json.loads((collector.RESULTS / "memory_model.json").read_text())["cases"]
    predicted = next(c["peak_extra_mib"] for c in model if c["impl"] == "triton" and c["batch_size"] == 32768
                     and c["dim"] == 768 and not c["negatives"] and c["backward_passes"] == 2
                     and c["panel_mib"] == 32)
    check = {(m["impl"], m["B"], m["negatives"]): m for m in result["memory_model_check"]}
    row = check[("hqclip_triton_2pass", 32768, False)]
    assert row["modelled_mib"] == pytest.approx(predicted, abs=0.01)
    assert row["measured_mib"] == point["peak_mib"]["hqclip_triton_2pass"]
    assert ("open_clip", 32768, False) in check and "measured / modelled" in table


def test_missing_stage_results_are_an_error(tmp_path):
    folder = _campaign_folder(tmp_path, "call1", rng=random.Random(2), train=False)
    with pytest.raises(collector.CollectError, match="train"):
        collector.collect([folder])
    assert collector.collect([folder], require=("loss",))["train"] == []
    assert collector.main([str(folder), "--out", str(tmp_path / "x.json")]) == 2  # the CLI says so, writes nothing
    assert not (tmp_path / "x.json").exists()


def test_inputs_from_different_gpus_or_commits_are_refused(tmp_path):
    rng = random.Random(3)
    first = _campaign_folder(tmp_path, "a", rng=rng)
    other_gpu = _campaign_folder(tmp_path, "b", rng=rng, device="NVIDIA H200")
    with pytest.raises(collector.CollectError, match="device"):
        collector.collect([first, other_gpu])
    other_commit = _campaign_folder(tmp_path, "c", rng=rng, commit="def456")
    with pytest.raises(collector.CollectError, match="commits"):
        collector.collect([first, other_commit])
    assert collector.collect([first, other_commit], allow_mixed_commits=True)["commit"] == ["abc123", "def456"]


def test_cpu_runs_and_mismatched_files_are_refused(tmp_path):
    rng = random.Random(4)
    cpu = _campaign_folder(tmp_path, "cpu", rng=rng, device="CPU (x86_64)", device_type="cpu")
    with pytest.raises(collector.CollectError, match="cpu run"):
        collector.collect([cpu])
    assert collector.collect([cpu], allow_cpu=True)["device"] == "CPU (x86_64)"
    stray = _campaign_folder(tmp_path, "stray", rng=rng)
    data = _loss_file(512, False, [4096], rng)
    data["device_name"] = "NVIDIA A100"  # a file from another machine dropped into this call's folder
    (stray / "loss" / "loss-D512-noneg.json").write_text(json.dumps(data))
    with pytest.raises(collector.CollectError, match="A100"):
        collector.collect([stray])


def test_tarballs_merge_and_readme_table_is_replaced(tmp_path):
    rng = random.Random(5)
    loss_only = _campaign_folder(tmp_path, "call1", rng=rng, train=False)
    train_only = _campaign_folder(tmp_path, "call2", rng=rng, loss=False)
    tarballs = []
    for folder in (loss_only, train_only):
        tarball = tmp_path / f"campaign-{folder.name}.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            for path in folder.rglob("*"):
                tar.add(path, arcname=str(path.relative_to(folder)))
        tarballs.append(tarball)
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\ntext\n")
    out = tmp_path / "results" / "merged.json"
    assert collector.main([*map(str, tarballs), "--out", str(out), "--readme", str(readme)]) == 0
    merged = json.loads(out.read_text())
    assert len(merged["loss"]) == 4 and len(merged["train"]) == 1 and len(merged["sources"]) == 2
    first = readme.read_text()
    # the device calls' tarballs carry the same name when they ran the same stages; each is still read
    other_gpu = _campaign_folder(tmp_path, "call3", rng=rng, device="NVIDIA H200")
    (tmp_path / "h200").mkdir()
    with tarfile.open(tmp_path / "h200" / tarballs[0].name, "w:gz") as tar:
        for path in other_gpu.rglob("*"):
            tar.add(path, arcname=str(path.relative_to(other_gpu)))
    with pytest.raises(collector.CollectError, match="device"):
        collector.collect([tarballs[0], tmp_path / "h200" / tarballs[0].name])
    assert first.count(collector.README_START) == 1 and "| 32768 | 768 |" in first
    assert collector.main([*map(str, tarballs), "--out", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text() == first  # replaced in place, not appended twice
    assert out.with_suffix(".md").read_text() in first


def test_cut_off_bench_loss_run_is_rebuilt_from_its_printed_cases(tmp_path):
    cases = [{"impl": "triton", "batch_size": 32768, "dim": 768, "negatives": False, "time_ms_median": 9.0,
              "peak_extra_mib": 40.0, "max_rel_err": 1e-3}]
    log = tmp_path / "bench_loss.log"
    log.write_text("warming up\n" + "".join(json.dumps(c) + "\n" for c in cases) + '{"impl": "chunked", "bat')
    step = campaign.Step("loss", "bench_loss D768-noneg", ["python", "bench_loss.py", "--device", "cuda", "--dim",
                                                           "768", "--dtype", "bfloat16"], 10, ["loss/x.json"])
    out = tmp_path / "x.json"
    assert campaign.salvage_bench_loss(log, out, step)
    rebuilt = json.loads(out.read_text())
    assert rebuilt["incomplete"] and rebuilt["cases"] == cases and rebuilt["dim"] == 768
    assert not rebuilt["negatives"]
    (entry,) = collector.loss_entries(rebuilt, "x", [])
    assert entry["ms"]["hqclip_triton"] == 9.0 and entry["ms"]["open_clip"] is None
    empty = tmp_path / "empty.log"
    empty.write_text("Traceback: nothing printed\n")
    assert not campaign.salvage_bench_loss(empty, tmp_path / "y.json", step)


def test_cut_off_bench_train_run_keeps_the_rows_it_printed(tmp_path):
    log = tmp_path / "bench_train.log"
    log.write_text("hqclip-fast, CLIP loss             2345.6 samples/s     52.10 GFLOP/sample  MFU 12.3%\n"
                   "W1122 inductor: compiling\n"
                   "open_clip_train                    1800.0 samples/s     52.10 GFLOP/sample  MFU n/a\n")
    cmd = ["python", "bench_train.py", "--device", "cuda", "--model", "ViT-B-16", "--image-size", "224",
           "--batch-size", "256", "--precision", "bf16", "--compile"]
    step = campaign.Step("train", "bench_train b256 compile", cmd, 10, ["train/x.json"])
    out = tmp_path / "x.json"
    assert campaign.salvage_bench_train(log, out, step, GPU)
    rebuilt = json.loads(out.read_text())
    assert rebuilt["incomplete"] and [r["name"] for r in rebuilt["rows"]] == ["hqclip-fast, CLIP loss",
                                                                              "open_clip_train"]
    entry = collector.train_entry(rebuilt)
    assert entry["samples_per_s"] == {"hqclip_fast": 2345.6, "open_clip": 1800.0}
    assert entry["mfu"] == pytest.approx(0.123) and entry["compile"] and entry["hqclip_loss_samples_per_s"] is None
    log.write_text("Traceback: killed while compiling\n")
    assert not campaign.salvage_bench_train(log, tmp_path / "y.json", step, GPU)

"""The GPU campaign's one call, dry-run on the CPU, and its collector.

test_dry_run_of_the_one_call runs benchmarks/gpu_campaign.sh exactly as the device call does, with --device
cpu (tiny sizes, Triton's interpreter), then the collector on the tarball it returns. The other tests feed the
collector small hand-made files in the scripts' formats (their values are arbitrary inputs, not measurements)
to check its targets and its refusals, and the driver's caps, salvage and commit check.
"""

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
GPU = "NVIDIA H200"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


collector = _load("collect_gpu_results")
campaign = _load("gpu_campaign")


# ------------------------------------------------------------------------------------------ the dry run
@pytest.mark.slow
def test_dry_run_of_the_one_call(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "HQCLIP_WHEELS": str(tmp_path / "no-wheels"),
           "HQCLIP_SITE": str(tmp_path / "site"), "HQCLIP_SRC": str(tmp_path / "src")}
    env.pop("TRITON_INTERPRET", None)  # the driver sets it for the CPU itself
    start = time.monotonic()
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_campaign.sh"), "--device", "cpu", "--work", str(work),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=400)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert seconds < 400  # the driver's own budget bounds it (it took about 70 s on 2 shared cores)

    # What the device tool brings back: at most 8 files, none nested, names it accepts.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["campaign-main.tar.gz", "campaign.log", "partial.json", "partial.md"]
    log = (out / "campaign.log").read_text()
    for step in ("tests", "loss", "memory", "train"):
        assert f"[campaign] {step}: ok" in log, log[-3000:]
    assert "[campaign] train_compile: not run: needs CUDA" in log

    tarball = out / "campaign-main.tar.gz"
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"env.json", "campaign.json", "tests/tests.log", "loss/loss-D32.json", "memory/memory_model.json",
            "train/train-eager.json"} <= names

    # A CPU run never becomes a GPU result file ...
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "collect_gpu_results.py"), str(tarball),
                              "--out", str(tmp_path / "gpu.json")], capture_output=True, text=True)
    assert refused.returncode == 2 and "cpu run" in refused.stderr
    assert not (tmp_path / "gpu.json").exists()
    # ... but its partial view has every part of the call in the collector's format.
    result = collector.collect([tarball], require=("loss", "train"), allow_cpu=True, allow_dirty=True)
    assert result["device_type"] == "cpu" and result["commit"] == _head()
    assert [(e["B"], e["D"]) for e in result["loss"]] == [(8, 32), (24, 32)]
    for entry in result["loss"]:
        for key in ("hqclip_triton", "hqclip_triton_2pass", "open_clip", "gemm_floor", "gemm_floor3"):
            assert entry["ms"][key] > 0 and entry["peak_mib"][key] is not None, key
        assert entry["ms"]["inf_cl"] is None
        assert entry["check_rows"] == min(entry["B"], 16)  # the error is taken on a subsample
        assert 0 <= entry["rel_err"]["hqclip_triton"] < 1e-4 and 0 <= entry["rel_err"]["open_clip"] < 1e-4
        # measured beside modelled where the model has the case (the interpreter's triton layout it has not)
        assert entry["modelled_peak_mib"]["open_clip"] is not None and entry["modelled_peak_mib"]["gemm_floor"] is not None
        assert entry["modelled_peak_mib"]["hqclip_triton"] is None
    assert {s["impl"] for s in result["skipped"]} == {"inf_cl"}
    assert all("CUDA" in s["reason"] for s in result["skipped"])
    (train,) = result["train"]
    assert train["batch"] <= 16 and train["batch"] % 4 == 0 and not train["compile"]
    assert train["samples_per_s"]["hqclip_fast"] > 0 and train["samples_per_s"]["open_clip"] > 0
    assert set(train["largest_batch_predicted"]) == {"hqclip_fast", "open_clip_train"}
    assert result["tests"]["passed"] == 1 and result["tests"]["skipped"] == 2 and result["tests"]["complete"]
    assert [s["step"] for s in result["not_run"]] == ["train_compile"]
    # Every target is listed, none with a CPU figure.
    assert len(result["targets"]) == 10
    assert all(t["status"] == "not measured" and t["value"] is None and "CPU" in t["why"] for t in result["targets"])
    partial = json.loads((out / "partial.json").read_text())
    assert partial["loss"] == result["loss"] and partial["targets"] == result["targets"]
    assert "not measured" in (out / "partial.md").read_text()


def _head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------------------- hand-made GPU results
def _loss_file(dim, batches, rng, *, skip=None, device=GPU, commit="abc123", launch_2pass=(True, 32.0)):
    cases = []
    for batch in batches:
        for impl in ["triton", "triton_2pass", "open_clip", "inf_cl", "gemm_floor", "gemm_floor3"]:
            case = {"impl": impl, "batch_size": batch, "dim": dim, "negatives": False}
            if skip and skip[0] == impl and skip[1] == batch:
                case["skipped"] = skip[2]
            else:
                case.update(time_ms_median=rng.uniform(1, 50), peak_extra_mib=rng.uniform(1, 4000), loss=3.0)
                if not impl.startswith("gemm"):
                    case.update(max_rel_err=rng.uniform(1e-6, 1e-2), check_rows=8192)
                if impl == "triton":
                    case["launch"] = {"two_pass": False, "panel_mib": 128.0}
                if impl == "triton_2pass":
                    case["launch"] = {"two_pass": launch_2pass[0], "panel_mib": launch_2pass[1]}
            cases.append(case)
    return {"device": "cuda", "device_name": device, "dim": dim, "dtype": "bfloat16", "negatives": False,
            "git_commit": commit, "cases": cases}


def _model_file(dim, batches):
    cases = [{"impl": impl, "batch_size": b, "dim": dim, "negatives": False, "peak_extra_mib": 100.0 + b / 1000}
             for b in batches for impl in ("open_clip", "gemm_floor", "gemm_floor3")]
    cases += [{"impl": "triton", "batch_size": b, "dim": dim, "negatives": False, "backward_passes": passes,
               "panel_mib": panel, "peak_extra_mib": float(passes * 1000 + panel)}
              for b in batches for passes in (1, 2) for panel in (32, 128)]
    return {"dtype": "bfloat16", "git_commit": "abc123", "cases": cases}


def _train_file(batch, rng, *, device=GPU, skip_open_clip=False):
    rows = [{"name": name, "samples_per_s": rng.uniform(500, 3000), "flops_per_sample": 1e11,
             "mfu": rng.uniform(0.2, 0.6)} for name in ("hqclip-fast, CLIP loss", "open_clip_train",
                                                        "hqclip-fast, HQ-CLIP loss")]
    if skip_open_clip:
        rows[1] = {"name": "open_clip_train", "skipped": f"out of memory at batch {batch}: CUDA out of memory"}
    probe = {"batch_size": batch, "sides": {"hqclip_fast": {"predicted_max": 2 * batch},
                                            "open_clip_train": {"predicted_max": batch}}}
    return {"device": device, "device_type": "cuda", "git_commit": "abc123", "rows": rows, "batch_probe": probe,
            "settings": {"model": "ViT-B-16", "batch_size": batch, "image_size": 224, "compile": False,
                         "precision": "bf16"}}


def _call_folder(root: Path, name: str, *, rng, device=GPU, commit="abc123", dirty=False, device_type="cuda",
                 loss=True, train=True, steps=None, **loss_options) -> Path:
    folder = root / name
    for sub in ("loss", "train", "memory"):
        (folder / sub).mkdir(parents=True)
    env = {"date": "2026-12-01T10:00:00+00:00", "device_type": device_type, "device": device, "torch": "2.11.0",
           "triton": "3.6.0", "commit": commit, "dirty": dirty, "changed_files": []}
    (folder / "env.json").write_text(json.dumps(env))
    steps = steps or [{"name": n, "status": "ok", "seconds": 10.0} for n in ("tests", "loss", "memory", "train")]
    (folder / "campaign.json").write_text(json.dumps({"call": "main", "budget_s": 400, "steps": steps}))
    (folder / "memory" / "memory_model.json").write_text(json.dumps(_model_file(768, [8192, 32768])))
    if loss:
        data = _loss_file(768, [8192, 32768], rng, device=device, commit=commit, **loss_options)
        (folder / "loss" / "loss-D768.json").write_text(json.dumps(data))
    if train:
        (folder / "train" / "train-eager.json").write_text(json.dumps(_train_file(512, rng, device=device)))
    return folder


def _targets(result):
    return {t["target"].split(",")[0]: t for t in result["targets"]}


def test_one_call_makes_the_result_file_with_every_target(tmp_path):
    folder = _call_folder(tmp_path, "call1", rng=random.Random(1))
    result = collector.collect([folder])
    assert (result["device"], result["torch"], result["triton"], result["commit"], result["date"]) == (
        GPU, "2.11.0", "3.6.0", "abc123", "2026-12-01")
    source = {c["impl"]: c for c in json.loads((folder / "loss" / "loss-D768.json").read_text())["cases"]
              if c["batch_size"] == 32768}
    point = next(e for e in result["loss"] if e["B"] == 32768)
    assert point["ms"]["hqclip_triton"] == pytest.approx(source["triton"]["time_ms_median"], rel=1e-3)
    assert point["ms"]["gemm_floor3"] == pytest.approx(source["gemm_floor3"]["time_ms_median"], rel=1e-3)
    assert point["peak_mib"]["open_clip"] == pytest.approx(source["open_clip"]["peak_extra_mib"], abs=0.01)
    assert point["max_rel_err"] == source["triton"]["max_rel_err"] and point["check_rows"] == 8192
    # the memory model's case for the layout each fused run reports: one pass at 128 MiB, two at 32 MiB
    assert point["modelled_peak_mib"]["hqclip_triton"] == 1128.0
    assert point["modelled_peak_mib"]["hqclip_triton_2pass"] == 2032.0
    assert point["modelled_peak_mib"]["open_clip"] == pytest.approx(132.768, abs=0.01) and point["modelled_peak_mib"]["inf_cl"] is None

    targets = _targets(result)
    speedup = targets["loss speed-up over open_clip ClipLoss (open_clip ms / triton ms)"]
    assert speedup["value"] == pytest.approx(source["open_clip"]["time_ms_median"] / source["triton"]["time_ms_median"],
                                             rel=1e-3)
    assert speedup["status"] == ("met" if speedup["value"] >= 2 else "missed") and speedup["why"] is None
    floor = targets["loss time / GEMM floor (four cuBLAS GEMMs)"]
    assert floor["value"] == pytest.approx(source["triton"]["time_ms_median"] / source["gemm_floor"]["time_ms_median"],
                                           rel=1e-3)
    (train,) = result["train"]
    rows = {r["name"]: r for r in json.loads((folder / "train" / "train-eager.json").read_text())["rows"]}
    ratio = targets["training samples/s"]["value"]
    assert ratio == pytest.approx(rows["hqclip-fast, CLIP loss"]["samples_per_s"] / rows["open_clip_train"]["samples_per_s"],
                                  rel=1e-3)
    assert targets["training MFU"]["value"] == round(rows["hqclip-fast, CLIP loss"]["mfu"], 4)
    assert train["largest_batch_predicted"] == {"hqclip_fast": 1024, "open_clip_train": 512}
    # what the optional second call measures is listed as not measured, and why
    towers = targets["towers: ViT-B-16 whole model"]
    assert towers["status"] == "not measured" and "optional second call" in towers["why"]
    table = collector.markdown(result)
    assert "| 32768 | 768 | bfloat16 | no | hqclip_triton |" in table and "ViT-B-16" in table
    assert "not measured: step towers is not in the call" in table


def test_targets_say_why_they_were_not_measured(tmp_path):
    rng = random.Random(2)
    steps = [{"name": "tests", "status": "ok"}, {"name": "loss", "status": "ok"},
             {"name": "train", "status": "timed out", "log_tail": "killed while probing the batch"},
             {"name": "train_compile", "status": "not run", "reason": "budget spent (30 s left, the step needs 120)"}]
    folder = _call_folder(tmp_path, "cut", rng=rng, train=False, steps=steps,
                          skip=("open_clip", 32768, "failed: OutOfMemoryError: CUDA out of memory"))
    result = collector.collect([folder], require=("loss",))
    targets = _targets(result)
    assert targets["loss speed-up over open_clip ClipLoss (open_clip ms / triton ms)"]["status"] == "not measured"
    assert "open_clip at B=32768" in targets["loss speed-up over open_clip ClipLoss (open_clip ms / triton ms)"]["why"]
    assert targets["loss speed-up over Inf-CL 1.2.1 (inf_cl ms / triton ms)"]["value"] is not None
    why = targets["training samples/s"]["why"]
    assert "step train timed out" in why and "step train_compile not run" in why
    assert [s["step"] for s in result["not_run"]] == ["train", "train_compile"]
    with pytest.raises(collector.CollectError, match="train"):
        collector.collect([folder])
    assert collector.main([str(folder), "--out", str(tmp_path / "x.json")]) == 2  # the CLI says so, writes nothing
    assert not (tmp_path / "x.json").exists()


def test_mixed_devices_commits_and_dirty_trees_are_refused(tmp_path):
    rng = random.Random(3)
    first = _call_folder(tmp_path, "a", rng=rng)
    with pytest.raises(collector.CollectError, match="device"):
        collector.collect([first, _call_folder(tmp_path, "b", rng=rng, device="NVIDIA H100 80GB HBM3")])
    with pytest.raises(collector.CollectError, match="commit"):
        collector.collect([first, _call_folder(tmp_path, "c", rng=rng, commit="def456")])
    dirty = _call_folder(tmp_path, "d", rng=rng, dirty=True)
    with pytest.raises(collector.CollectError, match="not a known commit"):
        collector.collect([dirty])
    assert collector.collect([dirty], allow_dirty=True)["dirty"] is True
    cpu = _call_folder(tmp_path, "cpu", rng=rng, device="CPU (x86_64)", device_type="cpu")
    with pytest.raises(collector.CollectError, match="cpu run"):
        collector.collect([cpu])
    # a file from another machine, or made at another commit, dropped into a call's folder
    stray = _call_folder(tmp_path, "stray", rng=rng)
    (stray / "loss" / "loss-D512.json").write_text(json.dumps(_loss_file(512, [4096], rng, device="NVIDIA A100")))
    with pytest.raises(collector.CollectError, match="A100"):
        collector.collect([stray])
    stale = _call_folder(tmp_path, "stale", rng=rng)
    (stale / "loss" / "loss-D512.json").write_text(json.dumps(_loss_file(512, [4096], rng, commit="0ld")))
    with pytest.raises(collector.CollectError, match="0ld"):
        collector.collect([stale])


def test_tarball_to_result_file_and_readme_table(tmp_path):
    folder = _call_folder(tmp_path, "call1", rng=random.Random(5))
    tarball = tmp_path / "campaign-main.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for path in folder.rglob("*"):
            tar.add(path, arcname=str(path.relative_to(folder)))
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\ntext\n")
    out = tmp_path / "results" / "merged.json"
    assert collector.main([str(tarball), "--out", str(out), "--readme", str(readme)]) == 0
    merged = json.loads(out.read_text())
    assert len(merged["loss"]) == 2 and len(merged["train"]) == 1 and merged["calls"][0]["input"] == tarball.name
    first = readme.read_text()
    assert first.count(collector.README_START) == 1 and "| 32768 | 768 |" in first and "abc123" in first
    assert collector.main([str(tarball), "--out", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text() == first  # replaced in place, not appended twice
    assert out.with_suffix(".md").read_text() in first


# ------------------------------------------------------------------------------------------ the driver
def test_cut_off_runs_are_rebuilt_from_their_printed_lines(tmp_path):
    cases = [{"impl": "triton", "batch_size": 32768, "dim": 768, "negatives": False, "time_ms_median": 9.0,
              "peak_extra_mib": 40.0, "max_rel_err": 1e-3}]
    log = tmp_path / "loss.log"
    log.write_text("warming up\n" + "".join(json.dumps(c) + "\n" for c in cases) + '{"impl": "open_clip", "bat')
    step = campaign.loss_step(type("Args", (), {"device": "cuda", "work": tmp_path})(), "loss", dim=768,
                              batches="32768", impls="triton,open_clip")
    out = tmp_path / "x.json"
    assert campaign.salvage_bench_loss(log, out, step, GPU)
    rebuilt = json.loads(out.read_text())
    assert rebuilt["incomplete"] and rebuilt["cases"] == cases and rebuilt["device_name"] == GPU
    (entry,) = collector.loss_entries(rebuilt, "x", [])
    assert entry["ms"]["hqclip_triton"] == 9.0 and entry["ms"]["open_clip"] is None

    log = tmp_path / "train.log"
    probe = {"batch_size": 768, "sides": {"hqclip_fast": {"predicted_max": 900}}}
    log.write_text(json.dumps({"probe": probe}) + "\nW1122 inductor: compiling\n"
                   + json.dumps({"name": "hqclip-fast, CLIP loss", "samples_per_s": 2345.6, "mfu": 0.123}) + "\n")
    step = campaign.train_step(type("Args", (), {"device": "cuda", "work": tmp_path})(), "train_compile",
                               compiled=True, cap_s=None)
    assert campaign.salvage_bench_train(log, out, step, GPU)
    entry = collector.train_entry(json.loads(out.read_text()))
    assert entry["batch"] == 768 and entry["compile"] and entry["samples_per_s"] == {"hqclip_fast": 2345.6,
                                                                                     "open_clip": None}
    log.write_text("Traceback: killed while compiling\n")
    assert not campaign.salvage_bench_train(log, tmp_path / "y.json", step, GPU)


def test_a_step_is_killed_at_its_cap_and_none_starts_without_budget(tmp_path):
    sleeper = campaign.Step("sleeper", [sys.executable, "-c", "import time; print('started', flush=True); "
                                        "time.sleep(60)"], cap_s=1, min_left_s=0)
    start = time.monotonic()
    record = campaign.run_step(sleeper, tmp_path, time.monotonic() + 100, open(os.devnull, "w"))
    assert time.monotonic() - start < 30
    assert record["status"] == "timed out" and "started" in record["log_tail"]
    late = campaign.Step("late", ["true"], cap_s=10)
    record = campaign.run_step(late, tmp_path, time.monotonic() + 5, open(os.devnull, "w"))
    assert record["status"] == "not run" and "budget spent" in record["reason"]


def test_the_call_selects_tests_that_exist():
    """A node id pytest cannot find fails the whole tests step on the device, not just that test."""
    for node in campaign.MAIN_TESTS + campaign.DRY_RUN_TESTS:
        path, name = node.split("::")
        assert f"def {name.split('[')[0]}(" in (REPO / path).read_text(), node


def test_batch_probe_cuts_the_batch_until_every_side_fits():
    """bench_train's probe: the prediction (here the cap, since fake steps take no memory) is confirmed by a
    step of every side, and cut by a fifth, to a multiple of the probe batch, while one runs out of memory."""
    import torch

    bench_train = _load("bench_train")
    tried = []

    def fits_40(batch):
        tried.append(batch)
        if batch > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    probe = bench_train.largest_batch({"ours": lambda b: None, "theirs": fits_40}, torch.device("cpu"), 4, 64)
    assert probe["batch_size"] == 36 and [o["batch"] for o in probe["out_of_memory"]] == [64, 48]
    assert "out of memory" in probe["out_of_memory"][0]["error"]
    assert tried[-1] == 36 and set(probe["sides"]) == {"ours", "theirs"}


def test_the_tree_is_checked_against_the_stamped_commit(tmp_path, monkeypatch):
    """Without .git (as on the device machine) the commit comes from wheels/COMMIT, and only if every file
    still has the content git recorded for it."""
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "a.py").write_text("x = 1\n")
    (tree / "b.txt").write_bytes(b"bytes\x00\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    (tree / "wheels").mkdir()
    (tree / "wheels" / "COMMIT").write_text(git("rev-parse", "HEAD") + git("ls-tree", "-r", "HEAD"))
    sha = git("rev-parse", "HEAD").strip()
    shutil.rmtree(tree / ".git")
    monkeypatch.setattr(campaign, "REPO", tree)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find a repository above
    assert campaign.git_commit() == {"commit": sha, "dirty": False, "changed_files": [],
                                     "commit_source": "wheels/COMMIT"}
    (tree / "pkg" / "a.py").write_text("x = 2\n")
    assert campaign.git_commit()["dirty"] and campaign.git_commit()["changed_files"] == ["pkg/a.py"]

"""Turn one GPU campaign call's tarball (with the optional second call's) into benchmarks/results/<date>-<gpu>.json
(issue 8's format plus the rest) and a Markdown table; optionally put the table into the README.

    python benchmarks/collect_gpu_results.py /tmp/gpu-campaign/campaign-main.tar.gz --readme README.md
    python benchmarks/collect_gpu_results.py campaign-main.tar.gz campaign-extra.tar.gz --readme README.md
    python benchmarks/collect_gpu_results.py /tmp/hqclip-campaign --partial --out x.json   # cut-off or dry run

Inputs are campaign work folders or the tarballs gpu_campaign.py packs them into: env.json (device, versions,
commit), campaign.json (the steps and how they ended) and one folder per step with the scripts' own files.
Refused, writing nothing: inputs from different devices, versions or commits; a result file measured on
another device or commit than its call's env.json; an unknown commit or a tree that differs from it (dirty); a
CPU run; a required section (loss, train) without results. --partial accepts the last four (one call's view,
a cut-off call, the CPU dry run). Every target is reported as met, missed, or not measured with the reason:
the step that did not run or finish, the case that was skipped, or no GPU data at all.
Standard library only: gpu_campaign.py runs it after every step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# bench_loss impl -> issue 8's key
LOSS_KEYS = {"triton": "hqclip_triton", "triton_2pass": "hqclip_triton_2pass", "chunked": "chunked",
             "open_clip": "open_clip", "inf_cl": "inf_cl", "gemm_floor": "gemm_floor", "gemm_floor3": "gemm_floor3"}
FLOOR_PRODUCTS = {"gemm_floor": 4, "gemm_floor3": 3}  # B x D by D x N products, 2 B N D FLOPs each
TRAIN_ROWS = {"hqclip-fast, CLIP loss": "hqclip_fast", "open_clip_train": "open_clip"}
HQ_ROW = "hqclip-fast, HQ-CLIP loss"
TARGET_POINT = {"B": 32768, "D": 768, "dtype": "bfloat16", "negatives": False}
STEPS = {"loss": ("loss",), "train": ("train", "train_compile"), "towers": ("towers",), "loader": ("loader",)}
README_START, README_END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
TEST_LINE = re.compile(r"^(?P<test>tests/\S+::\S+) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


class CollectError(ValueError):
    """The inputs cannot make an honest result file (mixed devices or commits, dirty tree, CPU run, ...)."""


# ---------------------------------------------------------------------------------------------- reading
def _open_input(path: Path, scratch: Path) -> Path:
    if path.is_dir():
        return path
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        target = scratch / str(len(list(scratch.iterdir())))  # calls' tarballs can share a name
        with tarfile.open(path) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, filter="data")  # no absolute paths or links out of the folder
            else:
                tar.extractall(target)  # noqa: S202 - Python without extraction filters (before 3.10.12)
        return target
    raise CollectError(f"input {path}: neither a campaign folder nor a .tar.gz of one")


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CollectError(f"{path}: not valid JSON ({err})") from err


def loss_entries(result: dict, source: str, skipped: list) -> list[dict]:
    """bench_loss.py result (one D, one negatives setting, several B) -> one entry per B."""
    by_batch: dict[int, dict] = {}
    for case in result["cases"]:
        by_batch.setdefault(case["batch_size"], {})[case["impl"]] = case
    entries = []
    for batch in sorted(by_batch):
        cases = by_batch[batch]
        entry = {"B": batch, "D": result["dim"], "dtype": result["dtype"], "negatives": result["negatives"],
                 "ms": {}, "peak_mib": {}, "rel_err": {}, "launch": {}, "check_rows": None, "max_rel_err": None}
        for impl, key in LOSS_KEYS.items():
            case = cases.get(impl)
            measured = case is not None and "skipped" not in case
            entry["ms"][key] = round(case["time_ms_median"], 4) if measured else None
            entry["peak_mib"][key] = round(case["peak_extra_mib"], 2) if measured else None
            entry["rel_err"][key] = case.get("max_rel_err") if measured else None
            if measured and "launch" in case:
                entry["launch"][key] = case["launch"]
            if measured and case.get("check_rows"):
                entry["check_rows"] = case["check_rows"]
            if case is not None and not measured:
                skipped.append({"section": "loss", "B": batch, "D": result["dim"], "negatives": result["negatives"],
                                "impl": key, "reason": case["skipped"], "source": source})
        entry["max_rel_err"] = entry["rel_err"]["hqclip_triton"]  # issue 8's key: the fused loss's error
        entries.append(entry)
    return entries


def attach_memory_model(entries: list[dict], model: dict | None) -> None:
    """Beside each measured peak, what benchmarks/memory_model.py predicts for the same case (the fused loss
    with the backward passes and panel size it ran with), or None where the model has no such case."""
    modelled = {}
    for c in (model or {}).get("cases", []):
        if "skipped" not in c:
            modelled[(c["impl"], c.get("backward_passes"), c.get("panel_mib"), c["batch_size"], c["dim"],
                      c["negatives"])] = round(c["peak_extra_mib"], 2)
    for e in entries:
        e["modelled_peak_mib"] = {}
        for impl, key in LOSS_KEYS.items():
            if e["ms"][key] is None or model is None or model.get("dtype") != e["dtype"]:
                e["modelled_peak_mib"][key] = None
                continue
            launch = e["launch"].get(key)
            passes, panel = (2 if launch["two_pass"] else 1, launch["panel_mib"]) if launch else (None, None)
            name = "triton" if impl.startswith("triton") else impl
            e["modelled_peak_mib"][key] = modelled.get((name, passes, panel, e["B"], e["D"], e["negatives"]))


def train_entry(result: dict) -> dict:
    rows = {row["name"]: row for row in result["rows"]}
    settings = result["settings"]

    def rate(name):
        row = rows.get(name, {})
        return round(row["samples_per_s"], 2) if "samples_per_s" in row else None

    ours = rows.get("hqclip-fast, CLIP loss", {})
    probe = result.get("batch_probe") or {}
    return {"model": settings["model"], "batch": settings["batch_size"], "image_size": settings["image_size"],
            "samples_per_s": {key: rate(name) for name, key in TRAIN_ROWS.items()},
            "mfu": round(ours["mfu"], 4) if ours.get("mfu") is not None else None,
            # beyond issue 8's keys: how the row was measured, the full HQ-CLIP loss step, the batch probe
            "compile": settings.get("compile", False), "precision": settings.get("precision"),
            "hqclip_loss_samples_per_s": rate(HQ_ROW),
            "largest_batch_predicted": {side: v["predicted_max"] for side, v in probe.get("sides", {}).items()},
            "skipped": {name: row["skipped"] for name, row in rows.items() if "skipped" in row}}


def tests_summary(log: Path) -> dict:
    """pytest -v's one line per finished test; `complete` says whether pytest got to its final summary (a
    run stopped at its cap has only the tests before the cut)."""
    text = log.read_text(errors="replace")
    outcomes = {}
    for line in text.splitlines():
        match = TEST_LINE.match(line)
        if match:
            outcomes[match["test"]] = match["outcome"].lower()
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "complete": bool(re.search(r"^=+ .* in [\d.]+s", text, re.M)),
            "not_passed": {test: outcome for test, outcome in outcomes.items() if outcome != "passed"}}


def towers_summary(result: dict, source: str) -> dict:
    return {"model": result["args"]["model"], "batch": result["args"]["batch"], "dtype": result["args"]["dtype"],
            "compile": result["args"]["compile"], "speedup_vs_open_clip": result["speedup_vs_open_clip"],
            "rows": [r for r in result["results"] if "skipped" not in r],
            "skipped": [r for r in result["results"] if "skipped" in r], "source": source}


def loader_summary(result: dict) -> dict:
    keys = ("cpu_loader", "dali_cpu_mode", "gpu_decode", "vit_b16_step", "gpu_decode_over_vit_step", "tokenizer")
    return {key: result[key] for key in keys if key in result}


# ---------------------------------------------------------------------------------------------- merging
def collect(inputs: list[Path], *, require=("loss", "train"), allow_cpu: bool = False,
            allow_dirty: bool = False) -> dict:
    """Read campaign folders/tarballs and return the merged result."""
    if not inputs:
        raise CollectError("no inputs given")
    with tempfile.TemporaryDirectory() as scratch:
        folders = [(Path(path), _open_input(Path(path), Path(scratch))) for path in inputs]
        return _collect(folders, require, allow_cpu, allow_dirty)


def read_call(path: Path, folder: Path) -> dict:
    """One call's folder: its env.json, steps and results (each file checked against env.json)."""
    if not (folder / "env.json").exists():
        raise CollectError(f"{path}: no env.json (not a gpu_campaign.py work folder?)")
    env = _json(folder / "env.json")
    campaign = _json(folder / "campaign.json") if (folder / "campaign.json").exists() else {"steps": []}
    call = {"env": env, "skipped": [], "incomplete": [], "loss": [], "train": [], "towers": [], "loader": None,
            "tests": None, "record": {
                "input": path.name, "call": campaign.get("call"), "date": env.get("date"),
                "budget_s": campaign.get("budget_s"),
                "steps": [{"name": s["name"], "status": s["status"], "seconds": s.get("seconds"),
                           "reason": s.get("reason") or s.get("log_tail", "")[-300:] or None}
                          for s in campaign["steps"]]}}

    def read(file, device_key="device"):
        return _read(file, env, device_key, call["incomplete"], f"{path.name}:{file.relative_to(folder)}")

    model_file = folder / "memory" / "memory_model.json"
    model = read(model_file, device_key=None) if model_file.exists() else None
    for file in sorted(folder.glob("loss*/loss-*.json")):
        entries = loss_entries(read(file, "device_name"), f"{path.name}:{file.relative_to(folder)}", call["skipped"])
        attach_memory_model(entries, model)
        call["loss"] += entries
    call["train"] = [train_entry(read(file)) for file in sorted(folder.glob("train*/train-*.json"))]
    call["towers"] = [towers_summary(read(file), f"{path.name}:{file.relative_to(folder)}")
                      for file in sorted(folder.glob("towers/*.json"))]
    if (folder / "loader" / "loader.json").exists():
        call["loader"] = loader_summary(read(folder / "loader" / "loader.json"))
    if (folder / "tests" / "tests.log").exists():
        call["tests"] = tests_summary(folder / "tests" / "tests.log")
    call["profile"] = [f"{path.name}:{p.relative_to(folder)}" for p in sorted(folder.glob("profile/*"))]
    return call


def _collect(folders, require, allow_cpu, allow_dirty) -> dict:
    calls = [read_call(path, folder) for path, folder in folders]
    env = _agree([(path, call["env"]) for (path, _), call in zip(folders, calls)], allow_cpu, allow_dirty)
    loss = {(e["B"], e["D"], e["dtype"], e["negatives"]): e for call in calls for e in call["loss"]}
    train = {(e["model"], e["batch"], e["image_size"], e["compile"]): e for call in calls for e in call["train"]}
    records = [call["record"] for call in calls]
    result = {
        "device": env["device"], "device_type": env["device_type"], "torch": env["torch"], "triton": env["triton"],
        "commit": env["commit"], "dirty": env["dirty"], "date": min(call["env"]["date"] for call in calls)[:10],
        "versions": {k: env.get(k) for k in ("python", "numpy", "open_clip", "inf_cl", "xformers", "nvidia_smi")},
        "calls": records,
        "loss": sorted(loss.values(), key=lambda e: (e["D"], e["negatives"], e["dtype"], e["B"])),
        "train": sorted(train.values(), key=lambda e: (e["model"], e["batch"], e["compile"])),
        "tests": next((call["tests"] for call in calls if call["tests"]), None),
        "towers": [t for call in calls for t in call["towers"]],
        "loader": next((call["loader"] for call in calls if call["loader"]), None),
        "profile_files": [f for call in calls for f in call["profile"]],
        "skipped": [s for call in calls for s in call["skipped"]],
        "incomplete": [s for call in calls for s in call["incomplete"]],
        "not_run": [{"input": c["input"], "step": s["name"], "status": s["status"], "reason": s["reason"]}
                    for c in records for s in c["steps"] if s["status"] != "ok"],
    }
    missing = [section for section in require if not result.get(section)]
    if missing:
        raise CollectError(f"no results for required section(s) {missing} in {[str(p) for p, _ in folders]}; "
                           "pass --partial to keep what there is")
    result["targets"] = targets(result)
    return result


def _read(file: Path, env: dict, device_key: str | None, incomplete: list, label: str) -> dict:
    """A result file, checked against its call's env.json: it must come from the same device and commit
    (where it names them; bench_towers and bench_loader keep theirs under "env")."""
    result = _json(file)
    where = result.get("env", result)
    _check_file(file, where.get(device_key) if device_key else None, where.get("git_commit"), env)
    if result.get("incomplete"):
        incomplete.append(f"{label}: {result.get('note', 'incomplete')}")
    return result


def _check_file(file: Path, device, commit, env) -> None:
    if env.get("device_type") == "cuda" and device is not None and device != env["device"]:
        raise CollectError(f"{file}: measured on {device!r}, but its call ran on {env['device']!r}")
    if commit and env.get("commit") and commit != env["commit"]:
        raise CollectError(f"{file}: made at commit {commit}, but its call ran at {env['commit']}")


def _agree(envs, allow_cpu, allow_dirty) -> dict:
    first_path, first = envs[0]
    for path, env in envs:
        if env.get("device_type") != "cuda" and not allow_cpu:
            raise CollectError(f"{path}: a {env.get('device_type')} run ({env.get('device')}); GPU result files "
                               "take GPU runs only (--partial is for dry runs)")
        if not allow_dirty and (not env.get("commit") or env.get("dirty") is not False):
            raise CollectError(f"{path}: the tree measured is not a known commit (commit {env.get('commit')}, "
                               f"changed {env.get('changed_files')}); commit, run fetch_gpu_wheels.sh, call again")
        for key in ("device", "torch", "triton", "commit"):
            if env.get(key) != first.get(key):
                raise CollectError(f"inputs disagree on {key}: {first_path} has {first.get(key)!r}, {path} has "
                                   f"{env.get(key)!r}; results from different machines or code are not comparable")
    return first


# ---------------------------------------------------------------------------------------------- targets
def _why_step(result: dict, section: str) -> str | None:
    """None if a step of this section finished in some call, else why not."""
    steps = [(c["call"], s) for c in result["calls"] for s in c["steps"] if s["name"] in STEPS[section]]
    if any(s["status"] == "ok" for _, s in steps):
        return None
    if not steps:
        return f"step {'/'.join(STEPS[section])} is not in the call(s) collected (the optional second call)"
    return "; ".join(f"step {s['name']} {s['status']}" + (f" ({s['reason'][:120]})" if s.get("reason") else "")
                     for _, s in steps)


def targets(result: dict) -> list[dict]:
    """Issue 14's targets, each met, missed or not measured (value None, with the reason)."""
    gpu = result["device_type"] == "cuda"
    point = next((e for e in result["loss"] if all(e[k] == v for k, v in TARGET_POINT.items())), None)
    at = "B=32768, D=768, bf16"

    def loss_ratio(top, bottom, field="ms"):
        if point is None or point[field][top] is None or point[field][bottom] is None:
            for key in (top, bottom):
                reason = next((s["reason"] for s in result["skipped"] if s["impl"] == key and s["B"] == 32768
                               and s["D"] == 768 and not s["negatives"]), None)
                if reason:
                    return None, f"{key} at {at}: {reason[:160]}"
            return None, _why_step(result, "loss") or f"no {top} and {bottom} result at {at}"
        return round(point[field][top] / point[field][bottom], 4), None

    vit = [e for e in result["train"] if (e["model"], e["image_size"], e["precision"]) == ("ViT-B-16", 224, "bf16")]
    best = max((e for e in vit if e["samples_per_s"]["hqclip_fast"]), default=None,
               key=lambda e: e["samples_per_s"]["hqclip_fast"])

    def train_value(kind):
        if best is None:
            return None, _why_step(result, "train") or "no ViT-B-16 224 px bf16 training row"
        where = f" (batch {best['batch']}, {'compiled' if best['compile'] else 'eager'})"
        if kind == "mfu":
            return best["mfu"], None if best["mfu"] is not None else "no MFU (no device peak)" + where
        ours, theirs = best["samples_per_s"]["hqclip_fast"], best["samples_per_s"]["open_clip"]
        if not theirs:
            return None, f"open_clip_train: {best['skipped'].get('open_clip_train', 'no row')}" + where
        return round(ours / theirs, 4), None

    tower = [t["speedup_vs_open_clip"].get("model") for t in result["towers"]
             if t["model"] == "ViT-B-16" and t["speedup_vs_open_clip"].get("model") is not None]
    loader = (result["loader"] or {}).get("gpu_decode_over_vit_step")
    rows = [
        (f"loss speed-up over open_clip ClipLoss (open_clip ms / triton ms), {at}", ">= 2",
         loss_ratio("open_clip", "hqclip_triton"), lambda v: v >= 2),
        (f"loss speed-up over Inf-CL 1.2.1 (inf_cl ms / triton ms), {at}", ">= 3",
         loss_ratio("inf_cl", "hqclip_triton"), lambda v: v >= 3),
        (f"loss time / GEMM floor (four cuBLAS GEMMs), {at}", "<= 1.3",
         loss_ratio("hqclip_triton", "gemm_floor"), lambda v: v <= 1.3),
        (f"loss peak extra memory / open_clip's, {at}", "<= 0.02",
         loss_ratio("hqclip_triton", "open_clip", "peak_mib"), lambda v: v <= 0.02),
        # The two-pass backward (no fp32 gradient buffer), timed beside the default to choose between them.
        (f"two-pass backward: loss time / GEMM floor, {at}", "<= 1.3",
         loss_ratio("hqclip_triton_2pass", "gemm_floor"), lambda v: v <= 1.3),
        (f"two-pass backward: peak extra memory / open_clip's, {at}", "<= 0.02",
         loss_ratio("hqclip_triton_2pass", "open_clip", "peak_mib"), lambda v: v <= 0.02),
        ("training samples/s, hqclip-fast / open_clip_train, ViT-B-16 224 px bf16 (best row)", ">= 1.3",
         train_value("ratio"), lambda v: v >= 1.3),
        ("training MFU, ViT-B-16 224 px bf16 (same row; 989 TFLOP/s peak)", ">= 0.5",
         train_value("mfu"), lambda v: v >= 0.5),
        ("towers: ViT-B-16 whole model, best hqclip / open_clip samples/s", ">= 1.3",
         (max(tower), None) if tower else (None, _why_step(result, "towers") or "no ViT-B-16 tower row"),
         lambda v: v >= 1.3),
        ("loader: GPU decode samples/s / ViT-B-16 step samples/s", ">= 1.5",
         (loader, None) if loader is not None else (None, _why_step(result, "loader") or "no GPU decode figure"),
         lambda v: v >= 1.5),
    ]
    out = []
    for name, want, (value, why), check in rows:
        if not gpu:  # a CPU run's numbers say nothing about these targets
            value, why = None, "no GPU data: a CPU run (dry run of the campaign)"
        status = "not measured" if value is None else ("met" if check(value) else "missed")
        out.append({"target": name, "want": want, "value": value, "status": status, "why": why})
    return out


# ---------------------------------------------------------------------------------------------- writing
def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    commit = (result["commit"] or "unknown")[:12] + (" (dirty)" if result["dirty"] is not False else "")
    steps = "; ".join(f"{c['call']}: " + ", ".join(f"{s['name']} {s['status']}" + (f" {s['seconds']:.0f} s"
                                                                                   if s.get("seconds") else "")
                                                  for s in c["steps"]) for c in result["calls"])
    v = result["versions"]
    lines = [f"### GPU campaign: {result['device']}, {result['date']}", "",
             f"torch {result['torch']}, triton {result['triton']}, open_clip {v['open_clip']}, inf_cl {v['inf_cl']}; "
             f"commit `{commit}`. Steps ({steps}). Written by `benchmarks/collect_gpu_results.py`.", "",
             "| target | want | measured | status |", "|---|---|---:|---|"]
    for t in result["targets"]:
        status = t["status"] if t["status"] != "missed" else "**missed**"
        lines.append(f"| {t['target']} | {t['want']} | {_fmt(t['value'], 3)} | {status}"
                     + (f": {t['why']}" if t["why"] else "") + " |")
    lines.append("")
    if result["loss"]:
        lines += ["Loss forward+backward per case: median ms; its ratio to the four-GEMM floor; the floors' "
                  "achieved TFLOP/s (8 or 6 B N D FLOPs); peak extra MiB measured and as `memory_model.py` "
                  "predicts it; max relative error of loss and gradients against fp64 on the first rows.", "",
                  "| B | D | dtype | neg | impl | ms | x floor | GEMM TFLOP/s | peak MiB | modelled MiB | rel err "
                  "(rows) |", "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for e in result["loss"]:
            floor = e["ms"]["gemm_floor"]
            columns = e["B"] * (2 if e["negatives"] else 1)
            for impl, key in LOSS_KEYS.items():
                ms = e["ms"][key]
                if ms is None:
                    continue
                tflops = (f"{FLOOR_PRODUCTS[impl] * 2 * e['B'] * columns * e['D'] / ms / 1e9:.0f}"
                          if impl in FLOOR_PRODUCTS else "")
                error = "" if e["rel_err"][key] is None else f"{e['rel_err'][key]:.1e} ({e['check_rows']})"
                lines.append(f"| {e['B']} | {e['D']} | {e['dtype']} | {'yes' if e['negatives'] else 'no'} | {key} | "
                             f"{ms:.3f} | {_fmt(ms / floor if floor else None)} | {tflops} | "
                             f"{_fmt(e['peak_mib'][key], 1)} | {_fmt(e['modelled_peak_mib'][key], 1)} | {error} |")
        lines.append("")
    if result["train"]:
        lines += ["Training step (model, loss, backward, optimizer) at the largest batch that fits both sides, "
                  "samples/s:", "",
                  "| model | image | batch | compile | hqclip-fast | open_clip_train | ratio | MFU | HQ-CLIP loss "
                  "| largest batch predicted |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for e in result["train"]:
            sps = e["samples_per_s"]
            ratio = _fmt(sps["hqclip_fast"] / sps["open_clip"]) if sps["hqclip_fast"] and sps["open_clip"] else "-"
            predicted = ", ".join(f"{side} {n}" for side, n in e["largest_batch_predicted"].items())
            lines.append(f"| {e['model']} | {e['image_size']} | {e['batch']} | {'yes' if e['compile'] else 'no'} | "
                         f"{_fmt(sps['hqclip_fast'], 1)} | {_fmt(sps['open_clip'], 1)} | {ratio} | "
                         f"{'-' if e['mfu'] is None else format(e['mfu'], '.1%')} | "
                         f"{_fmt(e['hqclip_loss_samples_per_s'], 1)} | {predicted} |")
        lines.append("")
    if result["tests"]:
        t = result["tests"]
        lines.append(f"Tests on the device: {t['passed']} passed, {t['failed'] + t['error']} failed, {t['skipped']} "
                     f"skipped{'' if t['complete'] else ', stopped at the step cap before the rest'}.")
    if result["not_run"]:
        lines.append("Not run or not finished: " + "; ".join(f"{s['step']} ({s['status']})" for s in result["not_run"])
                     + ".")
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, table: str) -> None:
    """Put the table between the gpu-results markers (appended as a section the first time)."""
    text = readme.read_text()
    block = f"{README_START}\n{table}{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## GPU results\n\n" + block + "\n"
    readme.write_text(text)


def default_path(result: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower().replace("nvidia", "")).strip("-")
    return RESULTS / f"{result['date']}-{slug}.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="campaign work folders or their .tar.gz")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/results/<date>-<gpu>.json); Markdown beside it")
    parser.add_argument("--require", default="loss,train", help="sections that must have results")
    parser.add_argument("--partial", action="store_true",
                        help="accept missing sections, CPU runs and dirty or unknown commits (dry runs, one call's view)")
    parser.add_argument("--readme", type=Path, default=None, help="also put the table into this README")
    args = parser.parse_args(argv)
    try:
        result = collect(args.inputs, require=() if args.partial else tuple(filter(None, args.require.split(","))),
                         allow_cpu=args.partial, allow_dirty=args.partial)
    except CollectError as err:
        print(f"collect_gpu_results: {err}", file=sys.stderr)
        return 2
    out = args.out or default_path(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    if args.readme:
        update_readme(args.readme, table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}" + (f"; updated {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

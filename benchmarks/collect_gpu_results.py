"""Merge the GPU campaign's result files into benchmarks/results/<date>-<gpu>.json (issue 8's format) and a
Markdown table; optionally put the table into the README.

    python benchmarks/collect_gpu_results.py CALL1.tar.gz CALL2.tar.gz CALL3.tar.gz      # the device calls' tarballs
    python benchmarks/collect_gpu_results.py /tmp/hqclip-campaign --partial --out x.json # one call, stages may lack
    python benchmarks/collect_gpu_results.py ... --readme README.md                      # also update the README

Inputs are campaign work folders or the tarballs gpu_campaign.py packs them into. Each holds env.json (device,
versions, commit), campaign.json (the steps and their status) and per-stage folders of the benchmark scripts'
own JSON files. The merged file keeps issue 8's keys (loss, train) and adds tests, towers, loader, profile,
targets and sources. Every input must come from the same device and commit (several device calls may land on
different machines); a required section without results, or a CPU run, is an error unless asked for.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LOSS_MS_KEYS = {"triton": "hqclip_triton", "triton_2pass": "hqclip_triton_2pass", "chunked": "chunked",
                "open_clip": "open_clip", "inf_cl": "inf_cl", "gemm_floor": "gemm_floor"}  # bench_loss impl -> issue 8 key
LOSS_PEAK_KEYS = {"triton": "hqclip_triton", "triton_2pass": "hqclip_triton_2pass", "open_clip": "open_clip",
                  "inf_cl": "inf_cl"}
TRAIN_ROWS = {"hqclip-fast, CLIP loss": "hqclip_fast", "open_clip_train": "open_clip"}
TARGET_POINT = {"B": 32768, "D": 768, "dtype": "bfloat16", "negatives": False}
README_START, README_END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"


class CollectError(ValueError):
    """The inputs cannot make an honest result file (missing section, mixed devices or commits, CPU run)."""


# ---------------------------------------------------------------------------------------------- reading
def _open_input(path: Path, scratch: Path) -> Path:
    if path.is_dir():
        return path
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        target = scratch / str(len(list(scratch.iterdir())))  # calls' tarballs often share a name
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
    """bench_loss.py result (one D, one negatives setting, several B) -> issue 8 loss entries, one per B."""
    by_batch: dict[int, dict] = {}
    for case in result["cases"]:
        by_batch.setdefault(case["batch_size"], {})[case["impl"]] = case
    entries = []
    for batch in sorted(by_batch):
        cases = by_batch[batch]
        entry = {"B": batch, "D": result["dim"], "dtype": result["dtype"], "negatives": result["negatives"],
                 "ms": {}, "peak_mib": {}, "max_rel_err": None}
        for impl, key in LOSS_MS_KEYS.items():
            case = cases.get(impl)
            measured = case is not None and "skipped" not in case
            entry["ms"][key] = round(case["time_ms_median"], 4) if measured else None
            if impl in LOSS_PEAK_KEYS:
                entry["peak_mib"][LOSS_PEAK_KEYS[impl]] = round(case["peak_extra_mib"], 2) if measured else None
            if case is not None and not measured:
                skipped.append({"section": "loss", "B": batch, "D": result["dim"], "negatives": result["negatives"],
                                "impl": impl, "reason": case["skipped"], "source": source})
        triton = cases.get("triton")
        if triton is not None and "max_rel_err" in triton:
            entry["max_rel_err"] = triton["max_rel_err"]
        entries.append(entry)
    return entries


def train_entry(result: dict) -> dict:
    rows = {row["name"]: row for row in result["rows"]}
    settings = result["settings"]
    ours = rows.get("hqclip-fast, CLIP loss", {})
    return {"model": settings["model"], "batch": settings["batch_size"], "image_size": settings["image_size"],
            "samples_per_s": {key: (round(rows[name]["samples_per_s"], 2) if name in rows else None)
                              for name, key in TRAIN_ROWS.items()},
            "mfu": round(ours["mfu"], 4) if ours.get("mfu") is not None else None,
            # beyond issue 8's keys: what the row was measured with, and the full HQ-CLIP loss step
            "compile": settings.get("compile", False), "precision": settings.get("precision"),
            "hqclip_loss_samples_per_s": (round(rows["hqclip-fast, HQ-CLIP loss"]["samples_per_s"], 2)
                                          if "hqclip-fast, HQ-CLIP loss" in rows else None)}


def tests_summary(xml_path: Path) -> dict:
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    summary = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "not_passed": []}
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            summary[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    summary["not_passed"].append({"test": f"{case.get('classname')}::{case.get('name')}",
                                                  "outcome": tag, "message": (node.get("message") or "")[:300]})
    summary["passed"] = summary["tests"] - summary["failures"] - summary["errors"] - summary["skipped"]
    return summary


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
            allow_mixed_commits: bool = False) -> dict:
    """Read campaign folders/tarballs and return the merged result (issue 8's format plus extras)."""
    if not inputs:
        raise CollectError("no inputs given")
    with tempfile.TemporaryDirectory() as scratch:
        folders = [(path, _open_input(path, Path(scratch))) for path in inputs]
        return _collect(folders, require, allow_cpu, allow_mixed_commits)


def _collect(folders, require, allow_cpu, allow_mixed_commits) -> dict:
    envs, sources, skipped = [], [], []
    merged: dict = {"loss": {}, "train": {}, "towers": [], "loader": None, "tests": None, "profile": [],
                    "incomplete": [], "steps_not_ok": []}
    for path, folder in folders:
        env_path = folder / "env.json"
        if not env_path.exists():
            raise CollectError(f"{path}: no env.json (not a gpu_campaign.py work folder?)")
        env = _json(env_path)
        envs.append((path, env))
        campaign = _json(folder / "campaign.json") if (folder / "campaign.json").exists() else {"steps": []}
        sources.append({"input": Path(path).name, "date": env.get("date"), "stages": campaign.get("stages"),
                        "steps": [{"name": s["name"], "status": s["status"], "seconds": s.get("seconds")}
                                  for s in campaign["steps"]]})
        merged["steps_not_ok"] += [{"input": Path(path).name, "name": s["name"], "status": s["status"],
                                    "reason": s.get("reason") or s.get("log_tail", "")[-300:]}
                                   for s in campaign["steps"] if s["status"] != "ok"]
        for file in sorted(folder.glob("loss/*.json")):
            result = _json(file)
            _check_device(result.get("device_name"), env, file)
            if result.get("incomplete"):
                merged["incomplete"].append(f"{path.name}:{file.name}: {result.get('note', 'incomplete')}")
            for entry in loss_entries(result, f"{path.name}:{file.name}", skipped):
                merged["loss"][(entry["B"], entry["D"], entry["dtype"], entry["negatives"])] = entry
        for file in sorted(folder.glob("train/*.json")):
            result = _json(file)
            _check_device(result.get("device"), env, file)
            if result.get("incomplete"):
                merged["incomplete"].append(f"{path.name}:{file.name}: {result.get('note', 'incomplete')}")
            entry = train_entry(result)
            merged["train"][(entry["model"], entry["batch"], entry["image_size"], entry["compile"])] = entry
        for file in sorted(folder.glob("towers/*.json")):
            result = _json(file)
            _check_device(result["env"].get("device"), env, file)
            merged["towers"].append(towers_summary(result, f"{path.name}:{file.name}"))
        if (folder / "loader" / "loader.json").exists():
            result = _json(folder / "loader" / "loader.json")
            _check_device(result["env"].get("device"), env, folder / "loader" / "loader.json")
            merged["loader"] = loader_summary(result)
        if (folder / "tests" / "pytest.xml").exists():
            merged["tests"] = tests_summary(folder / "tests" / "pytest.xml")
        merged["profile"] += [f"{path.name}:{p.relative_to(folder)}" for p in sorted(folder.glob("profile/*"))]

    device, torch_version, triton_version, commit, date = _agree(envs, allow_cpu, allow_mixed_commits)
    result = {
        "device": device, "torch": torch_version, "triton": triton_version, "commit": commit, "date": date,
        "loss": sorted(merged["loss"].values(), key=lambda e: (e["D"], e["negatives"], e["B"], e["dtype"])),
        "train": sorted(merged["train"].values(), key=lambda e: (e["model"], e["batch"], e["compile"])),
        "tests": merged["tests"], "towers": merged["towers"], "loader": merged["loader"],
        "profile_files": merged["profile"], "skipped": skipped, "incomplete": merged["incomplete"],
        "steps_not_ok": merged["steps_not_ok"], "sources": sources,
        "versions": {k: envs[0][1].get(k) for k in ("python", "open_clip", "inf_cl", "xformers", "nvidia_smi")},
    }
    missing = [section for section in require if not result.get(section)]
    if missing:
        raise CollectError(f"no results for required stage(s) {missing} in {[str(p) for p, _ in folders]}; "
                           "run them (gpu_campaign.py --stage ...) or pass --partial")
    result["targets"] = targets(result)
    result["memory_model_check"] = memory_model_check(result["loss"], RESULTS / "memory_model.json")
    return result


# bench_loss impl key -> the memory model's case for the same code path (memory_model.py, H100 layout).
MODELLED = {"hqclip_triton": ("triton", 1, 128), "hqclip_triton_2pass": ("triton", 2, 32),
            "open_clip": ("open_clip", None, None)}


def memory_model_check(loss: list[dict], model_path: Path) -> list[dict]:
    """Measured peak extra MiB beside what benchmarks/memory_model.py predicts for the same case, so that the
    first GPU run tells how far the model (and the figures quoted from it) can be trusted."""
    if not model_path.exists():
        return []
    model = {}
    for c in _json(model_path)["cases"]:
        if "skipped" not in c:
            model[(c["impl"], c.get("backward_passes"), c.get("panel_mib"), c["batch_size"], c["dim"],
                   c["negatives"])] = c["peak_extra_mib"]
    rows = []
    for e in loss:
        if e["dtype"] != "bfloat16":
            continue
        for key, (impl, passes, panel) in MODELLED.items():
            measured = e["peak_mib"].get(key)
            modelled = model.get((impl, passes, panel, e["B"], e["D"], e["negatives"]))
            if measured is not None and modelled is not None:
                rows.append({"impl": key, "B": e["B"], "D": e["D"], "negatives": e["negatives"],
                             "measured_mib": measured, "modelled_mib": round(modelled, 2)})
    return rows


def _check_device(name, env, file) -> None:
    """Each result file must have been measured on the device its call's env.json names."""
    if env.get("device_type") == "cuda" and name is not None and name != env["device"]:
        raise CollectError(f"{file}: measured on {name!r}, but its campaign ran on {env['device']!r}")


def _agree(envs, allow_cpu, allow_mixed_commits):
    first_path, first = envs[0]
    for path, env in envs:
        if env.get("device_type") != "cuda" and not allow_cpu:
            raise CollectError(f"{path}: a {env.get('device_type')} run ({env.get('device')}); GPU result files "
                               "take GPU runs only (--allow-cpu is for dry runs)")
        for key in ("device", "torch", "triton"):
            if env.get(key) != first.get(key):
                raise CollectError(f"inputs disagree on {key}: {first_path} has {first.get(key)!r}, {path} has "
                                   f"{env.get(key)!r}; ratios across machines are not comparable, collect them "
                                   "separately")
        if env.get("commit") != first.get("commit") and not allow_mixed_commits:
            raise CollectError(f"inputs come from different commits ({first.get('commit')} in {first_path}, "
                               f"{env.get('commit')} in {path}); pass --allow-mixed-commits if that is intended")
    commits = sorted({env.get("commit") or "unknown" for _, env in envs})
    date = min(env["date"] for _, env in envs)[:10]
    return first["device"], first["torch"], first["triton"], commits[0] if len(commits) == 1 else commits, date


def targets(result: dict) -> list[dict]:
    """The issues' speed targets, each with its measured value (None: not measured in these inputs)."""
    point = next((e for e in result["loss"] if all(e[k] == v for k, v in TARGET_POINT.items())), None)
    ms = point["ms"] if point else {}
    peak = point["peak_mib"] if point else {}

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b not in (None, 0) else None

    rows = [
        ("loss: hqclip_triton / gemm_floor at B=32768, D=768, bf16", "<= 1.3",
         ratio(ms.get("hqclip_triton"), ms.get("gemm_floor")), lambda v: v <= 1.3),
        ("loss: open_clip / hqclip_triton (speed-up)", ">= 2", ratio(ms.get("open_clip"), ms.get("hqclip_triton")),
         lambda v: v >= 2),
        ("loss: inf_cl / hqclip_triton (speed-up)", ">= 3", ratio(ms.get("inf_cl"), ms.get("hqclip_triton")),
         lambda v: v >= 3),
        ("loss: hqclip_triton peak extra memory / open_clip's", "<= 0.02",
         ratio(peak.get("hqclip_triton"), peak.get("open_clip")), lambda v: v <= 0.02),
        # The two-pass backward (no fp32 gradient buffer), measured beside the default to choose between them.
        ("loss: hqclip_triton_2pass / gemm_floor", "<= 1.3",
         ratio(ms.get("hqclip_triton_2pass"), ms.get("gemm_floor")), lambda v: v <= 1.3),
        ("loss: hqclip_triton_2pass peak extra memory / open_clip's", "<= 0.02",
         ratio(peak.get("hqclip_triton_2pass"), peak.get("open_clip")), lambda v: v <= 0.02),
    ]
    vit = [e for e in result["train"] if e["model"] == "ViT-B-16" and e["image_size"] == 224]
    best = max(vit, key=lambda e: e["samples_per_s"]["hqclip_fast"] or 0, default=None)
    rows += [
        ("train: ViT-B-16 samples/s, hqclip_fast / open_clip (best measured row)", ">= 1.3",
         ratio(best["samples_per_s"]["hqclip_fast"], best["samples_per_s"]["open_clip"]) if best else None,
         lambda v: v >= 1.3),
        ("train: ViT-B-16 MFU (same row)", ">= 0.5", best["mfu"] if best else None, lambda v: v >= 0.5),
    ]
    tower = [t["speedup_vs_open_clip"].get("model") for t in result["towers"]
             if t["model"] == "ViT-B-16" and t["speedup_vs_open_clip"].get("model") is not None]
    rows.append(("towers: ViT-B-16 whole model, best hqclip / open_clip samples/s", ">= 1.3",
                 max(tower) if tower else None, lambda v: v >= 1.3))
    loader = result["loader"] or {}
    rows.append(("loader: GPU decode samples/s / ViT-B-16 step samples/s", ">= 1.5",
                 loader.get("gpu_decode_over_vit_step"), lambda v: v >= 1.5))
    return [{"target": name, "want": want, "value": value, "met": None if value is None else bool(check(value))}
            for name, want, value, check in rows]


# ---------------------------------------------------------------------------------------------- writing
def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def _sci(value):
    return "-" if value is None else f"{value:.1e}"


def _percent(value):
    return "-" if value is None else f"{value:.1%}"


def markdown(result: dict) -> str:
    commit = result["commit"] if isinstance(result["commit"], str) else ", ".join(result["commit"])
    lines = [f"### Campaign results: {result['device']}, {result['date']}", "",
             f"torch {result['torch']}, triton {result['triton']}, commit `{commit[:12]}`; "
             f"{len(result['sources'])} campaign call(s); generated by `benchmarks/collect_gpu_results.py`.", ""]
    if result["loss"]:
        lines += ["Loss forward+backward, ms (median); peak extra MiB; max relative error of hqclip_triton "
                  "against float64 (loss and gradients).", "",
                  "| B | D | dtype | neg | hqclip_triton | hqclip_triton_2pass | chunked | open_clip | inf_cl "
                  "| GEMM floor | triton/floor | open_clip/triton | inf_cl/triton | peak MiB triton "
                  "| peak MiB triton_2pass | peak MiB open_clip | max rel err |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in result["loss"]:
            ms, peak = e["ms"], e["peak_mib"]

            def over(a, b, ms=ms):
                return _fmt(ms[a] / ms[b]) if ms[a] is not None and ms[b] else "-"
            lines.append(f"| {e['B']} | {e['D']} | {e['dtype']} | {'yes' if e['negatives'] else 'no'} | "
                         + " | ".join(_fmt(ms[k], 3) for k in LOSS_MS_KEYS.values())
                         + f" | {over('hqclip_triton', 'gemm_floor')} | {over('open_clip', 'hqclip_triton')} | "
                         f"{over('inf_cl', 'hqclip_triton')} | {_fmt(peak['hqclip_triton'], 1)} | "
                         f"{_fmt(peak['hqclip_triton_2pass'], 1)} | {_fmt(peak['open_clip'], 1)} | "
                         f"{_sci(e['max_rel_err'])} |")
        lines.append("")
    if result["train"]:
        lines += ["Training step (model, loss, backward, optimizer), samples/s:", "",
                  "| model | batch | image | compile | hqclip_fast | open_clip_train | ratio | MFU | HQ-CLIP loss |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for e in result["train"]:
            sps = e["samples_per_s"]
            ratio = _fmt(sps["hqclip_fast"] / sps["open_clip"]) if sps["hqclip_fast"] and sps["open_clip"] else "-"
            lines.append(f"| {e['model']} | {e['batch']} | {e['image_size']} | {'yes' if e['compile'] else 'no'} | "
                         f"{_fmt(sps['hqclip_fast'], 1)} | {_fmt(sps['open_clip'], 1)} | {ratio} | "
                         f"{_percent(e['mfu'])} | {_fmt(e['hqclip_loss_samples_per_s'], 1)} |")
        lines.append("")
    if result.get("memory_model_check"):
        lines += ["Peak extra MiB, measured here vs modelled by `benchmarks/memory_model.py`:", "",
                  "| impl | B | D | neg | measured | modelled | measured / modelled |", "|---|---:|---:|---|---:|---:|---:|"]
        for m in result["memory_model_check"]:
            lines.append(f"| {m['impl']} | {m['B']} | {m['D']} | {'yes' if m['negatives'] else 'no'} | "
                         f"{_fmt(m['measured_mib'], 1)} | {_fmt(m['modelled_mib'], 1)} | "
                         f"{_fmt(m['measured_mib'] / m['modelled_mib'])} |")
        lines.append("")
    if result.get("targets"):
        lines += ["| target | want | measured | met |", "|---|---|---:|---|"]
        for t in result["targets"]:
            met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {t['want']} | {_fmt(t['value'], 3)} | {met} |")
        lines.append("")
    if result["tests"]:
        tests = result["tests"]
        lines.append(f"GPU tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                     f"{tests['skipped']} skipped.")
    if result["steps_not_ok"]:
        lines.append("Steps that did not finish: " + "; ".join(f"{s['name']} ({s['status']})"
                                                               for s in result["steps_not_ok"]) + ".")
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
    parser.add_argument("--partial", action="store_true", help="allow missing sections and CPU runs (one call's view)")
    parser.add_argument("--allow-cpu", action="store_true", help="accept CPU dry-run inputs")
    parser.add_argument("--allow-mixed-commits", action="store_true")
    parser.add_argument("--readme", type=Path, default=None, help="also put the table into this README")
    args = parser.parse_args(argv)
    try:
        result = collect(args.inputs, require=() if args.partial else tuple(filter(None, args.require.split(","))),
                         allow_cpu=args.allow_cpu or args.partial, allow_mixed_commits=args.allow_mixed_commits)
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

"""`hqclip-eval --suite FILE`: a list of sets in clip_benchmark's webdataset layout (a DataComp-style suite),
evaluated in one run.

A suite file (YAML; configs/eval/datacomp.yaml is an example):

    root_dir: /data/eval        # where relative roots are (default: the suite file's folder)
    split: test                 # every set's split unless the set names its own
    sets:
      - {name: imagenet1k, root: wds_imagenet1k}
      - {name: mscoco_captions, root: wds_mscoco_captions}

`name` is the set's clip_benchmark name (`clip_benchmark eval --dataset wds/<name>`); a root holds the layout of
hqclip_fast.data.benchmark_sets and its `dataset_type.txt` says whether it is a classification or a retrieval
set. A set whose root, split or shards are not there is reported as missing, one that cannot be evaluated as an
error, and the other sets are evaluated all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from hqclip_fast.data.benchmark_sets import read_benchmark_set
from hqclip_fast.eval import EvalSuite
from hqclip_fast.eval_ranks import EvalRanks

_SUITE_KEYS = {"root_dir", "split", "sets"}
_SET_KEYS = {"name", "root", "split"}


@dataclass(frozen=True)
class SuiteSet:
    name: str
    root: str
    split: str


def load_suite(path: str | Path) -> list[SuiteSet]:
    """The sets of a suite file, roots resolved; a malformed file is a ValueError that says where."""
    path = Path(path)
    try:
        suite = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"suite: cannot read {path}: {err}") from None
    if not isinstance(suite, dict) or not isinstance(suite.get("sets"), list) or not suite["sets"]:
        raise ValueError(f"suite: {path} needs a non-empty list `sets`")
    if unknown := set(suite) - _SUITE_KEYS:
        raise ValueError(f"suite: {path} has unknown keys {sorted(unknown)} (known: {sorted(_SUITE_KEYS)})")
    root_dir = path.parent / suite.get("root_dir", ".")
    sets = []
    for i, entry in enumerate(suite["sets"]):
        if not isinstance(entry, dict) or not {"name", "root"} <= set(entry) or set(entry) - _SET_KEYS:
            raise ValueError(f"suite: {path} sets[{i}] must have `name` and `root` (and may have `split`), got "
                             f"{entry!r}")
        sets.append(SuiteSet(str(entry["name"]), str(root_dir / str(entry["root"])),
                             str(entry.get("split", suite.get("split", "test")))))
    names = [s.name for s in sets]
    if duplicated := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"suite: {path} names {duplicated} more than once")
    return sets


def run_suite(sets: list[SuiteSet], model, tokenizer: Callable, device, *, image_size: int, batch_size: int = 256,
              ranks: EvalRanks | None = None, report: Callable[[str], None] = print) -> dict[str, dict]:
    """{name: result} for every set, in order, calling `report` with one line per set as it is done. A result
    holds status ("ok", "missing" or "error"), root and split, and then task and every metric, or the reason."""
    results = {}
    for entry in sets:
        result = {"root": entry.root, "split": entry.split}
        try:
            benchmark = read_benchmark_set(entry.root, entry.split)
            metrics = EvalSuite.from_benchmark(benchmark, image_size, batch_size).run(model, tokenizer, device, ranks)
        except FileNotFoundError as err:
            result.update(status="missing", reason=str(err))
        except ValueError as err:
            result.update(status="error", reason=str(err))
        else:
            result.update(status="ok", task=benchmark.kind, **metrics)
        results[entry.name] = result
        report(format_result(entry.name, result))
    return results


def format_result(name: str, result: dict) -> str:
    """One line: the set's headline metrics, or why it was not evaluated."""
    if result["status"] != "ok":
        return f"{name:<28} {result['status'].upper():<8} {result['reason']}"
    if result["task"] == "retrieval":
        return (f"{name:<28} image->text R@1 {result['image_to_text_R@1']:.4f} R@5 {result['image_to_text_R@5']:.4f}"
                f"  text->image R@1 {result['text_to_image_R@1']:.4f} R@5 {result['text_to_image_R@5']:.4f}"
                f"  ({result['retrieval_samples']} images, {result['retrieval_texts']} texts)")
    top5 = f"{result['zeroshot_top5']:.4f}" if "zeroshot_top5" in result else "-"
    return (f"{name:<28} top-1 {result['zeroshot_top1']:.4f}  top-5 {top5}  mean per-class recall "
            f"{result['zeroshot_mean_per_class_recall']:.4f}  ({result['zeroshot_samples']} images)")

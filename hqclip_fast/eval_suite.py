"""`hqclip-eval --suite FILE`: a list of sets in clip_benchmark's webdataset layout (a DataComp-style suite),
evaluated in one run.

A suite file (YAML; configs/eval/datacomp.yaml is an example):

    root_dir: /data/eval        # where relative roots are (default: the suite file's folder)
    split: test                 # every set's split unless the set names its own
    sets:
      - {name: imagenet1k, root: wds_imagenet1k}
      - {name: mscoco_captions, root: wds_mscoco_captions, datacomp: MSCOCO, metric: mean_recall@1}

`name` is the set's clip_benchmark name (`clip_benchmark eval --dataset wds/<name>`); a root holds the layout of
hqclip_fast.data.benchmark_sets and its `dataset_type.txt` says whether it is a classification or a retrieval
set. WinoGAViL is the exception: its root holds the layout of hqclip_fast.data.winogavil (written by
`hqclip-data winogavil`), read when the set's metric is jaccard_score_10-12 or its `dataset_type.txt` says
"association". A set whose root, split or shards are not there is reported as missing, one that cannot be
evaluated as an error, and the other sets are evaluated all the same.

`metric` (optional) names a set's main metric as DataComp does (MAIN_METRICS; `datacomp` is the task's name
in DataComp's results): the suite then reports the average of the main metrics, as DataComp scores a model.
A set whose main metric hqclip-eval does not compute is reported as unsupported, not evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from hqclip_fast.data.benchmark_sets import read_benchmark_set
from hqclip_fast.data.winogavil import is_association_root, read_association_set
from hqclip_fast.eval import AssociationTask, EvalSuite
from hqclip_fast.eval_ranks import EvalRanks

_SUITE_KEYS = {"root_dir", "split", "sets"}
_SET_KEYS = {"name", "root", "split", "datacomp", "metric"}

# DataComp's main metrics, from our metric names. mean_recall@1 is DataComp's retrieval score,
# 0.5 * (text_retrieval_recall@1 + image_retrieval_recall@1) in clip_benchmark's names (its eval_utils/retr_eval.py).
MAIN_METRICS = {
    "acc1": ("classification", lambda r: r["zeroshot_top1"]),
    "mean_per_class_recall": ("classification", lambda r: r["zeroshot_mean_per_class_recall"]),
    "F1-macro_all": ("classification", lambda r: r["zeroshot_macro_f1"]),  # iWildCam's (WILDS's F1 name)
    "mean_recall@1": ("retrieval", lambda r: 0.5 * (r["image_to_text_R@1"] + r["text_to_image_R@1"])),
    # Worst-group accuracy over the groups of the samples' .npy metadata (its first field), the groups that have
    # samples: FMoW by region, GeoDE by region (top-1), Dollar Street by income (top-5). DataComp's FMoW evaluator
    # means to leave out the "Other" region, but its check reads group names that carry no region names
    # (the evaluator has no metadata map), so every non-empty region counts there, as here.
    "acc_worst_region": ("classification", lambda r: r["zeroshot_worst_group_top1"]),
    "acc_wg": ("classification", lambda r: r["zeroshot_worst_group_top1"]),
    "acc_top5_wg": ("classification", lambda r: r["zeroshot_worst_group_top5"]),
    # WinoGAViL's: the mean Jaccard score of the examples with 10 or 12 candidates (DataComp's
    # eval_utils/wino_eval.py; hqclip_fast.eval.top_n_jaccard); None when the set has none of them.
    "jaccard_score_10-12": ("association", lambda r: r["jaccard_score_10-12"]),
}
GROUP_METRICS = ("acc_worst_region", "acc_wg", "acc_top5_wg")


@dataclass(frozen=True)
class SuiteSet:
    name: str
    root: str
    split: str
    metric: str | None = None  # DataComp's main metric of the set
    datacomp: str | None = None  # the task's name in DataComp's results


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
                             str(entry.get("split", suite.get("split", "test"))), entry.get("metric"),
                             entry.get("datacomp")))
    names = [s.name for s in sets]
    if duplicated := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"suite: {path} names {duplicated} more than once")
    return sets


def run_suite(sets: list[SuiteSet], model, tokenizer: Callable, device, *, image_size: int, batch_size: int = 256,
              ranks: EvalRanks | None = None, report: Callable[[str], None] = print) -> dict[str, dict]:
    """{name: result} for every set, in order, calling `report` with one line per set as it is done. A result
    holds status ("ok", "missing", "error" or "unsupported"), root and split, and then task, every metric and
    `main_metric` (DataComp's, for a set with `metric`), or the reason."""
    results = {}
    for entry in sets:
        result = {"root": entry.root, "split": entry.split}
        if entry.metric is not None and entry.metric not in MAIN_METRICS:
            result.update(status="unsupported", reason=f"its main metric {entry.metric} is not computed by "
                                                       f"hqclip-eval (computed: {', '.join(MAIN_METRICS)})")
            results[entry.name] = result
            report(format_result(entry.name, result))
            continue
        try:
            kind, suite = _set_suite(entry, image_size, batch_size)
            metrics = suite.run(model, tokenizer, device, ranks)
        except FileNotFoundError as err:
            result.update(status="missing", reason=str(err))
        except ValueError as err:
            result.update(status="error", reason=str(err))
        else:
            result.update(status="ok", task=kind, **metrics)
            if entry.metric is not None:
                result.update(main_metric=main_metric(entry, result), main_metric_name=entry.metric)
        results[entry.name] = result
        report(format_result(entry.name, result))
    return results


def _set_suite(entry: SuiteSet, image_size: int, batch_size: int) -> tuple[str, EvalSuite]:
    """(the set's kind, what evaluates it): an association set (WinoGAViL) when its metric needs one or its
    root says it is one, else a set in clip_benchmark's layout."""
    wanted = MAIN_METRICS[entry.metric][0] if entry.metric is not None else None
    if wanted == "association" or (wanted is None and is_association_root(entry.root)):
        examples = read_association_set(entry.root, entry.split).examples
        return "association", EvalSuite(None, None, batch_size, association=AssociationTask(examples, image_size))
    benchmark = read_benchmark_set(entry.root, entry.split)
    if wanted is not None and wanted != benchmark.kind:
        raise ValueError(f"{entry.root} is a {benchmark.kind} set; its metric {entry.metric} needs a {wanted} set")
    return benchmark.kind, EvalSuite.from_benchmark(benchmark, image_size, batch_size,
                                                    groups=entry.metric in GROUP_METRICS)


def main_metric(entry: SuiteSet, result: dict | None) -> float | None:
    """The set's DataComp main metric from its result (as run_suite writes it), or None: not evaluated, a
    metric hqclip-eval does not compute, or one the set has no examples for (WinoGAViL's 10-12 group)."""
    if result is None or result.get("status") != "ok" or entry.metric not in MAIN_METRICS:
        return None
    return MAIN_METRICS[entry.metric][1](result)


def suite_average(sets: list[SuiteSet], results: dict[str, dict]) -> dict | None:
    """The mean of the sets' main metrics, as DataComp scores a model; None when no set names a main metric.

    DataComp's rule (mlfoundations/datacomp, evaluate.py): a task's score is `metrics.get(main_metric)`
    (acc1 by default) and "Average" is `np.mean` over the tasks whose score is not None, each task weighing
    the same; its aggregate_scores.py asserts all 38 tasks are there before taking that mean. Here a set that
    is missing, failed or unsupported has no score: the average covers the others and says it is partial."""
    scored = [s for s in sets if s.metric is not None]
    if not scored:
        return None
    scores = {s.name: score for s in scored if (score := main_metric(s, results.get(s.name))) is not None}
    return {
        "average": sum(scores.values()) / len(scores) if scores else None,
        "tasks_scored": len(scores),
        "tasks": len(scored),
        "partial": len(scores) < len(scored),
        "not_scored": {s.name: _not_scored_reason(results.get(s.name)) for s in scored if s.name not in scores},
    }


def _not_scored_reason(result: dict | None) -> str:
    if result is None:
        return "not run"
    return "no value for its main metric" if result.get("status") == "ok" else result.get("status", "not run")


def format_average(average: dict) -> str:
    """One line: the average and, when partial, what it leaves out."""
    value = "-" if average["average"] is None else f"{average['average']:.4f}"
    line = f"{'average of main metrics':<28} {value}  ({average['tasks_scored']} of {average['tasks']} tasks"
    if not average["partial"]:
        return line + ")"
    return line + "; PARTIAL, without " + ", ".join(f"{n} ({s})" for n, s in average["not_scored"].items()) + ")"


def format_result(name: str, result: dict) -> str:
    """One line: the set's headline metrics, or why it was not evaluated."""
    if result["status"] != "ok":
        return f"{name:<28} {result['status'].upper():<8} {result['reason']}"
    main = f"  main: {result['main_metric_name']} {_value(result['main_metric'])}" if "main_metric" in result else ""
    if result["task"] == "association":
        return (f"{name:<28} Jaccard {_value(result['avg_jaccard_score'])}  5-6 candidates "
                f"{_value(result['jaccard_score_5-6'])}  10-12 candidates {_value(result['jaccard_score_10-12'])}"
                f"  ({result['association_samples']} examples){main}")
    if result["task"] == "retrieval":
        return (f"{name:<28} image->text R@1 {result['image_to_text_R@1']:.4f} R@5 {result['image_to_text_R@5']:.4f}"
                f"  text->image R@1 {result['text_to_image_R@1']:.4f} R@5 {result['text_to_image_R@5']:.4f}"
                f"  ({result['retrieval_samples']} images, {result['retrieval_texts']} texts){main}")
    top5 = f"{result['zeroshot_top5']:.4f}" if "zeroshot_top5" in result else "-"
    return (f"{name:<28} top-1 {result['zeroshot_top1']:.4f}  top-5 {top5}  mean per-class recall "
            f"{result['zeroshot_mean_per_class_recall']:.4f}  ({result['zeroshot_samples']} images){main}")


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

"""`hqclip-data validate`: one pass over shards through the training decode path, counting what is skipped."""

from __future__ import annotations

from collections import Counter

import numpy as np
from tqdm import tqdm

from .config import DataConfig
from .loader import summarize
from .samples import SkipSample, decode_train_sample
from .shards import expand_sources, iter_tar_samples


def validate_shards(pattern: str, cfg: DataConfig | None = None, progress: bool = True) -> dict:
    """{"samples_ok", "samples_skipped", "reasons"} for every sample of every shard matched by `pattern`."""
    cfg = cfg or DataConfig()
    cfg.validate()
    urls = [u for source in expand_sources(pattern) for u in source]
    reasons: Counter = Counter()
    ok = 0
    rng = np.random.default_rng(0)
    with tqdm(total=len(urls), unit="shard", disable=not progress, dynamic_ncols=True) as bar:
        for url in urls:
            for raw in iter_tar_samples(url, reasons):
                try:
                    decode_train_sample(raw, cfg, rng, tag_vocab=None)
                    ok += 1
                except SkipSample as e:
                    reasons[e.reason] += 1
            bar.update(1)
            bar.set_postfix(ok=ok, skipped=sum(reasons.values()))
    return summarize(reasons, ok)

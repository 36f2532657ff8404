"""Training metrics: one JSON line per record in `metrics.jsonl`, mirrored to TensorBoard and optionally to Weights &
Biases (the `wandb` extra; WANDB_MODE=offline writes the run under <run_dir>/wandb to sync later). Rank 0 only.

On resume from step N, records after N (written by the run that was killed) are dropped from the jsonl and
purged from TensorBoard, so the files read as one uninterrupted run; wandb continues the same run (its id is kept
in <run_dir>/wandb_run_id).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (the writer was killed mid-write) is ignored."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise ValueError("log.wandb=true needs the wandb package: pip install 'hqclip-fast[wandb]' "
                         "(or turn log.wandb off)") from None
    return wandb


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, resume_step: int = 0, tensorboard: bool = True,
                 wandb: dict[str, Any] | None = None):
        """wandb: keyword arguments of wandb.init (project, name, notes, config) to log there too; None: not."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.wandb_run = None
        wandb_module = import_wandb() if wandb is not None else None  # every rank fails alike when it is missing
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            # purge_step drops events the killed run wrote after the checkpoint we resume from.
            self.writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=resume_step + 1, flush_secs=10)
        if wandb_module is not None:
            id_file = self.path.parent / "wandb_run_id"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:8])
            self.wandb_run = wandb_module.init(dir=str(self.path.parent), id=id_file.read_text().strip(),
                                               resume="allow", **wandb)

    def _truncate_after(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """Append one record {"step", "kind", **values}; numeric values also go to TensorBoard as kind/name."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({f"{kind}/{name}": value for name, value in values.items()
                                if isinstance(value, (int, float)) and not isinstance(value, bool)}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

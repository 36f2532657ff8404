"""Graceful preemption: SIGTERM (SLURM, Kubernetes, torchrun's shutdown) or SIGUSR1 (SLURM's `--signal`) asks
the trainer to stop at the next step boundary, after a checkpoint at that step.

The handler only records the signal; the trainer polls `requested()` once per step. That poll is collective:
ranks agree (an all-reduce of the signal number) so that every rank stops at the same step and writes its part
of the same checkpoint, even when the signal reached only some ranks. On GPU runs the all-reduce goes through
a separate gloo group so it never waits for the GPU.

Exit status: 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1), what a shell, SLURM and Kubernetes
report for a process ended by that signal. It is non-zero on purpose: the run is not finished, so torchrun,
a Kubernetes Job or a SLURM requeue rule must treat it as interrupted and start it again (a zero would mark
the job complete); the next start resumes from the checkpoint just written.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class TrainingPreempted(Exception):
    """Training stopped on a preemption signal after writing a checkpoint at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signal = signal.Signals(signum)
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"preempted by {self.signal.name} at step {step}; checkpoint {checkpoint}; "
                         "run the same command again to resume")

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signal)


class PreemptionWatcher:
    """Context manager: while open, the preemption signals are recorded instead of ending the process; on
    exit the previous handlers come back (train() is also called as a library function)."""

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
        self.received = 0  # signal number, 0 = none
        self._previous: dict[int, object] = {}
        self._group = None

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is not threading.main_thread():
            # Python only lets the main thread install handlers.
            log.warning("train() runs outside the main thread: preemption signals are not handled")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> int:
        """The signal number to stop for, 0 to go on; the same answer on every rank (collective)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.received
        if self._group is None:  # first call, on every rank: a CPU group unless the default one is gloo
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        flag = torch.tensor([self.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag)

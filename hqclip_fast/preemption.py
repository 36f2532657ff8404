"""Graceful preemption: SIGTERM (SLURM, Kubernetes, torchrun's shutdown) or SIGUSR1 (SLURM's `--signal`) asks
the trainer to stop at the next step boundary, after a checkpoint at that step.

The handler only records the signal; the trainer polls `requested(step)` after every step. On one process the
answer is the signal itself. On several ranks the poll is collective: ranks agree (an all-reduce of the signal
number) so that every rank stops at the same step and writes its part of the same checkpoint, even when the
signal reached only some ranks. The vote must not stall the step, so it is taken every `vote_every` steps, in
the background, on a gloo group of its own (CPU tensors: it never waits for the GPU, nor for the training's
collectives), and read one step later, when it has long finished: every rank reads the same vote after the
same step. A signal therefore stops the run at most `vote_every + 1` steps after it arrived; keep that, plus a
checkpoint, inside the grace period the scheduler gives (SLURM's `--signal=USR1@<seconds>`).

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

    def __init__(self, signum: int, step: int, checkpoint: Path | str):
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

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS, *, vote_every: int = 1):
        if vote_every < 1:
            raise ValueError(f"vote_every must be >= 1, got {vote_every}")
        self.signals = signals
        self.vote_every = vote_every
        self.received = 0  # signal number, 0 = none
        self._previous: dict[int, object] = {}
        self._group = None
        self._vote = None  # (work, flag) of the vote in flight

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is not threading.main_thread():
            # Python only lets the main thread install handlers.
            log.warning("train() runs outside the main thread: preemption signals are not handled")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        if self._vote is not None:  # no collective left running when the process group goes
            self._vote[0].wait()
            self._vote = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.received = signum

    def requested(self, step: int) -> int:
        """The signal number to stop for after `step`, 0 to go on; on several ranks the same answer on every
        rank (collective: every rank calls it after every step, with the same step)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.received
        decision = 0
        if self._vote is not None:  # started one step ago
            work, flag = self._vote
            work.wait()
            decision, self._vote = int(flag), None
        if not decision and step % self.vote_every == 0:
            if self._group is None:  # first vote, at the same step on every rank
                self._group = dist.new_group(backend="gloo")
            flag = torch.tensor([self.received], dtype=torch.int64)
            self._vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return decision

"""Progress within a training epoch, for a terminal and for a log file nobody watches.

On a terminal, tqdm's bar shows the epoch's steps, its rate and the epoch's ETA; this
module adds the run's ETA to it. When the output goes to a file (a SLURM job, ``nohup``),
tqdm stays silent, and one plain line is printed every ``--progress-interval`` seconds::

    epoch 3/100 step 120/391 | 1234 img/s | ETA epoch 3m40s, run 5h12m

The estimates: the epoch's remaining steps at this epoch's mean seconds per step; each
later epoch as long as the median epoch this process finished (training and evaluation: not
the epochs before a resume, which may have run on another machine; the median, so that once three
have finished one epoch slowed by other work or a suspended process does not stretch every
later one), or,
before any finished, as long as this epoch's training is projected to take.
"""

from __future__ import annotations

import statistics
import time

#: Seconds between updates of the run ETA on the tqdm bar.
BAR_REFRESH_S = 1.0


def format_duration(seconds: float) -> str:
    """``42s``, ``3m40s``, ``5h12m`` (rounded down to the unit shown)."""
    s = int(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def typical_epoch_seconds(durations: list[float]) -> float | None:
    """The median of the epochs this process finished (seconds each), or None before the first."""
    return statistics.median(durations) if durations else None


class EpochProgress:
    """Counts one epoch's steps and reports its progress.

    Args:
        epoch: this epoch (1-based). epochs: the run's last epoch.
        total_steps: steps in this epoch.
        epoch_seconds: the expected length of each later epoch in seconds
            (``typical_epoch_seconds`` of the epochs this process finished), or None when none has
            finished yet.
        interval: seconds between plain lines given to ``log``; 0 prints none.
        log: a ``print``-like function.
        bar: the epoch's tqdm bar; unless disabled, its postfix shows the run's ETA.
        clock: seconds, monotonic (a parameter for tests).
    """

    def __init__(self, epoch: int, epochs: int, total_steps: int, epoch_seconds: float | None, interval: float,
                 log=print, bar=None, clock=time.monotonic):
        self.epoch, self.epochs, self.total_steps, self.epoch_seconds = epoch, epochs, total_steps, epoch_seconds
        self.interval, self.log, self.clock = interval, log, clock
        self.bar = bar if bar is not None and not bar.disable else None
        self.start = clock()
        self.steps = self.images = 0
        self.next_line = self.start + interval
        self.next_bar = self.start

    def step(self, images: int) -> None:
        """Count one finished step of ``images`` images; print or refresh what is due."""
        self.steps += 1
        self.images += images
        now = self.clock()
        if self.interval > 0 and now >= self.next_line:
            self.log(self.line(now))
            self.next_line = now + self.interval
        if self.bar is not None and now >= self.next_bar:
            self.bar.set_postfix_str(f"run ETA {format_duration(self.etas(now)[1])}", refresh=False)
            self.next_bar = now + BAR_REFRESH_S

    def etas(self, now: float) -> tuple[float, float]:
        """(seconds left in this epoch's training, seconds left in the run), estimated at ``now``."""
        per_step = (now - self.start) / max(self.steps, 1)
        epoch_left = (self.total_steps - self.steps) * per_step
        later = self.epoch_seconds if self.epoch_seconds is not None else self.total_steps * per_step
        return epoch_left, epoch_left + (self.epochs - self.epoch) * later

    def line(self, now: float) -> str:
        """The plain progress line at ``now``."""
        elapsed = max(now - self.start, 1e-9)
        epoch_left, run_left = self.etas(now)
        return (f"epoch {self.epoch}/{self.epochs} step {self.steps}/{self.total_steps} | "
                f"{self.images / elapsed:.0f} img/s | "
                f"ETA epoch {format_duration(epoch_left)}, run {format_duration(run_left)}")

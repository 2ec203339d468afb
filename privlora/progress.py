"""Live progress of a bench's child processes, and the bench's phase line.

The channel: a child ``privlora train`` that the bench starts gets ``PRIVLORA_PROGRESS_FILE`` in its environment;
:func:`report`, called after each optimizer step, rewrites that small JSON file atomically at most once a second
(``{"phase", "step", "total", "started", "time"}``) and does nothing when the variable is unset. Where that file
does not exist (yet), the parent reads instead the last line that the child's own tqdm bar wrote into the child's
log (``<run>/train.log``), which it never changes.

The parent polls once a second while it waits for its children. On a terminal it draws one live bar per running
job (steps, elapsed, ETA) under a phase line (train → select → audit → quality → table); elsewhere (a file, a CI
log, ``TQDM_DISABLE``) it writes a plain status line once a minute and one when a job ends, never a carriage return.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ENV = "PRIVLORA_PROGRESS_FILE"
PHASES = ("train", "select", "audit", "quality", "table")

_last_write: dict[str, float] = {}
_started: dict[str, float] = {}


# --- the child's side -----------------------------------------------------------------------------------------

def report(step: int, total: int, phase: str = "train", every: float = 1.0) -> None:
    """Tell the parent that ``step`` of ``total`` steps are done: rewrites the file ``PRIVLORA_PROGRESS_FILE``
    names at most every ``every`` seconds (and always at the last step); a no-op when the variable is unset.
    Never raises for a file it cannot write: progress is not worth a failed training."""
    path = os.environ.get(ENV)
    if not path:
        return
    now = time.time()
    started = _started.setdefault(path, now)
    if step < total and now - _last_write.get(path, float("-inf")) < every:
        return
    _last_write[path] = now
    with contextlib.suppress(OSError):
        write_progress(Path(path), {"phase": phase, "step": step, "total": total, "started": started, "time": now})


def write_progress(path: Path, record: dict) -> None:
    """Atomic (a temporary file renamed over the old one) but not fsynced: a progress file is disposable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


# --- reading it -----------------------------------------------------------------------------------------------

def read_progress(path: Path) -> tuple[int, int | None] | None:
    """(step, total) from a progress file, or None when it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
        return int(record["step"]), (int(record["total"]) if record.get("total") else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tail_bar(log: Path, desc: str, nbytes: int = 16384) -> tuple[int, int] | None:
    """(step, total) of the last tqdm bar called ``desc`` in the last ``nbytes`` of a log, or None."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    bars = re.findall(rf"(?:^|[\r\n]){re.escape(desc)}: *\d+%\|[^|\r\n]*\| *(\d+)/(\d+) \[", text)
    return (int(bars[-1][0]), int(bars[-1][1])) if bars else None


@dataclass
class Watch:
    """One running job as the parent sees it: where to look, what it saw, and when."""

    name: str
    since: float  # the parent's clock when the job started
    progress_file: Path | None = None
    log_file: Path | None = None
    desc: str | None = None  # the child's tqdm description in log_file
    step: int | None = None
    total: int | None = None
    first: tuple[float, int] | None = None  # the first observation (clock, step): where the rate is measured from

    def poll(self, now: float) -> None:
        seen: tuple[int, int | None] | None = None
        if self.progress_file is not None:
            seen = read_progress(self.progress_file)
        if seen is None and self.log_file is not None and self.desc:
            seen = tail_bar(self.log_file, self.desc)
        if seen is None:
            return
        self.step, self.total = seen
        if self.first is None or self.step < self.first[1]:
            self.first = (now, self.step)

    def rate(self, now: float) -> float | None:
        """Steps per second since the first observation."""
        if self.first is None or self.step is None or self.step <= self.first[1] or now <= self.first[0]:
            return None
        return (self.step - self.first[1]) / (now - self.first[0])

    def eta(self, now: float) -> float | None:
        rate = self.rate(now)
        return None if rate is None or self.total is None or self.step is None else (self.total - self.step) / rate


# --- rendering ------------------------------------------------------------------------------------------------

def phase_line(phase: str | None, detail: str = "", phases: Iterable[str] = PHASES) -> str:
    """``bench: train → [audit] → quality → table · detail``: the phase under way in brackets."""
    names = " → ".join(f"[{p}]" if p == phase else p for p in phases)
    return f"bench: {names}" + (f" · {detail}" if detail else "")


def job_meter(watch: Watch, now: float, width: int | None = None) -> str:
    """A tqdm-style line for one job: steps, elapsed time, ETA (from the rate since the first observation)."""
    from tqdm import tqdm

    elapsed = max(0.0, now - watch.since)
    if watch.step is None:
        return f"{watch.name}: starting [{tqdm.format_interval(elapsed)}]"
    rate = watch.rate(now)  # None: not measured yet, so tqdm shows "?" (initial = step: no rate of its own)
    return tqdm.format_meter(watch.step, watch.total, elapsed, ncols=width, prefix=watch.name, unit="step",
                             rate=rate, initial=watch.step if rate is None else 0)


def job_status(watch: Watch, now: float) -> str:
    """A short plain description of one job for a log line."""
    from tqdm import tqdm

    if watch.step is None:
        return f"{watch.name} starting"
    text = f"{watch.name} {watch.step}/{watch.total if watch.total is not None else '?'} steps"
    eta = watch.eta(now)
    return text + (f", ETA {tqdm.format_interval(eta)}" if eta is not None else "")


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Board:
    """The phase line and the running jobs' progress, drawn live on a terminal and as occasional plain lines
    elsewhere. ``start``/``say`` may be called from worker threads; drawing happens in the thread that waits."""

    def __init__(self, log: Callable[[str], None] = print, stream: IO[str] | None = None, live: bool | None = None,
                 every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.log, self.stream, self.clock, self.every = log, stream or sys.stderr, clock, every
        self.live = (_is_terminal(self.stream) and not os.environ.get("TQDM_DISABLE")) if live is None else live
        self.phase: str | None = None
        self.phases: tuple[str, ...] = PHASES  # the bench's phases in order (with "tune" first when a run is tuned)
        self.running: dict[str, Watch] = {}
        self.done = 0
        self.total = 0
        self.noun = "jobs"
        self._lock = threading.Lock()
        self._bars: list[Any] = []  # tqdm lines: the phase line, then one per running job
        self._last_status = clock()

    # the phase line
    def enter(self, phase: str, detail: str = "") -> None:
        """A new phase starts: one plain line, on a terminal too."""
        self.phase = phase
        self.say(phase_line(phase, detail, self.phases))

    def counts(self) -> str:
        return f"{self.done}/{self.total} {self.noun} done"

    # jobs
    def expect(self, total: int, noun: str = "jobs") -> None:
        self.total, self.done, self.noun = total, 0, noun

    def start(self, name: str, progress_file: Path | None = None, log_file: Path | None = None,
              desc: str | None = None) -> None:
        with self._lock:
            self.running[name] = Watch(name, self.clock(), progress_file, log_file, desc)

    def finish(self, name: str, error: BaseException | None = None) -> None:
        with self._lock:
            watch = self.running.pop(name, None)
            self.done += 1
        took = "" if watch is None else f" after {_interval(self.clock() - watch.since)}"
        self.say(f"{name}: failed{took} ({error})" if error else
                 f"{name}: finished{took} ({self.counts()})")

    def say(self, message: str) -> None:
        """A log line that does not tear the live bars."""
        if self._bars:
            from tqdm import tqdm

            with tqdm.external_write_mode():
                self.log(message)
        else:
            self.log(message)

    # polling
    def refresh(self) -> None:
        now = self.clock()
        with self._lock:
            watches = list(self.running.values())
        for watch in watches:
            watch.poll(now)
        if self.live:
            self._draw(watches, now)
        elif watches and now - self._last_status >= self.every:
            self._last_status = now
            self.log(f"{self.phase or 'bench'}: {self.counts()} · " + " · ".join(job_status(w, now) for w in watches))

    def _draw(self, watches: list[Watch], now: float) -> None:
        from tqdm import tqdm

        width = shutil.get_terminal_size((80, 20)).columns - 1
        lines = [phase_line(self.phase, self.counts(), self.phases), *(job_meter(w, now, width) for w in watches)]
        while len(self._bars) < len(lines):
            self._bars.append(tqdm(total=0, bar_format="{desc}", position=len(self._bars), leave=False,
                                   file=self.stream, dynamic_ncols=False, disable=False))
        for bar, text in zip(self._bars, lines + [""] * (len(self._bars) - len(lines))):
            bar.set_description_str(text[:width], refresh=False)
            bar.refresh()

    def close(self) -> None:
        for bar in reversed(self._bars):
            bar.close()
        self._bars = []

    def wait(self, futures: dict[Future, str], poll: float = 1.0) -> None:
        """Wait for every future, refreshing the display every ``poll`` seconds and ending each future's job when
        it completes; then raise the first failure in submission order (as ``[f.result() for f in futures]``)."""
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, timeout=poll, return_when=FIRST_COMPLETED)
                for future in (f for f in futures if f in finished):
                    self.finish(futures[future], future.exception())
                self.refresh()
        finally:
            self.close()
        for future in futures:
            future.result()


def _interval(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(max(0.0, seconds))

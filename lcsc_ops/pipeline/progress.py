"""What a user sees while a long command runs: its stages, how far each is, how fast, how long to go.

One small interface, :class:`Progress`, passed into the training loop and the optimize stages:

- ``stage(name, total, ...)`` starts a stage (training steps, baselines, search trials, final
  candidates) of ``total`` items;
- ``advance(n, done=..., status=...)`` moves it on (``done`` sets the count, e.g. trials other
  workers finished too) and sets its one-line status (loss, best so far, ...);
- ``note(text)`` prints a line that stays (what the pipeline logs).

Three implementations: :class:`RichProgress` (bars, for a terminal), :class:`PlainProgress`
(one plain line every few items or seconds, for pipes, log files and worker processes) and
:class:`SilentProgress` (``--quiet``). :func:`make_progress` picks one for stderr.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TextIO

PLAIN_EVERY = 5  # a plain line every 5 items...
PLAIN_SECONDS = 30.0  # ...or every 30 s, whichever comes first


class Progress(Protocol):
    def stage(self, name: str, total: int | None, *, unit: str = "", done: int = 0, per: str = "s",
              every: int = PLAIN_EVERY) -> None: ...

    def advance(self, n: int = 1, *, done: int | None = None, status: str | None = None) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Stage:
    """One stage's counters; rate and ETA count only the items done since it started (a resumed
    search's earlier trials do not make it look fast)."""

    name: str
    total: int | None
    unit: str = ""
    per: str = "s"  # the rate's time unit: "s" or "min"
    every: int = PLAIN_EVERY
    done: int = 0
    status: str = ""
    clock: Callable[[], float] = time.monotonic
    start_done: int = field(init=False)
    t0: float = field(init=False)

    def __post_init__(self) -> None:
        self.start_done, self.t0 = self.done, self.clock()

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total

    def rate(self) -> float | None:
        """Items per second since the stage started (None before the first one)."""
        elapsed, n = self.clock() - self.t0, self.done - self.start_done
        return n / elapsed if n > 0 and elapsed > 0 else None

    def rate_text(self) -> str:
        rate = self.rate()
        if rate is None:
            return ""
        scale = 60.0 if self.per == "min" else 1.0
        return f"{rate * scale:.1f} {self.unit or 'items'}/{self.per}"

    def eta_text(self) -> str:
        rate = self.rate()
        if rate is None or self.total is None or self.finished:
            return ""
        return f"ETA {format_duration((self.total - self.done) / rate)}"

    def count_text(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.done}{of}" + (f" {self.unit}" if self.unit else "")

    def line(self) -> str:
        """``search: 5/12 trials | best 0.81 ... | 21.3 trials/min | ETA 0:20``."""
        parts = [self.count_text(), self.status, self.rate_text(), self.eta_text()]
        if self.finished:
            parts.append(f"done in {format_duration(self.clock() - self.t0)}")
        return f"{self.name}: " + " | ".join(p for p in parts if p)


class _Base:
    """Counting shared by the implementations; ``_shown`` is called after every change."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.current = clock, None

    def stage(self, name: str, total: int | None, *, unit: str = "", done: int = 0, per: str = "s",
              every: int = PLAIN_EVERY) -> None:
        self.current = Stage(name, total, unit, per, max(1, every), done, clock=self.clock)
        self._started(self.current)

    def advance(self, n: int = 1, *, done: int | None = None, status: str | None = None) -> None:
        if self.current is None:
            return
        stage = self.current
        stage.done = done if done is not None else stage.done + n
        if status is not None:
            stage.status = status
        self._shown(stage)

    def _started(self, stage: Stage) -> None:
        pass

    def _shown(self, stage: Stage) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SilentProgress(_Base):
    """``--quiet``: counts, shows nothing."""


class PlainProgress(_Base):
    """Plain lines through ``write`` (a pipe, a log file, a worker's ``[worker i]`` log): one when a
    stage starts, then one every ``stage.every`` items or ``seconds`` seconds, whichever comes
    first, and one when it finishes."""

    def __init__(self, write: Callable[[str], None], *, seconds: float = PLAIN_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.write, self.seconds = write, seconds
        self._last_done, self._last_t = 0, clock()

    def _emit(self, stage: Stage) -> None:
        self._last_done, self._last_t = stage.done, self.clock()
        self.write(stage.line())

    def _started(self, stage: Stage) -> None:
        self._emit(stage)

    def _shown(self, stage: Stage) -> None:
        due = (stage.done - self._last_done >= stage.every or self.clock() - self._last_t >= self.seconds
               or (stage.finished and self._last_done < stage.done))
        if due:
            self._emit(stage)

    def note(self, text: str) -> None:
        self.write(text)


class RichProgress(_Base):
    """Bars on a terminal (rich): one per stage, kept on screen when it ends; notes print above them."""

    def __init__(self, console: Any, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.console, self._bars, self._task = console, None, None

    def _started(self, stage: Stage) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn

        if self._bars is None:
            self._bars = Bars(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                              TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[info]}"),
                              console=self.console, refresh_per_second=4)
            self._bars.start()
        self._task = self._bars.add_task(stage.name, total=stage.total, completed=stage.done, unit=stage.unit,
                                         info="")

    def _shown(self, stage: Stage) -> None:
        info = " · ".join(p for p in (stage.status, stage.rate_text(), stage.eta_text()) if p)
        self._bars.update(self._task, completed=stage.done, info=info)

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None


def stderr_writer(stream: TextIO | None = None, prefix: str = "") -> Callable[[str], None]:
    """A ``write`` that prints one line to ``stream`` (stderr) and flushes it at once."""
    def write(text: str) -> None:
        out = stream or sys.stderr
        print(prefix + text, file=out, flush=True)
    return write


def make_progress(*, quiet: bool = False, plain: bool = False, stream: TextIO | None = None) -> Any:
    """Silent with ``quiet``; bars when ``stream`` (stderr) is a terminal, unless ``plain``; else plain lines."""
    if quiet:
        return SilentProgress()
    from rich.console import Console

    console = Console(file=stream or sys.stderr)
    if console.is_terminal and not console.is_dumb_terminal and not plain:
        return RichProgress(console)
    return PlainProgress(stderr_writer(stream))

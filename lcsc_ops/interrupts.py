"""SIGINT and SIGTERM as one exception, so every command ends its work cleanly and says so.

A scheduler (Slurm, Kubernetes) sends SIGTERM before it kills; a user presses Ctrl-C. Under
:func:`handled` both raise :class:`Interrupted` in the main thread, where each stage's
``except KeyboardInterrupt`` / ``finally`` ends what it holds (the trial in flight FAILED, runs
KILLED, study locks released) and the CLI prints one line and exits 128 + the signal's number.
A second signal exits at once. Processes registered with :func:`forward_to` (the local workers
of ``--workers N``, each in its own process group) get every signal this process gets.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_forward: set[int] = set()  # pids that get the signals this process gets
_received: list[int] = []  # the signals received so far
_deferring: list[bool] = []  # inside deferred(): a first signal waits for its end
_pending: list[int] = []  # a signal that came inside deferred(), raised at its end


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM; ``done`` is the one line saying what was ended and how to resume."""

    def __init__(self, signum: int = signal.SIGINT, done: str = "") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.done = int(signum), done

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def interrupted(exc: BaseException, done: str) -> Interrupted:
    """``exc`` (an :class:`Interrupted` or a plain ``KeyboardInterrupt``) with ``done`` said."""
    return Interrupted(getattr(exc, "signum", signal.SIGINT), done)


def _handle(signum: int, frame: Any) -> None:
    for pid in list(_forward):
        with contextlib.suppress(OSError):
            os.kill(pid, signum)
    if _received:  # the second signal: the user does not want to wait for the clean-up
        os._exit(128 + signum)
    _received.append(signum)
    if _deferring:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in this block (the main thread only; a
    SIGINT that was ignored when the process started, e.g. a background job, stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (and receives the signals)
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        if old[s] != signal.SIG_IGN:
            signal.signal(s, _handle)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a first signal does not cut in half (a model registration): the signal is raised
    as :class:`Interrupted` when the block ends; a second one still exits at once."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if _pending and not _deferring:
        raise Interrupted(_pending.pop())


def hold() -> None:
    """Hold a first signal off until :func:`release` (a window that spans another library's code,
    like Optuna's tell between our objective's end and our callback)."""
    _deferring.append(True)


def release(raise_pending: bool = True) -> None:
    """End a :func:`hold`; raise the signal that came meanwhile (unless the caller is already
    leaving with an exception)."""
    if _deferring:
        _deferring.pop()
    if raise_pending and _pending and not _deferring:
        raise Interrupted(_pending.pop())


def forward_to(pid: int) -> None:
    _forward.add(pid)


def stop_forwarding(pid: int) -> None:
    _forward.discard(pid)

"""The training process's side of the checkpoint uploader process: the pipe to it.

Jobs go down its stdin (one JSON line each, unbuffered); its answers (``ready``, ``done``,
``freed`` slots, ``error``) come up its stdout and are read when the loop looks for them.
"""
from __future__ import annotations

import collections
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from lcsc_ops.errors import LcscError
from lcsc_ops.redact import mask_credentials
from lcsc_ops.store.shared_memory import ShmOwner


class UploadProcess:
    """The uploader process of one run and the steps handed to it, not yet confirmed. Its answers
    are read when the loop looks for them (no reader thread: nothing else in the training process
    wants the interpreter lock)."""

    def __init__(self, tracking_uri: str, run_id: str, owner: ShmOwner) -> None:
        worker = Path(__file__).with_name("upload_worker.py")  # the URI in its environment: no password in `ps`
        self.proc = subprocess.Popen([sys.executable, "-u", str(worker), run_id], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, pass_fds=owner.pass_fds(),
                                     env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **owner.env()})
        self.pending: dict[int, int] = {}  # step -> bytes, in order
        self._lock = threading.Lock()  # pending: a large pair is handed over by the writer thread
        self._fd, self._buf, self._eof = self.proc.stdout.fileno(), b"", False
        self._stdin = self.proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        self._answers: collections.deque = collections.deque()
        self._free: collections.deque = collections.deque()  # shared-memory slots written out
        while not self._answers and not self._eof:  # mlflow imported, the run found: training may go on
            self._read(None)
        answer = self._answers.popleft() if self._answers else {}
        if "ready" not in answer:
            self.stop()
            why = answer.get("error", "it exited")
            raise LcscError(mask_credentials(f"the checkpoint uploader could not start: {why}"))

    def _read(self, timeout: float | None) -> None:
        """Take in the answers that came, waiting up to ``timeout`` s (None: until one comes)."""
        if self._eof or not select.select([self._fd], [], [], timeout)[0]:
            return
        try:
            chunk = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return
        self._eof = not chunk
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        for line in lines:
            answer = json.loads(line)
            if "freed" in answer:
                self._free.append(answer["freed"])
            else:
                self._answers.append(answer)

    def reset_slots(self, count: int) -> None:
        """Every shared-memory slot is free (a new set of them)."""
        self._free = collections.deque(range(count))

    def free_slot(self, timeout: float) -> int | None:
        """A slot the uploader has written out; None if none within ``timeout`` or it exited."""
        if not self._free:
            self._read(timeout)
        return self._free.popleft() if self._free else None

    def send(self, job: dict[str, Any], size: int = 0) -> None:
        """Hand over a job; ``size``: the bytes it holds in the spool until it is confirmed (a step's)."""
        self._write(json.dumps(job).encode() + b"\n", job.get("step"), size)

    def send_slot(self, step: int, slot: int, size: int) -> None:
        """:meth:`send` of ``{"step", "slot"}``, formatted by hand: ``json.dumps`` costs the loop
        more than the system call."""
        self._write(b'{"step": %d, "slot": %d}\n' % (step, slot), step, size)

    def _write(self, line: bytes, step: int | None, size: int) -> None:
        if step is not None:
            with self._lock:
                self.pending[step] = size
        try:
            while line:  # unbuffered: one system call for a job
                line = line[os.write(self._stdin, line):]
        except OSError:
            raise LcscError(self._exited()) from None

    def pending_bytes(self) -> int:
        with self._lock:
            return sum(self.pending.values())

    def take(self, block: bool, read: bool = True) -> list[dict[str, Any]] | None:
        """The entries of the next confirmed step (with their hashes); None if none is confirmed
        yet (``block=False``). ``read=False``: only what was read already (no system call)."""
        if read:
            self._read(0)
        while block and not self._answers and not self._eof:
            self._read(None)
        if not self._answers:
            if self._eof:
                raise LcscError(self._exited())
            return None
        answer = self._answers.popleft()
        if "error" in answer:
            first, last = answer["step"], answer.get("last_step", answer["step"])
            steps = f"step {first}" if first == last else f"steps {first}-{last}"
            why = f"the checkpoint upload of {steps} failed: {answer['error']}"
            raise LcscError(mask_credentials(why))
        with self._lock:
            self.pending.pop(answer["done"])
        return answer["entries"]

    def _exited(self) -> str:
        code = self.proc.wait()
        return f"the checkpoint uploader exited (code {code}) with {len(self.pending)} step(s) not uploaded"

    def stop(self) -> None:
        """End of input: the worker uploads what it received and exits by itself (reaped in the
        background: its interpreter's shutdown need not hold up the training process)."""
        if not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        threading.Thread(target=self.proc.wait, name="lcsc-ckpt-reap", daemon=True).start()

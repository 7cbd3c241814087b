"""The checkpoint uploader process of :class:`~lcsc_ops.store.logger.CheckpointLogger`.

Run as a script (``python upload_worker.py RUN_ID``; the store in ``MLFLOW_TRACKING_URI``), so
it imports mlflow and nothing of torch, and of lcsc_ops only the run format's file
(:mod:`lcsc_ops.runformat`: names, entries, fragments, as the logger writes them): MLflow's
client-side work (HTTP, file copies) then runs beside the training loop instead of taking turns
with it for the interpreter lock. Answers ``{"ready": true}`` once the run is found; then reads one JSON job
per line on stdin: a step whose files are on local disk, or ``{"step", "slot"}``: a pair in a
shared-memory slot, written out here at once, then ``{"freed": slot}``. It logs the files,
then their manifest fragment (written here from the job), deletes the step's spool folder and
answers ``{"done": step, "entries": [...]}`` (``{"error": ...}`` and exit 1 on a failure).
Steps that queue up while an upload is in flight (a slow server, a fast loop) go up together:
their files in one call, their entries in one fragment, so the calls per step fall as the
queue grows. At end of input (the
trainer closed it, or died) every job received is uploaded: a killed trainer loses only the
steps it had not handed over.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import mmap
import os
import queue
import select
import shutil
import signal
import sys
import tempfile
import threading
import time


def _load_runformat():
    """The run format (:mod:`lcsc_ops.runformat`, standard library only): imported as usual when this
    module is imported, loaded from its file when this runs as a script (the package imports torch)."""
    if __package__:
        from lcsc_ops import runformat

        return runformat
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runformat.py")
    spec = importlib.util.spec_from_file_location("lcsc_runformat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runformat = _load_runformat()

MAX_BATCH = 64  # steps per upload at most
NICE = 10  # this process's niceness


_ANSWER_LOCK = threading.Lock()


def _answer(message: dict) -> None:
    """One line to the trainer; a trainer that is gone no longer listens, the uploads go on."""
    with _ANSWER_LOCK:
        try:
            print(json.dumps(message), flush=True)
        except (BrokenPipeError, ValueError):
            sys.stdout = open(os.devnull, "w")


# The trainer's shared-memory owner lock (see lcsc_ops.store.shared_memory), held here too through an
# inherited descriptor; this process outlives the trainer's hold, so it removes the file when it exits.
OWNER_ENV = "LCSC_OPS_SHM_OWNER"


def owner_lock_path(folder: str, token: str) -> str:
    return os.path.join(folder, f"lcsc-owner-{token}.lock")


def leaves_half_free(folder: str, size: int) -> bool:
    """Whether ``size`` more bytes leave at least half of ``folder``'s file system free: shared
    memory is small in containers (64 MB by default in Docker) and DataLoader workers need it too."""
    try:
        fs = os.statvfs(folder)
    except OSError:
        return False
    return (fs.f_bavail * fs.f_frsize - size) * 2 >= fs.f_blocks * fs.f_frsize


class _Slots:
    """The trainer's shared-memory slots and how to write a pair out of them (``{"slots": ...}``,
    sent once per layout; the file is unlinked once mapped: a killed trainer leaves none behind)."""

    def __init__(self) -> None:
        self.mm, self.layout = None, None
        self.fast, self.fast_bytes, self.lock = None, 0, threading.Lock()

    def map(self, layout: dict) -> None:
        if self.mm is not None:
            self.mm.close()
        fd = os.open(layout["slots"], os.O_RDWR)
        try:
            self.mm, self.layout = mmap.mmap(fd, 0), layout
        finally:
            os.close(fd)
        try:
            os.unlink(layout["slots"])
        except FileNotFoundError:
            pass

    def _fast_spool(self) -> str | None:
        """This process's spool folder in shared memory (``layout["fast_spool"]``), made once and named
        with the trainer's owner token (see ``lcsc_ops.store.shared_memory``)."""
        if self.fast is None and self.layout.get("fast_spool") and self.layout.get("owner"):
            try:
                self.fast = tempfile.mkdtemp(prefix=f"lcsc-spool-{self.layout['owner']}-",
                                             dir=self.layout["fast_spool"])
            except OSError:
                self.layout["fast_spool"] = None
        return self.fast

    def write_out(self, step: int, slot: int) -> dict:
        """Write step's pair from ``slot`` into a spool folder, hand the slot back; the upload job.
        The folder is in shared memory while the pairs waiting there stay within
        ``layout["fast_spool_bytes"]`` and it has room, else in the spool on disk: files that live
        only until uploaded then cost the disk (and a file system journal) nothing."""
        size, fast = self.layout["size"] + 2 * 4096, self._fast_spool()  # data and, at most, headers
        with self.lock:
            if fast is not None and self.fast_bytes + size <= self.layout["fast_spool_bytes"] \
                    and leaves_half_free(fast, size):
                self.fast_bytes += size
            else:
                fast = None
        if fast is not None:
            try:
                return {**self._write(step, slot, fast), "fast_bytes": size}
            except OSError:  # shared memory full: this pair goes to disk
                self.uploaded(size)
                shutil.rmtree(os.path.join(fast, f"step{step:08d}"), ignore_errors=True)
        return self._write(step, slot, self.layout["spool"])

    def uploaded(self, fast_bytes: int) -> None:
        with self.lock:
            self.fast_bytes -= fast_bytes

    def _write(self, step: int, slot: int, spool: str) -> dict:
        layout, step8 = self.layout, f"{step:08d}"
        folder = os.path.join(spool, f"step{step8}")
        os.makedirs(folder, exist_ok=True)
        entries, base = [], slot * layout["size"]
        for f in layout["files"]:
            parts = (runformat.safetensors_prefix(str(step).join(f["header"])),
                     self.mm[base + f["begin"]:base + f["end"]])
            name, digest = runformat.checkpoint_filename(step, f["kind"]), hashlib.sha256()
            with open(os.path.join(folder, name), "wb") as out:
                for part in parts:
                    out.write(part)
                    digest.update(part)
            entries.append(runformat.manifest_entry(step, f["kind"], digest.hexdigest(), sum(len(p) for p in parts),
                                                    f["entry"]))
        _answer({"freed": slot})
        return {"step": step, "folder": folder, "spool": layout["spool"], "files_path": layout["files_path"],
                "fragment_path": layout["fragment_path"], "fragment_name": runformat.fragment_name_for(entries),
                "fragment": runformat.fragment_doc(entries)}


def _upload(client, run_id: str, jobs: list[dict]) -> None:
    """The jobs' files, one call per spool they wait in (shared memory, disk: renamed into one
    folder there, never copied across), then one fragment listing their entries (named after the
    first step)."""
    first, spools = jobs[0], {}
    for job in jobs:
        spools.setdefault(os.path.dirname(job["folder"]), []).append(job)
    for spool, group in spools.items():
        with tempfile.TemporaryDirectory(dir=spool, prefix="batch-") as tmp:
            files = group[0]["folder"]
            if len(group) > 1:
                files = os.path.join(tmp, "files")
                os.mkdir(files)
                for job in group:
                    for name in os.listdir(job["folder"]):
                        os.rename(os.path.join(job["folder"], name), os.path.join(files, name))
            if not _link_into(client, run_id, files, first["files_path"]):
                client.log_artifacts(run_id, files, first["files_path"])
    fragment = runformat.fragment_doc(e for job in jobs for e in job["fragment"]["entries"])
    _log_fragment(client, run_id, first, [*spools, first.get("spool")], fragment)
    for job in jobs:
        shutil.rmtree(job["folder"], ignore_errors=True)


_LOCAL_ROOTS: dict = {}


def _link_into(client, run_id: str, folder: str, files_path: str) -> bool:
    """A local file store (the run's artifact URI a ``file:`` or bare path): hard-link the files into
    the run's folder instead of letting MLflow copy them (gigabytes per checkpoint pair; the size
    sweep in benchmarks/RESULTS.md). False, for MLflow's copy, when the store is not local or a link
    cannot be made (another file system); what was linked is then replaced by the copy."""
    from urllib.parse import unquote, urlparse

    if run_id not in _LOCAL_ROOTS:
        try:
            parsed = urlparse(client.get_run(run_id).info.artifact_uri or "")
        except Exception:  # noqa: BLE001 - MLflow's own call below reports a store that fails
            parsed = urlparse("unknown:")
        local = parsed.scheme in ("", "file") and parsed.netloc in ("", "localhost")
        _LOCAL_ROOTS[run_id] = unquote(parsed.path) if local and os.path.isabs(unquote(parsed.path)) else None
    if _LOCAL_ROOTS[run_id] is None:
        return False
    dst = os.path.join(_LOCAL_ROOTS[run_id], files_path)
    os.makedirs(dst, exist_ok=True)
    names, linked = sorted(os.listdir(folder)), []
    try:
        for name in names:
            src = os.path.join(folder, name)
            if not os.path.isfile(src) or os.path.islink(src):
                raise OSError(f"not a plain file: {name}")
            linked.append(os.path.join(dst, f".{name}.link"))
            os.link(src, linked[-1])
    except OSError:
        for tmp in linked:  # none left behind for MLflow's copy to trip over
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False
    for name, tmp in zip(names, linked):
        os.replace(tmp, os.path.join(dst, name))
    return True


def _log_fragment(client, run_id: str, first: dict, spools: list, fragment: dict) -> None:
    """Log ``fragment`` from the first of ``spools`` it can be written in: shared memory may have
    filled up since the files were written; the disk spool comes last."""
    spools = [s for s in dict.fromkeys(spools) if s is not None]
    for k, spool in enumerate(spools):
        tmp = None
        try:
            tmp = tempfile.mkdtemp(dir=spool, prefix="fragment-")
            path = os.path.join(tmp, first["fragment_name"])
            with open(path, "w") as f:
                json.dump(fragment, f)
        except OSError:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if k == len(spools) - 1:
                raise
            continue
        try:
            client.log_artifact(run_id, path, first["fragment_path"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return


def _lines(fd: int = 0, quiet: float = 1.0, tick: float = 0.002):
    """The lines on ``fd``, polled every ``tick`` s while they keep coming and waited for after
    ``quiet`` s without one: a reader blocked on the pipe costs each write of the training loop a
    wake-up of this process (tens of microseconds in a VM)."""
    os.set_blocking(fd, False)
    buf, last = b"", time.monotonic()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            if time.monotonic() - last < quiet:
                time.sleep(tick)
            else:
                select.select([fd], [], [])
            continue
        if not chunk:
            return
        last = time.monotonic()
        *lines, buf = (buf + chunk).split(b"\n")
        yield from lines


def _read(jobs: queue.Queue, slots: _Slots) -> None:
    """Queue the trainer's jobs, a slot's files written out first (so the slot is free at once)."""
    for line in _lines():
        job = json.loads(line)
        try:
            if "slots" in job:
                slots.map(job)
                continue
            if "slot" in job:
                job = slots.write_out(job["step"], job["slot"])
        except Exception as exc:  # noqa: BLE001 - reported to the trainer by the upload loop
            job = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "step": job.get("step")}
        jobs.put(job)
    jobs.put(None)  # end of input


def _batch(jobs: queue.Queue) -> tuple[list[dict], bool]:
    """The next job and every one already waiting behind it; whether input has ended."""
    batch = [jobs.get()]
    while batch[-1] is not None and len(batch) < MAX_BATCH:
        try:
            batch.append(jobs.get_nowait())
        except queue.Empty:
            break
    ended = batch[-1] is None
    return [j for j in batch if j is not None], ended


def main(run_id: str) -> int:
    os.nice(NICE)  # background work: the training loop goes first where they share a core
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which waits for these uploads
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        client.get_run(run_id)  # store connected, run found: training may start
    except Exception as exc:  # noqa: BLE001 - reported to the trainer as one line
        _answer({"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "step": None})
        return 1
    gc.freeze()  # mlflow's objects, for good: else a full collection every ~80 uploads takes ~120 ms
    _answer({"ready": True})
    jobs: queue.Queue = queue.Queue()
    slots = _Slots()
    threading.Thread(target=_read, args=(jobs, slots), daemon=True).start()
    try:
        return _upload_all(client, run_id, jobs, slots)
    finally:
        if slots.fast is not None:
            shutil.rmtree(slots.fast, ignore_errors=True)
        if os.environ.get(OWNER_ENV):  # after the spool: a lock file without entries is harmless
            with contextlib.suppress(OSError):
                os.unlink(os.environ[OWNER_ENV])


def _upload_all(client, run_id: str, jobs: queue.Queue, slots: _Slots) -> int:
    ended = False
    while not ended:
        batch, ended = _batch(jobs)
        failed = next((job for job in batch if "error" in job), None)
        batch = batch[:batch.index(failed)] if failed is not None else batch
        if batch:
            try:
                _upload(client, run_id, batch)
            except Exception as exc:  # noqa: BLE001 - reported to the trainer as one line
                _answer({"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "step": batch[0]["step"],
                         "last_step": batch[-1]["step"]})
                return 1
            for job in batch:
                slots.uploaded(job.get("fast_bytes", 0))
                _answer({"done": job["step"], "entries": job["fragment"]["entries"]})
        if failed is not None:
            _answer(failed)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

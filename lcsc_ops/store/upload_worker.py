"""The checkpoint uploader process of :class:`~lcsc_ops.store.logger.CheckpointLogger`.

Run as a script (``python upload_worker.py RUN_ID``; the store in ``MLFLOW_TRACKING_URI``), so
it imports mlflow and nothing of torch or lcsc_ops: MLflow's client-side work (HTTP, file
copies) then runs beside the training loop instead of taking turns with it for the
interpreter lock. Answers ``{"ready": true}`` once the run is found; then reads one JSON job
per line on stdin, each a step whose files are already on local disk, logs the files, then
their manifest fragment (written here: the job holds its name and contents), deletes the step's spool folder and answers ``{"done": step}``
(``{"error": ...}`` and exit 1 on a failure). Steps that queue up while an upload is in
flight (a slow server, a fast loop) go up together: their files in one call, their entries in
one fragment, so the calls per step fall as the queue grows. At end of input (the trainer
closed it, or died) every job received is already uploaded: a killed trainer loses only the
steps it had not handed over.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading

MAX_BATCH = 64  # steps per upload at most


def _answer(message: dict) -> None:
    """One line to the trainer; a trainer that is gone no longer listens, the uploads go on."""
    try:
        print(json.dumps(message), flush=True)
    except (BrokenPipeError, ValueError):
        sys.stdout = open(os.devnull, "w")


def _upload(client, run_id: str, jobs: list[dict]) -> None:
    """The jobs' files, then one fragment listing their entries (named after the first step)."""
    first = jobs[0]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(first["folder"]), prefix="batch-") as tmp:
        files = first["folder"]
        if len(jobs) > 1:  # one folder for them all: renames, no copies
            files = os.path.join(tmp, "files")
            os.mkdir(files)
            for job in jobs:
                for name in os.listdir(job["folder"]):
                    os.rename(os.path.join(job["folder"], name), os.path.join(files, name))
        fragment = os.path.join(tmp, first["fragment_name"])
        with open(fragment, "w") as f:
            json.dump({**first["fragment"], "entries": [e for job in jobs for e in job["fragment"]["entries"]]}, f)
        client.log_artifacts(run_id, files, first["files_path"])
        client.log_artifact(run_id, fragment, first["fragment_path"])
    for job in jobs:
        shutil.rmtree(job["folder"], ignore_errors=True)


def _read(jobs: queue.Queue) -> None:
    for line in sys.stdin:
        jobs.put(json.loads(line))
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
    os.nice(10)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which waits for these uploads
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        client.get_run(run_id)  # store connected, run found: training may start
    except Exception as exc:  # noqa: BLE001 - reported to the trainer as one line
        _answer({"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "step": None})
        return 1
    _answer({"ready": True})
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=_read, args=(jobs,), daemon=True).start()
    ended = False
    while not ended:
        batch, ended = _batch(jobs)
        if not batch:
            continue
        try:
            _upload(client, run_id, batch)
        except Exception as exc:  # noqa: BLE001 - reported to the trainer as one line
            _answer({"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "step": batch[0]["step"],
                     "last_step": batch[-1]["step"]})
            return 1
        for job in batch:
            _answer({"done": job["step"]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

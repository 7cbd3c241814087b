"""The checkpoint uploader process of :class:`~lcsc_ops.store.logger.CheckpointLogger`.

Run as a script (``python upload_worker.py RUN_ID``; the store in ``MLFLOW_TRACKING_URI``), so
it imports mlflow and nothing of torch or lcsc_ops: MLflow's client-side work (HTTP, file
copies) then runs beside the training loop instead of taking turns with it for the
interpreter lock. Answers ``{"ready": true}`` once the run is found; then reads one JSON job
per line on stdin, each a step whose files are already on local disk, logs the files, then
their manifest fragment, deletes the step's spool folder and answers ``{"done": step}``
(``{"error": ...}`` and exit 1 on a failure). At end of input (the trainer closed it, or
died) every job received is already uploaded: a killed trainer loses only the steps it had
not handed over.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys


def _answer(message: dict) -> None:
    """One line to the trainer; a trainer that is gone no longer listens, the uploads go on."""
    try:
        print(json.dumps(message), flush=True)
    except (BrokenPipeError, ValueError):
        sys.stdout = open(os.devnull, "w")


def _upload(client, run_id: str, job: dict) -> None:
    client.log_artifacts(run_id, job["files"], job["files_path"])
    client.log_artifact(run_id, job["fragment"], job["fragment_path"])
    shutil.rmtree(job["folder"], ignore_errors=True)


def main(run_id: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which waits for these uploads
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        client.get_run(run_id)  # store connected, run found: training may start
    except Exception as exc:  # noqa: BLE001 - reported to the trainer as one line
        _answer({"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "step": None})
        return 1
    _answer({"ready": True})
    for line in sys.stdin:
        job = json.loads(line)
        try:
            _upload(client, run_id, job)
        except Exception as exc:  # noqa: BLE001 - reported to the trainer as one line
            _answer({"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "step": job["step"]})
            return 1
        _answer({"done": job["step"]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

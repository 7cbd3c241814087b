"""Shared memory shared by jobs in separate pid namespaces (containers with ``--ipc=host``): a
new logger removes only what a dead owner left (issue 25, item 8).

Two processes, each pid 1 of its own pid namespace (``unshare --pid --fork --mount-proc``, as
root), share one folder of ``/dev/shm``: the first holds an owner lock and a pending spool file,
the second sweeps. A pid-based sweep would see no such process and delete the live job's
pending checkpoints; the owner lock keeps them. Once the first is killed with -9, its files go.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lcsc_ops.store import shared_memory as shm_mod

SCRIPT = r"""
import json, os, sys, time
from lcsc_ops.store import shared_memory as shm
shm.SHM_DIR = sys.argv[1]
if sys.argv[2] == "hold":
    owner = shm.ShmOwner()
    spool = os.path.join(shm.SHM_DIR, f"lcsc-spool-{owner.token}-ab12")
    os.makedirs(os.path.join(spool, "step00000005"))
    with open(os.path.join(spool, "step00000005", "step00000005-raw.safetensors"), "wb") as f:
        f.write(b"a pending checkpoint")
    print(json.dumps({"pid": os.getpid(), "token": owner.token}), flush=True)
    time.sleep(600)
else:
    print(json.dumps({"pid": os.getpid(), "removed": [os.path.basename(p) for p in shm.sweep_shared_memory()]}))
"""


def _namespaces_available() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    if os.geteuid() != 0:
        return "unshare --pid needs root"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare --pid fails here: {probe.stderr.decode().strip()}"


pytestmark = pytest.mark.skipif(_namespaces_available() is not None, reason=str(_namespaces_available()))


def _in_namespace(folder: Path, mode: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c",
                             SCRIPT, str(folder), mode], stdout=subprocess.PIPE, text=True, **kwargs)


def _sweep(folder: Path) -> dict:
    proc = _in_namespace(folder, "sweep")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out)


@pytest.fixture
def folder():
    path = Path("/dev/shm") / f"lcsc-test-{uuid.uuid4().hex[:8]}"  # the one /dev/shm both namespaces see
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_logger_in_another_pid_namespace_keeps_a_live_jobs_files_and_sweeps_a_killed_ones(folder):
    holder = _in_namespace(folder, "hold")
    try:
        first = json.loads(holder.stdout.readline())
        spool = folder / f"lcsc-spool-{first['token']}-ab12"
        pending = spool / "step00000005" / "step00000005-raw.safetensors"
        assert pending.read_bytes() == b"a pending checkpoint"
        second = _sweep(folder)
        assert first["pid"] == second["pid"] == 1  # each is pid 1 of its own namespace: pids say nothing
        assert second["removed"] == [] and pending.read_bytes() == b"a pending checkpoint"
    finally:
        holder.send_signal(signal.SIGKILL)  # unshare, and with it (--kill-child) the holder
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (folder / f"lcsc-owner-{first['token']}.lock").exists():  # the killed owner's lock is free now
        removed = _sweep(folder)["removed"]
        if removed:
            assert set(removed) == {spool.name, f"lcsc-owner-{first['token']}.lock"}
        assert time.monotonic() < deadline, "the killed owner's files were not swept"
        time.sleep(0.1)
    assert not spool.exists() and list(folder.iterdir()) == []


LOGGER = r"""
import glob, json, os, sys, time
import mlflow
from lcsc_ops import CheckpointLogger, ModelSpec
from lcsc_ops.store import shared_memory as shm
shm.SHM_DIR, uri, mode = sys.argv[1], sys.argv[2], sys.argv[3]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("namespaces")
spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
net = spec.build()
with mlflow.start_run():
    logger = CheckpointLogger(spec, every=1)
    for step in (1, 2):
        logger.step(net, step)  # the first pair's slots sweep SHM_DIR first
    if mode == "hold":  # this uploader's uploads never end: both pairs wait in the shm spool
        while len(glob.glob(os.path.join(shm.SHM_DIR, f"lcsc-spool-{logger._owner.token}-*", "step*", "*"))) < 4:
            time.sleep(0.05)
        print(json.dumps({"pid": os.getpid(), "token": logger._owner.token}), flush=True)
        time.sleep(600)
    logger.close()
print(json.dumps({"pid": os.getpid(), "token": logger._owner.token}), flush=True)
"""
# In the holder's uploader only (a sitecustomize on its PYTHONPATH): its first upload stalls before it
# touches the files (a batch's folder is made first), as behind a stalled server.
STALL = """
import sys
if sys.argv and sys.argv[0].endswith("upload_worker.py"):
    import tempfile, time

    class _Stalled(tempfile.TemporaryDirectory):
        def __init__(self, *args, **kwargs):
            if kwargs.get("prefix") == "batch-":
                time.sleep(600)
            super().__init__(*args, **kwargs)

    tempfile.TemporaryDirectory = _Stalled
"""


def _logger(folder: Path, uri: str, mode: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c",
                             LOGGER, str(folder), uri, mode], stdout=subprocess.PIPE, text=True, env=env)


def test_two_loggers_in_separate_pid_namespaces(folder, tmp_path):
    """A real CheckpointLogger whose uploads are stalled keeps two pairs pending in the shm spool;
    a second logger, pid 1 of another namespace, starts and sweeps: the pending files stay. After
    kill -9 of the first job (trainer and uploader), a third logger's sweep removes them."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STALL)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = _logger(folder, uri, "hold", env={**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH")) if p)})
    try:
        first = json.loads(holder.stdout.readline())
        pending = sorted(folder.glob(f"lcsc-spool-{first['token']}-*/step*/*.safetensors"))
        assert len(pending) == 4, pending  # raw + EMA of steps 1 and 2, not uploaded
        data = {p: p.read_bytes() for p in pending}
        second = _logger(folder, uri, "run")
        out, _ = second.communicate(timeout=240)
        assert second.returncode == 0 and json.loads(out)["pid"] == first["pid"] == 1  # pids say nothing
        assert {p: p.read_bytes() for p in pending if p.exists()} == data, "a live job's pending files were deleted"
    finally:
        holder.send_signal(signal.SIGKILL)  # unshare; --kill-child kills the namespace's pid 1, and so all in it
        holder.wait(timeout=30)
    deadline = time.monotonic() + 60
    while any(p.exists() for p in pending):  # the next logger's sweep (the killed uploader may take a moment)
        third = _logger(folder, uri, "run")
        third.communicate(timeout=240)
        assert time.monotonic() < deadline, "a killed job's files were not swept"
    assert not list(folder.glob(f"lcsc-*{first['token']}*"))


def test_the_lock_of_a_live_owner_is_never_free_and_is_this_users():
    """In one namespace too: while the owner lives its lock cannot be taken; released, it can."""
    import fcntl

    owner = shm_mod.ShmOwner()
    try:
        assert owner.held and Path(owner.path).name == f"lcsc-owner-{owner.token}.lock"
        fd = os.open(owner.path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            owner.release()
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the owner let go
        finally:
            os.close(fd)
    finally:
        owner.release()
        Path(owner.path).unlink(missing_ok=True)

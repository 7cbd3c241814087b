"""The checkpoint logger and reader against a real (sqlite) MLflow store."""
from __future__ import annotations

import json
import os

import mlflow
import pytest
import torch
from safetensors import safe_open

from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.logger import CheckpointLogger
from lcsc_ops.math.ema import ema_decay_at
from lcsc_ops.store.fetch import fetch_window, read_manifest
from lcsc_ops.checkpoints import sha256_file
from tests.conftest import TINY_TRAIN


def test_training_logs_raw_and_ema_pairs_with_manifest(store, tiny_run):
    manifest = read_manifest(tiny_run, store["uri"])
    steps = list(range(TINY_TRAIN["checkpoint_every"], TINY_TRAIN["steps"] + 1, TINY_TRAIN["checkpoint_every"]))
    assert sorted({e["step"] for e in manifest["entries"]}) == steps
    assert sorted(e["kind"] for e in manifest["entries"]) == ["ema"] * len(steps) + ["raw"] * len(steps)
    for e in manifest["entries"]:
        assert set(e) >= {"step", "kind", "file", "sha256", "bytes"}
    client = mlflow.tracking.MlflowClient(store["uri"])
    run = client.get_run(tiny_run)
    assert "loss" in run.data.metrics
    spec = ModelSpec.from_json(run.data.tags["lcsc.spec"])
    assert spec.factory == "lcsc_ops.models.unet:digits_unet" and spec.kwargs["channels"] == 8


def test_fetch_window_verifies_and_reads_metadata(store, tiny_run):
    window = fetch_window(tiny_run, window=3, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.steps == (40, 50, 60)
    assert [e.label for e in window.entries] == ["raw@40", "raw@50", "raw@60", "ema@40", "ema@50", "ema@60"]
    assert window.training_ema.label == "ema@60"
    for e in window.entries:
        assert sha256_file(e.path) == e.sha256
        with safe_open(str(e.path), framework="pt") as f:
            meta = f.metadata()
        assert int(meta["lcsc.step"]) == e.step and meta["lcsc.kind"] == e.kind
        assert json.loads(meta["lcsc.spec"])["factory"] == window.spec.factory
    # EMA and raw weights differ: the EMA really is a separate average.
    raw, ema = window.entries[2].load(), window.entries[5].load()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_corrupted_cache_is_refetched_and_bad_hash_refused(store, tiny_run, tmp_path):
    window = fetch_window(tiny_run, window=1, tracking_uri=store["uri"], cache_dir=tmp_path)
    path = window.entries[0].path
    path.write_bytes(b"garbage")
    again = fetch_window(tiny_run, window=1, tracking_uri=store["uri"], cache_dir=tmp_path)
    assert sha256_file(again.entries[0].path) == again.entries[0].sha256


def test_logger_needs_an_active_run(store):
    mlflow.set_tracking_uri(store["uri"])
    assert mlflow.active_run() is None
    with pytest.raises(LcscError, match="no active MLflow run"):
        CheckpointLogger(ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 2, "out_features": 2}))


def test_logger_in_a_plain_loop_logs_every_n_steps(store):
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_experiment("plain-loop")
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    model = torch.nn.parallel.DataParallel(spec.build())  # wrapped: the logger unwraps it
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        with CheckpointLogger(spec, every=2, ema_decay=0.5) as ckpt:
            for step in range(1, 6):
                model(torch.randn(4, 3)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                ckpt.step(model, step)
    manifest = read_manifest(run.info.run_id, store["uri"])
    assert [(e["step"], e["kind"]) for e in manifest["entries"]] == [(2, "raw"), (2, "ema"), (4, "raw"), (4, "ema")]
    window = fetch_window(run.info.run_id, window=1, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert set(window.entries[0].load()) == {"weight", "bias"}  # unwrapped: no "module." prefix


def test_window_can_end_at_an_earlier_step(store, tiny_run):
    window = fetch_window(tiny_run, window=2, end_step=35, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.steps == (20, 30) and window.training_ema.label == "ema@30"
    with pytest.raises(LcscError, match="before step 5"):
        fetch_window(tiny_run, window=2, end_step=5, tracking_uri=store["uri"], cache_dir=store["cache"])


def _logged_ema_run(store, experiment: str, steps: int, **logger_kwargs):
    """A tiny SGD run logging raw + EMA every step; returns (run id, raw state dicts, EMA state dicts)."""
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_experiment(experiment)
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    model = spec.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with mlflow.start_run() as run:
        with CheckpointLogger(spec, every=1, **logger_kwargs) as ckpt:
            for step in range(1, steps + 1):
                model(torch.randn(8, 3)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                ckpt.step(model, step)
    window = fetch_window(run.info.run_id, window=steps, tracking_uri=store["uri"], cache_dir=store["cache"])
    return (run.info.run_id, [e.load() for e in window.entries if e.kind == "raw"],
            [e.load() for e in window.entries if e.kind == "ema"])


def test_ema_snapshots_follow_the_ema_recursion(store):
    decay = 0.75
    _, raws, emas = _logged_ema_run(store, "ema-recursion", 4, ema_decay=decay, ema_warmup=False)
    expected = raws[0]
    assert all(torch.equal(emas[0][k], expected[k]) for k in expected)  # the EMA starts at the first weights
    for raw, ema in zip(raws[1:], emas[1:]):
        expected = {k: decay * expected[k] + (1 - decay) * raw[k] for k in raw}
        for k in raw:
            torch.testing.assert_close(ema[k], expected[k])


def test_ema_warmup_follows_the_diffusers_schedule(store):
    decay = 0.3
    run_id, raws, emas = _logged_ema_run(store, "ema-warmup", 7, ema_decay=decay)  # warm-up on by default
    expected = raws[0]
    for n, (raw, ema) in enumerate(zip(raws[1:], emas[1:]), start=1):
        d = min(decay, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13 (< 0.3), then 0.3
        assert d == ema_decay_at(decay, n)
        expected = {k: d * expected[k] + (1 - d) * raw[k] for k in raw}
        for k in raw:
            torch.testing.assert_close(ema[k], expected[k])
    assert ema_decay_at(0.999, 10 ** 6) == 0.999 and ema_decay_at(0.999, 1, warmup=False) == 0.999
    assert read_manifest(run_id, store["uri"])["entries"][1]["ema_warmup"] is True


def test_a_run_without_its_end_marker_is_read_from_its_fragments_and_called_partial(store):
    """Per step: the files, then a small fragment (no upload grows with the run); the complete
    manifest only when the logger closes. A run read before that is partial."""
    from lcsc_ops.models.unet import digits_unet

    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("partial") or client.get_experiment(client.create_experiment("partial"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    spec = ModelSpec(factory="lcsc_ops.models.unet:digits_unet", kwargs={"channels": 8})
    model = digits_unet(channels=8)
    logger = CheckpointLogger(spec, every=1, run_id=run_id, tracking_uri=store["uri"])
    for step in (1, 2):
        logger.step(model, step)
    logger.wait()
    partial = read_manifest(run_id, store["uri"])
    assert partial["complete"] is False and len(partial["entries"]) == 4
    names = [a.path for a in client.list_artifacts(run_id, "checkpoints/manifest.d")]
    one, two = (f"checkpoints/manifest.d/step0000000{n}-raw+ema.json" for n in (1, 2))
    assert names in ([one, two], [one])  # step 2 may have queued behind step 1's upload: one fragment
    window = fetch_window(run_id, window=2, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.complete is False and window.steps == (1, 2)
    logger.close()
    done = read_manifest(run_id, store["uri"])
    assert done["complete"] is True and done["entries"] == partial["entries"]


def test_the_spool_bound_makes_the_loop_wait_for_the_uploads(store):
    """``max_spool_bytes=0``: a new snapshot starts only once every earlier one is uploaded."""
    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("spool") or client.get_experiment(client.create_experiment("spool"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    with CheckpointLogger(spec, every=1, run_id=run_id, tracking_uri=store["uri"], max_spool_bytes=0) as ckpt:
        for step in (1, 2, 3):
            ckpt.step(spec.build(), step)
        assert [e["step"] for e in ckpt.entries] == [1, 1, 2, 2]  # step 3's pair is still on its way
    assert [e["step"] for e in read_manifest(run_id, store["uri"])["entries"]] == [1, 1, 2, 2, 3, 3]


def test_the_loops_own_ema_is_logged_as_it_is_and_none_is_kept(store):
    """ema=: a loop that keeps its EMA (here torch's AveragedModel) logs that one, with no per-step work."""
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_experiment("own-ema")
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    model = spec.build()
    avg = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {}
    with mlflow.start_run() as run:
        with CheckpointLogger(spec, every=2, ema=avg.module, ema_decay=0.9, ema_warmup=False) as ckpt:
            for step in range(1, 5):
                model(torch.randn(8, 3)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                avg.update_parameters(model)
                ckpt.step(model, step)
                if step % 2 == 0:
                    expected[step] = {k: v.clone() for k, v in avg.module.state_dict().items()}
            assert ckpt._ema is None
    window = fetch_window(run.info.run_id, window=2, tracking_uri=store["uri"], cache_dir=store["cache"])
    logged = {e.step: e.load() for e in window.entries if e.kind == "ema"}
    assert set(logged) == {2, 4}
    for step, state in expected.items():
        assert all(torch.equal(logged[step][k], state[k]) for k in state)
    assert not torch.equal(logged[4]["weight"], model.weight.detach())  # an average, not the raw weights
    assert read_manifest(run.info.run_id, store["uri"])["entries"][1]["ema_decay"] == 0.9


def test_an_ema_with_other_keys_or_of_another_type_is_one_error(store):
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_experiment("bad-ema")
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    model = spec.build()
    with mlflow.start_run():
        with pytest.raises(LcscError, match="ema must be a module or a callable"):
            CheckpointLogger(spec, ema=0.999)
        with pytest.raises(LcscError, match="other state-dict keys than the model"):
            with CheckpointLogger(spec, every=1, ema=lambda: {"module.weight": torch.zeros(2, 3)}) as ckpt:
                ckpt.step(model, 1)


def test_steps_queued_behind_an_upload_go_up_together_and_read_back(store, tmp_path):
    """The uploader process batches what waits in its queue: one files call and one fragment for
    them all; a reader of the partial run still sees every step."""
    import importlib.util
    import queue

    from mlflow.tracking import MlflowClient

    from lcsc_ops.checkpoints import checkpoint_filename, write_checkpoint
    from lcsc_ops.store import logger as logger_mod

    spec_ = importlib.util.spec_from_file_location("upload_worker", logger_mod.__file__.replace("logger.py",
                                                                                               "upload_worker.py"))
    worker = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(worker)
    client = MlflowClient(store["uri"])
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    run_id = client.create_run(client.create_experiment("batched")).info.run_id
    logger_mod.CheckpointUploader(client, run_id, spec)  # the spec artifact, as the logger writes it
    jobs = queue.Queue()
    for step in (10, 20, 30):
        folder = tmp_path / f"step{step:08d}"
        folder.mkdir()
        entries = []
        for kind in ("raw", "ema"):
            path = folder / checkpoint_filename(step, kind)
            write_checkpoint(path, spec.build().state_dict(), step=step, kind=kind, spec=spec)
            entries.append({"step": step, "kind": kind, "file": path.name, "sha256": sha256_file(path),
                            "bytes": path.stat().st_size})
        jobs.put(logger_mod.upload_job(step, folder, entries))
    jobs.put(None)
    batch, ended = worker._batch(jobs)
    assert [j["step"] for j in batch] == [10, 20, 30] and ended
    worker._upload(client, run_id, batch)
    fragments = client.list_artifacts(run_id, logger_mod.FRAGMENT_PATH)
    assert [f.path.rsplit("/", 1)[-1] for f in fragments] == ["step00000010-raw+ema.json"]
    assert not any(tmp_path.glob("step*")), "spool folders are removed once uploaded"
    window = fetch_window(run_id, window=3, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.steps == (10, 20, 30) and not read_manifest(run_id, store["uri"]).get("complete")


def _safetensors_parts(data: bytes) -> tuple[int, dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _odd_state() -> dict[str, torch.Tensor]:
    """Every dtype the logger's own writer handles, 0-d, empty and non-contiguous tensors."""
    return {"w": torch.randn(4, 3), "t": torch.randn(3, 4).t(), "h": torch.randn(5).half(),
            "bf": torch.randn(2, 2).bfloat16(), "d": torch.randn(3, dtype=torch.float64), "n": torch.tensor(7),
            "e": torch.zeros(0, 3), "flag": torch.tensor([True, False]), "i8": torch.tensor([1, -2], dtype=torch.int8),
            "u8": torch.tensor([1, 2], dtype=torch.uint8), "i32": torch.tensor([5], dtype=torch.int32),
            "i16": torch.tensor([5], dtype=torch.int16), "ü.b": torch.randn(3)}


@pytest.mark.parametrize("metadata", [{}, {"lcsc.step": "50", "note": 'é ü "q" \\ \n\t \u2028'}])
def test_the_layout_and_header_give_the_bytes_safetensors_writes(metadata):
    """The logger's writer (header from :class:`SafetensorsLayout`, then the tensors' bytes at its
    spans) against safetensors' own; complex tensors and shared storages have no layout."""
    from safetensors.torch import load, save

    from lcsc_ops.checkpoints import safetensors_layout

    state = _odd_state()
    layout = safetensors_layout(state)
    header = layout.header_text(metadata).encode()
    header += b" " * (-len(header) % 8)
    data = bytearray(layout.nbytes)
    for name, (begin, end) in zip(layout.names, layout.spans):
        data[begin:end] = state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ours = len(header).to_bytes(8, "little") + header + bytes(data)
    theirs = save({k: v.contiguous() for k, v in state.items()}, metadata=metadata or None)
    assert _safetensors_parts(ours) == _safetensors_parts(theirs)
    assert all(torch.equal(load(ours)[k], v) for k, v in state.items())
    assert safetensors_layout({"c": torch.randn(2, dtype=torch.complex64)}) is None
    shared = torch.randn(4)
    assert safetensors_layout({"a": shared, "b": shared[:2]}) is None


class _OddModule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        for name, value in _odd_state().items():
            self.register_buffer(name.replace(".", "_"), value)


def test_the_logger_writes_small_snapshots_as_safetensors_would(store):
    """A small pair goes through the shared-memory slots and the uploader process (background
    work: niceness 10 above the trainer's): each logged file is, part for part, what
    ``safetensors.torch.save`` writes for the state at that step."""
    from safetensors import safe_open
    from safetensors.torch import save

    from lcsc_ops.store.upload_worker import NICE

    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_experiment("odd-dtypes")
    model = _OddModule()
    spec = ModelSpec(factory="tests.test_checkpoints:_OddModule")
    expected = {}
    with mlflow.start_run() as run:
        with CheckpointLogger(spec, every=1, ema=lambda: model.state_dict()) as ckpt:
            niceness = os.getpriority(os.PRIO_PROCESS, ckpt._sender.proc.pid)
            assert niceness == min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE)
            for step in range(1, 4):
                with torch.no_grad():
                    model.lin.weight.add_(1.0)
                    model.t.mul_(2)
                expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
                ckpt.step(model, step)
    window = fetch_window(run.info.run_id, window=3, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert len(window.entries) == 6
    for entry in window.entries:
        with safe_open(str(entry.path), "pt") as f:
            metadata = f.metadata()
        theirs = save({k: v.contiguous() for k, v in expected[entry.step].items()}, metadata=metadata)
        assert _safetensors_parts(entry.path.read_bytes()) == _safetensors_parts(theirs)


@pytest.mark.parametrize("shm", ["/dev/shm", "/nonexistent"])
def test_a_new_layout_gets_new_slots_and_a_large_pair_the_writer_thread(store, monkeypatch, shm):
    """The shared-memory slots follow the state's layout (a cast makes new ones, the old file is
    gone); a pair over the slot size goes through the writer thread; every step reads back. No
    /dev/shm: the slots are a file in the spool. Written-out pairs wait in shared memory up to
    FAST_SPOOL_BYTES (here about two), the others on disk; no file is left in /dev/shm."""
    import glob

    from lcsc_ops.store import shared_memory as shm_mod

    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_experiment("layouts")
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    model = spec.build()
    monkeypatch.setattr(shm_mod, "SHM_DIR", shm)
    monkeypatch.setattr(shm_mod, "FAST_SPOOL_BYTES", 20000)
    before = set(glob.glob("/dev/shm/lcsc-*"))
    expected = {}
    with mlflow.start_run() as run:
        with CheckpointLogger(spec, every=1, ema=lambda: model.state_dict()) as ckpt:
            for step in range(1, 7):
                if step == 3:
                    model.double()  # another layout: new slots
                if step == 5:  # another layout, too large for a slot: the writer thread
                    monkeypatch.setattr(shm_mod, "SLOT_BYTES", 0)
                    model.float()
                with torch.no_grad():
                    model.weight.add_(step)
                expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
                ckpt.step(model, step)
                if step == 2:
                    first_slots = ckpt._slots.path
                    assert first_slots.startswith(shm if shm == "/dev/shm" else ckpt._spool.name)
            assert ckpt._written is not None  # the last pair went through the writer thread
    assert not os.path.exists(first_slots)
    assert set(glob.glob("/dev/shm/lcsc-*")) <= before, "no slot file or spool folder is left behind"
    window = fetch_window(run.info.run_id, window=6, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.steps == (1, 2, 3, 4, 5, 6)
    for entry in window.entries:
        state = entry.load()
        assert all(torch.equal(state[k], v) for k, v in expected[entry.step].items())
        assert state["weight"].dtype == (torch.float64 if entry.step in (3, 4) else torch.float32)


def test_a_new_logger_sweeps_what_dead_owners_left_in_shared_memory(store, monkeypatch, tmp_path):
    """Slot files and spool folders carry their logger's owner token: a logger's first slots
    remove those whose owner lock is free (trainer and uploader killed with -9), and leave a live
    owner's, entries without a lock file (older versions', pid-named) and other files."""
    from lcsc_ops.store import shared_memory as shm_mod

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(shm_mod, "SHM_DIR", str(shm))
    dead, alive = "0123456789abcdef", "fedcba9876543210"
    (shm / f"lcsc-owner-{dead}.lock").write_text("")  # nobody holds it
    (shm / f"lcsc-spool-{dead}-ab12").mkdir()
    (shm / f"lcsc-spool-{dead}-ab12" / "step00000005").mkdir()
    (shm / f"lcsc-snapshots-{dead}-cd34").write_bytes(b"x" * 64)
    live = shm_mod.ShmOwner()  # another job's logger, alive
    kept = {f"lcsc-spool-{live.token}-ef56", f"lcsc-spool-{alive}-ab12", "lcsc-spool-12345-ab12",
            "lcsc-snapshots-notatoken", "other-file"}
    for name in kept:
        (shm / name).write_text("")
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_experiment("sweep")
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    try:
        with mlflow.start_run():
            with CheckpointLogger(spec, every=1) as ckpt:
                ckpt.step(spec.build(), 1)
                ckpt.wait()
        left = {p.name for p in shm.iterdir()}
        assert left - {f"lcsc-owner-{ckpt._owner.token}.lock"} == kept | {f"lcsc-owner-{live.token}.lock"}
    finally:
        live.release(remove=True)


def test_a_fragment_that_cannot_be_written_in_shared_memory_is_written_in_the_next_spool(tmp_path):
    """The uploader writes a batch's fragment where its files waited; if that fails (a full
    /dev/shm, here a file where the folder should be), in the next spool, the disk's last; if
    none can hold it, the error is raised (the trainer reports it)."""
    from pathlib import Path

    from lcsc_ops.store import upload_worker

    logged = []

    class Recorder:  # records what would go to MLflow, with the file's content at that moment
        def log_artifact(self, run_id, path, artifact_path):
            logged.append((run_id, Path(path).name, artifact_path, json.loads(Path(path).read_text())))

    full, disk = tmp_path / "full", tmp_path / "disk"
    full.write_text("")
    disk.mkdir()
    first = {"fragment_name": "step00000005-raw+ema.json", "fragment_path": "checkpoints/manifest.d"}
    upload_worker._log_fragment(Recorder(), "r1", first, [str(full), None, str(disk)], {"entries": [1]})
    assert logged == [("r1", "step00000005-raw+ema.json", "checkpoints/manifest.d", {"entries": [1]})]
    assert list(disk.iterdir()) == []  # its folder goes once logged
    with pytest.raises(OSError):
        upload_worker._log_fragment(Recorder(), "r1", first, [str(full)], {"entries": []})


def test_a_batch_from_two_spools_uploads_each_spools_files_and_one_fragment(tmp_path):
    """Steps whose files wait in different spools (shared memory, disk) go up with one files call
    per spool, nothing copied between them, and one fragment listing every entry; the folders go."""
    from pathlib import Path

    from lcsc_ops.store import upload_worker

    calls = []

    class Recorder:
        def log_artifacts(self, run_id, folder, artifact_path):
            calls.append(("files", sorted(p.name for p in Path(folder).iterdir()), artifact_path))

        def log_artifact(self, run_id, path, artifact_path):
            calls.append(("fragment", json.loads(Path(path).read_text())["entries"], artifact_path))

    jobs = []
    for step, spool in ((5, "shm"), (10, "disk"), (15, "shm")):
        folder = tmp_path / spool / f"step{step:08d}"
        folder.mkdir(parents=True)
        (folder / f"step{step:08d}-raw.safetensors").write_bytes(b"r")
        jobs.append({"step": step, "folder": str(folder), "spool": str(tmp_path / "disk"),
                     "files_path": "checkpoints", "fragment_path": "checkpoints/manifest.d",
                     "fragment_name": f"step{step:08d}-raw+ema.json", "fragment": {"format": 1, "entries": [step]}})
    upload_worker._upload(Recorder(), "r1", jobs)
    assert calls == [("files", ["step00000005-raw.safetensors", "step00000015-raw.safetensors"], "checkpoints"),
                     ("files", ["step00000010-raw.safetensors"], "checkpoints"),
                     ("fragment", [5, 10, 15], "checkpoints/manifest.d")]
    assert [list(p.iterdir()) for p in (tmp_path / "shm", tmp_path / "disk")] == [[], []]


def test_shared_memory_is_used_only_while_half_of_it_stays_free(tmp_path):
    """The slots and the shm spool take /dev/shm (64 MB in a container by default) at most to half."""
    from lcsc_ops.store.upload_worker import leaves_half_free

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    fs = os.statvfs("/dev/shm")
    room = fs.f_bavail * fs.f_frsize - fs.f_blocks * fs.f_frsize // 2  # bytes until half full
    margin = 4 << 20  # what else may write there meanwhile
    assert room > margin, "/dev/shm is already half full here"
    assert leaves_half_free("/dev/shm", room - margin)
    assert not leaves_half_free("/dev/shm", room + margin)
    assert not leaves_half_free(str(tmp_path / "missing"), 0)


@pytest.mark.parametrize(("mib", "count"), [(0, 8), (5, 3), (8, 2)])
def test_small_pairs_get_more_slots_within_the_same_memory(tmp_path, mib, count):
    """As many slots as fit in 2 x SLOT_BYTES, from 2 to MAX_SLOTS: the loop then reads the
    uploader's answers once every few checkpoints, and the slots never take more memory."""
    from lcsc_ops.store import shared_memory as shm_mod

    numel = max(1, (mib << 20) // 8)  # two float32 tensors of `mib` MiB together
    raw = {"w": torch.zeros(numel)}
    owner = shm_mod.ShmOwner()
    slots = shm_mod.Slots(str(tmp_path), raw, {"w": torch.zeros(numel)}, owner)
    try:
        assert slots.count == count and len(slots.views) == count
        assert slots.mm.size() == count * slots.size <= 2 * shm_mod.SLOT_BYTES
        slots.copy_(count - 1, raw, {"w": torch.ones(numel)})
        assert torch.equal(slots.views[count - 1][1], torch.ones(numel))
    finally:
        slots.close()
        owner.release(remove=True)


def test_the_uploader_polls_its_input_while_jobs_come_and_waits_once_they_stop(monkeypatch):
    """A reader blocked on the pipe costs each of the loop's writes a wake-up of the uploader, so
    it polls while jobs keep coming and blocks only after a quiet spell; lines split across reads
    come out whole, and end of input ends it."""
    import select
    import threading
    import time

    from lcsc_ops.store import upload_worker

    waits = []
    real_select = select.select
    monkeypatch.setattr(upload_worker.select, "select", lambda *a: waits.append(a) or real_select(*a))
    r, w = os.pipe()

    def write() -> None:
        os.write(w, b'{"step": 1, "slot": 0}\n{"step": 2,')
        time.sleep(0.05)
        os.write(w, b' "slot": 1}\n')
        time.sleep(0.5)  # past `quiet`: the reader now waits on the pipe
        os.write(w, b'{"step": 3, "slot": 0}\n')
        os.close(w)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        lines = list(upload_worker._lines(r, quiet=0.2, tick=0.01))
    finally:
        writer.join()
        os.close(r)
    assert [json.loads(line) for line in lines] == [{"step": 1, "slot": 0}, {"step": 2, "slot": 1},
                                                    {"step": 3, "slot": 0}]
    assert waits, "after a quiet spell the reader blocks instead of polling"


def test_a_local_file_store_gets_the_spooled_files_linked_not_copied(tmp_path):
    """A file artifact store on the same disk: the uploader hard-links the spooled files into the
    run's folder (the same inode, no second write of a multi-GB pair), then drops the spool."""
    from mlflow.tracking import MlflowClient

    from lcsc_ops.store import upload_worker

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("link", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    folder = tmp_path / "spool" / "step00000005"
    folder.mkdir(parents=True)
    spooled = folder / "step00000005-raw.safetensors"
    spooled.write_bytes(b"weights")
    inode = spooled.stat().st_ino
    upload_worker._upload(client, run_id, [{"step": 5, "folder": str(folder), "spool": str(tmp_path / "spool"),
                                            "files_path": "checkpoints", "fragment_path": "checkpoints/manifest.d",
                                            "fragment_name": "step00000005-raw.json",
                                            "fragment": {"format": 1, "entries": [5]}}])
    logged = tmp_path / "artifacts" / run_id / "artifacts" / "checkpoints" / spooled.name
    assert logged.read_bytes() == b"weights" and logged.stat().st_ino == inode and not folder.exists()
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/manifest.d",
                                                                             f"checkpoints/{spooled.name}"]
    assert not list(logged.parent.glob(".*.link"))

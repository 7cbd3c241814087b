"""lcsc_ops.store.local_files: a local file store's checkpoints are copied into the cache reading them once."""
from __future__ import annotations

import pytest
import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.store import local_files
from lcsc_ops.store.sources import fetch_window
from lcsc_ops.store.tracking import client as tracking_client


def test_local_root_only_for_local_uris(tmp_path):
    assert local_files.local_root(tmp_path.as_uri()) == tmp_path
    assert local_files.local_root(str(tmp_path)) == tmp_path
    for remote in ("mlflow-artifacts:/1/abc/artifacts", "s3://bucket/x", "file://otherhost/x", "relative/x", None):
        assert local_files.local_root(remote) is None


def test_inside_root_refuses_links_and_escapes(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "a.bin").write_bytes(b"a")
    (tmp_path / "outside.bin").write_bytes(b"o")
    (tmp_path / "root" / "link.bin").symlink_to(tmp_path / "outside.bin")
    root = tmp_path / "root"
    assert local_files.inside_root(root, "a.bin") == root / "a.bin"
    assert local_files.inside_root(root, "link.bin") is None
    assert local_files.inside_root(root, "../outside.bin") is None
    assert local_files.inside_root(root, "missing.bin") is None


def _logged_run(tmp_path):
    """A run with two checkpoint steps, logged by CheckpointLogger into a sqlite + file store."""
    import mlflow

    from lcsc_ops import CheckpointLogger
    from lcsc_ops.spec import ModelSpec

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking_client(uri)
    exp = client.create_experiment("local", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    spec = ModelSpec(factory="lcsc_ops.models.synthetic:linear_stack", kwargs={"params": 5000}, dataset=None,
                     image_shape=None)
    model = spec.build()
    with CheckpointLogger(spec, every=1, start_step=1, run_id=run_id, tracking_uri=uri) as logger:
        for step in (1, 2):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * step)
            logger.step(model, step)
    mlflow.set_tracking_uri(uri)
    return uri, run_id, tmp_path / "artifacts" / run_id / "artifacts" / "checkpoints"


def test_fetch_from_a_local_store_copies_once_and_still_verifies(tmp_path, monkeypatch):
    from lcsc_ops.store.sources import lcsc

    uri, run_id, stored = _logged_run(tmp_path)
    hashed = []
    real = lcsc.sha256_file
    monkeypatch.setattr(lcsc, "sha256_file", lambda p: hashed.append(p) or real(p))
    window = fetch_window(run_id, tracking_uri=uri, cache_dir=tmp_path / "cache")
    assert hashed == []  # hashed as copied: not read a second time
    assert len(window.entries) == 4
    for e in window.entries:  # a copy (the cache is no view of the store), read from the store once
        assert e.path.read_bytes() == (stored / e.file).read_bytes()
        assert e.path.stat().st_ino != (stored / e.file).stat().st_ino
    # A store file changed after logging: the linked bytes fail their sha256 and are not cached.
    victim = stored / window.entries[0].file
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.unlink()
    victim.write_bytes(bytes(data))
    with pytest.raises(LcscError, match="sha256"):
        fetch_window(run_id, tracking_uri=uri, cache_dir=tmp_path / "cache2")
    assert victim.name not in [p.name for p in (tmp_path / "cache2").rglob("*.safetensors")]

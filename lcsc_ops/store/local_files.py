"""A local artifact store's files are already on this disk: read them there, once.

Fetching a checkpoint from MLflow's file artifact store copied it out of the run's folder,
then read the copy again for its sha256. For checkpoints of gigabytes that was most of the
cost (the size sweep, benchmarks/RESULTS.md): :func:`copy_hashing` reads the store's file
once, writing the cache's copy and hashing the same bytes. The cache stays a copy, so a
damaged cache file is fetched again from an intact store.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlparse


def local_root(artifact_uri: str | None) -> Path | None:
    """The folder a run's artifacts lie in when its artifact URI is a local path (``file:`` or a
    bare path); None for any remote store (``mlflow-artifacts:``, ``s3:``, ...)."""
    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
        return None
    root = Path(unquote(parsed.path))
    return root if root.is_absolute() else None


def copy_hashing(src: Path, dst: Path, chunk: int = 8 << 20) -> str:
    """Copy ``src`` to ``dst`` reading it once; the sha256 of the bytes copied."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as out:
        while n := f.readinto(view):
            digest.update(view[:n])
            out.write(view[:n])
    return digest.hexdigest()


def inside_root(root: Path, artifact_path: str) -> Path | None:
    """``root/artifact_path`` if it is a plain file (no symlink) inside ``root``; None otherwise."""
    path = root / artifact_path
    try:
        resolved = path.resolve(strict=True)
    except OSError:
        return None
    if path.is_symlink() or not path.is_file() or not resolved.is_relative_to(root.resolve()):
        return None
    return path

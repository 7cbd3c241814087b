"""A local artifact store's files are already on this disk: link them rather than copy them.

MLflow's file artifact store copies every logged file into the run's folder and every
downloaded one out of it. For checkpoints of gigabytes the copy is most of the cost (the
size sweep, benchmarks/RESULTS.md): a hard link costs nothing and the bytes are the same.
Where a link cannot be made (another file system, a store that is not local) callers fall
back to MLflow's own copy.
"""
from __future__ import annotations

import os
import uuid
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


def link(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` at ``dst`` (replacing what is there, atomically); False if no link can be made."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.link")
    try:
        os.link(src, tmp)
    except OSError:
        return False
    os.replace(tmp, dst)
    return True


def link_files(folder: Path, dst_dir: Path) -> bool:
    """Hard-link every plain file of ``folder`` into ``dst_dir`` (created); False, with nothing left
    half-linked that matters (a later copy replaces it), as soon as one link cannot be made."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False):
            return False
        if not link(Path(entry.path), dst_dir / entry.name):
            return False
    return True


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

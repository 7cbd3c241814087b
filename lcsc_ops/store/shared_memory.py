"""The checkpoint logger's shared memory: slots for small snapshot pairs, and who owns what.

A small pair is copied into a shared-memory slot (:class:`Slots`) that the uploader process
writes out, into a spool folder in shared memory while there is room. A job killed with -9
leaves these in ``/dev/shm``; the next logger removes them (:func:`sweep_shared_memory`), but
only what is provably abandoned. Jobs on one node often share ``/dev/shm`` from separate pid
namespaces (containers with ``--ipc=host``), where a pid says nothing: every entry is named with
its logger's random token, and the logger and its uploader hold an ``flock`` on the token's lock
file ``lcsc-owner-<token>.lock`` while either lives. A lock that can be taken is a dead owner's.
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import secrets
import shutil
import tempfile
from typing import Any, Mapping

import torch

from lcsc_ops.checkpoints import SafetensorsLayout, checkpoint_metadata, safetensors_layout
from lcsc_ops.errors import LcscError
from lcsc_ops.runformat import CHECKPOINT_DIR, FRAGMENT_PATH
from lcsc_ops.store.upload_worker import OWNER_ENV, leaves_half_free, owner_lock_path

# A snapshot pair up to this size is copied into a shared-memory slot that the uploader process writes
# out; a larger one is written by a thread of the training process, straight from its snapshot.
SLOT_BYTES = 8 << 20
# Slots: as many as fit in 2 * SLOT_BYTES, from 2 to MAX_SLOTS; with several free, the loop reads the
# uploader's answers once every few checkpoints, not at each.
MAX_SLOTS = 8
SHM_DIR = "/dev/shm"
# Written-out small pairs wait for their upload in shared memory up to this many bytes, and while half
# of it stays free (then on disk).
FAST_SPOOL_BYTES = 64 << 20
_TOKEN = r"[0-9a-f]{16}"
_LOCK = re.compile(rf"lcsc-owner-({_TOKEN})\.lock")
_ENTRY = re.compile(rf"lcsc-(?:snapshots|spool)-({_TOKEN})-")


def _align(n: int) -> int:
    return -(-n // 8) * 8


def _layout_key(state: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((k, v.dtype, v.shape) for k, v in state.items())


def _writable(folder: str) -> bool:
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


class ShmOwner:
    """One logger's mark on what it puts in shared memory: a random ``token`` in every entry's name
    and an exclusive ``flock`` on ``lcsc-owner-<token>.lock`` in ``SHM_DIR``, held from here on by
    this process and (:meth:`env`, :meth:`pass_fds`) its uploader: the lock is free only once
    both are gone. ``held`` is False where ``SHM_DIR`` cannot take the lock file: then nothing
    of this logger goes into shared memory."""

    def __init__(self) -> None:
        self.token, self.fd, self.path = secrets.token_hex(8), None, None
        if not _writable(SHM_DIR):
            return
        # Locked under a temporary name, then renamed: a sweep never sees this lock free.
        fd, tmp = tempfile.mkstemp(prefix=f".lcsc-owner-{self.token}-", dir=SHM_DIR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            path = owner_lock_path(SHM_DIR, self.token)
            os.rename(tmp, path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        self.fd, self.path = fd, path

    @property
    def held(self) -> bool:
        return self.fd is not None

    def env(self) -> dict[str, str]:
        """The uploader's environment entry: the lock file it removes when it exits (last)."""
        return {OWNER_ENV: self.path} if self.held else {}

    def pass_fds(self) -> tuple[int, ...]:
        return (self.fd,) if self.held else ()

    def release(self, remove: bool = False) -> None:
        """Drop this process's hold (the uploader keeps its own); ``remove``: the lock file too
        (no uploader holds it: it never started)."""
        if self.fd is not None:
            if remove:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def owner_token(owner: "ShmOwner | None") -> str | None:
    return owner.token if owner is not None and owner.held else None


def sweep_shared_memory() -> list[str]:
    """Remove what dead loggers left in ``SHM_DIR`` (both trainer and uploader killed with -9):
    the slot files and spool folders of every owner whose lock file (of this user) can be locked,
    then that lock file. A live owner's lock cannot be taken, whatever pid namespace it runs in;
    entries without a lock file (older versions') are left alone."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for token in (m.group(1) for name in names if (m := _LOCK.fullmatch(name))):
        lock = owner_lock_path(SHM_DIR, token)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its owner lives
            for name in names:
                match = _ENTRY.match(name)
                if match is not None and match.group(1) == token:
                    removed += _remove(os.path.join(SHM_DIR, name))
            os.unlink(lock)  # after the entries: a sweep killed half-way leaves the lock to the next
            removed.append(lock)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _remove(path: str) -> list[str]:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return [path]
    return []


def _slot_file(size: int, folder: str, owner: ShmOwner) -> tuple[int, str]:
    """A file of ``size`` bytes for the slots, in shared memory (``SHM_DIR``, when ``owner`` holds
    its lock there) or else in the spool ``folder``, its space reserved now: a full ``/dev/shm``
    is a fallback here, not a SIGBUS later (and so is one the file would take past half full).
    Its name carries the owner's token, for :func:`sweep_shared_memory`."""
    for where in ((SHM_DIR,) if owner.held else ()) + (folder,):
        if not _writable(where):
            continue
        if where == SHM_DIR and not leaves_half_free(where, size):  # a container's small /dev/shm
            continue
        fd, path = tempfile.mkstemp(prefix=f"lcsc-snapshots-{owner.token}-", dir=where)
        try:
            os.posix_fallocate(fd, 0, size)
            return fd, path
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            if where == folder:
                raise LcscError(f"no room for a checkpoint snapshot ({size} bytes) in {folder}: {exc}") from None
    raise LcscError(f"the checkpoint spool {folder} is not writable")


class Slots:
    """Shared-memory slots (2 to ``MAX_SLOTS``) for small snapshot pairs of one layout: the loop
    copies a pair into a free slot (one fused copy, a few microseconds) and the uploader process
    writes the files out of it, so serialising, hashing and writing stay off the training process."""

    def __init__(self, folder: str, raw: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor],
                 owner: "ShmOwner") -> None:
        self.key, self.owner = (_layout_key(raw), _layout_key(ema)), owner
        self.raw, self.ema = safetensors_layout(raw), safetensors_layout(ema)
        self.ema_at = _align(self.raw.nbytes)
        self.size = max(8, _align(self.ema_at + self.ema.nbytes))
        self.count = max(2, min(MAX_SLOTS, 2 * SLOT_BYTES // self.size))
        fd, self.path = _slot_file(self.count * self.size, folder, owner)  # the uploader unlinks it once mapped
        try:
            self.mm = mmap.mmap(fd, self.count * self.size)
        finally:
            os.close(fd)
        buf = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.views = [self._views(buf, k * self.size, raw, self.raw) + self._views(buf, k * self.size + self.ema_at,
                                                                                 ema, self.ema) for k in range(self.count)]

    @staticmethod
    def _views(buf: torch.Tensor, base: int, state: Mapping[str, torch.Tensor],
               layout: SafetensorsLayout) -> list[torch.Tensor]:
        return [buf[base + b:base + e].view(state[n].dtype).view(state[n].shape)
                for n, (b, e) in zip(layout.names, layout.spans)]

    @staticmethod
    def fits(raw: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor]) -> bool:
        size = sum(v.numel() * v.element_size() for state in (raw, ema) for v in state.values())
        return size <= SLOT_BYTES and safetensors_layout(raw) is not None and safetensors_layout(ema) is not None

    def copy_(self, slot: int, raw: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor]) -> None:
        torch._foreach_copy_(self.views[slot], [raw[n] for n in self.raw.names] + [ema[n] for n in self.ema.names])

    def describe(self, spool: str, spec_json: str, extras: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """What the uploader needs once, to write out a pair and list it from ``{"step", "slot"}``:
        each file's header around the step and where its data sits in a slot (names, entries and the
        fragment are :mod:`lcsc_ops.runformat`'s, which the uploader reads too)."""
        files = []
        for kind, layout, at in (("raw", self.raw, 0), ("ema", self.ema, self.ema_at)):
            metadata = checkpoint_metadata(0, kind, spec_json, extras[kind]["metadata"])
            files.append({"kind": kind, "header": layout.header_around(metadata, "lcsc.step"), "begin": at,
                          "end": at + layout.nbytes, "entry": extras[kind]["entry"]})
        fast = SHM_DIR if self.owner.held and _writable(SHM_DIR) else None
        return {"slots": self.path, "size": self.size, "spool": spool, "files": files, "fast_spool": fast,
                "fast_spool_bytes": FAST_SPOOL_BYTES, "owner": owner_token(self.owner),
                "files_path": CHECKPOINT_DIR, "fragment_path": FRAGMENT_PATH}

    @property
    def bytes_per_pair(self) -> int:
        return self.raw.nbytes + self.ema.nbytes + 2 * 4096  # data and, at most, headers

    def close(self) -> None:
        self.views = []
        try:
            self.mm.close()
        except BufferError:  # a view still alive: the mapping goes with it
            pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

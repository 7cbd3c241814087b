"""The interface every checkpoint source implements, and what readers share: the run as a reader
sees it (:class:`RunContext`), the entries a listing gives (:class:`SourceEntry`), the user's
options for a run that records no model spec (:class:`SourceOptions`), the cache folder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, ClassVar, Mapping, Sequence

from lcsc_ops.checkpoints import KINDS, CheckpointEntry, checkpoint_filename, validate_run_id
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec, brief_repr
from lcsc_ops.store import local_files, tracking

Log = Callable[[str], None]


@dataclass(frozen=True)
class SourceOptions:
    """What the user says about a run another tool logged (the options ``lcsc-ops import`` takes):
    the model ``spec`` (built from --factory, --factory-kwargs, ...; None: the run must record one),
    ``key_prefix`` (None: detected), ``allow_pickle`` (files needing full unpickling), ``layout``
    (None: detected) and where progress lines go."""

    spec: ModelSpec | None = None
    key_prefix: str | None = None
    allow_pickle: bool = False
    layout: str | None = None
    log: Log = field(default=lambda msg: None, compare=False, repr=False)


@dataclass(frozen=True)
class SourceEntry:
    """One checkpoint a source lists: its ``step`` and ``kind`` (raw/ema), ``path`` in the run (an
    artifact path; a LoggedModel's as ``<model id>/<path>``), its size in ``bytes`` and ``sha256``
    when the source records them, and reader-private ``extra`` (e.g. which state inside a file)."""

    step: int
    kind: str
    path: str
    bytes: int | None = None
    sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.step, int) and not isinstance(self.step, bool) and self.step >= 0):
            raise LcscError(f"{self.path}: step must be a non-negative integer, got {brief_repr(self.step)}")
        if self.kind not in KINDS:
            raise LcscError(f"{self.path}: kind must be one of {', '.join(KINDS)}, got {brief_repr(self.kind)}")

    @property
    def file(self) -> str:
        """Its name in the cache (and in merges' lineage): ``step<N>-<kind>.safetensors``."""
        return checkpoint_filename(self.step, self.kind)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "file": self.file, "path": self.path, "bytes": self.bytes,
                "sha256": self.sha256}


@dataclass(frozen=True)
class Listing:
    """What a reader found in a run: its ``layout`` (the reader's name), the entries by step and
    kind, whether the run finished logging, and the model spec the run records (None: it records
    none, the user's options give it)."""

    layout: str
    entries: tuple[SourceEntry, ...]
    complete: bool = True
    spec: ModelSpec | None = None

    def sorted(self) -> "Listing":
        order = sorted(self.entries, key=lambda e: (e.step, KINDS.index(e.kind)))
        return dataclasses.replace(self, entries=tuple(order))


class RunContext:
    """One MLflow run as a reader sees it: id, entity, tags, artifact listings (cached) and downloads,
    and the user's :class:`SourceOptions`."""

    def __init__(self, run_id: str, tracking_uri: str | None, options: SourceOptions | None = None,
                 run: Any = None) -> None:
        self.run_id = validate_run_id(run_id)
        self.tracking_uri = tracking_uri
        self.options = options or SourceOptions()
        self.run = run if run is not None else tracking.get_run_or_fail(run_id, tracking_uri)
        self.client = tracking.client(tracking_uri)
        self._listed: dict[str, list[Any]] = {}
        # The run's MLflow 3 LoggedModels a reader listed (model id -> artifact location): their files are
        # entries too, as ``<model id>/<path in the model>``, downloaded by :meth:`download` like the run's.
        self.models: dict[str, str] = {}
        # sha256 of files :meth:`download` hashed as it copied them (local path -> hex digest).
        self.digests: dict[str, str] = {}

    @property
    def tags(self) -> Mapping[str, str]:
        return self.run.data.tags

    def log(self, message: str) -> None:
        self.options.log(message)

    def ls(self, path: str = "") -> list[Any]:
        """The run's artifacts directly under ``path`` (MLflow ``FileInfo``: ``path``, ``is_dir``, ``file_size``)."""
        if path not in self._listed:
            self._listed[path] = list(self.client.list_artifacts(self.run_id, path or None))
        return self._listed[path]

    def walk(self, path: str = "", depth: int = 4) -> list[Any]:
        """Every file under ``path``, at most ``depth`` folders down."""
        found = []
        for info in self.ls(path):
            if info.is_dir:
                if depth > 0:
                    found += self.walk(info.path, depth - 1)
            else:
                found.append(info)
        return found

    def download(self, path: str, dst: str) -> Path:
        """One artifact file of the run into ``dst``, or ``<model id>/<path>`` of one of its LoggedModels in
        ``models`` (LcscError if it is missing or not a plain file there)."""
        check_artifact_path(path, self.run_id)
        model_id, _, inner = path.partition("/")
        if model_id in self.models and inner:
            got = tracking.download_from(self.models[model_id], inner, dst)
        else:
            got = self._local_copy(path, dst) or tracking.download_artifact(self.run_id, path, dst,
                                                                             self.tracking_uri)
        if got is None:
            raise LcscError(f"run {self.run_id}: checkpoint {path} is listed but missing")
        local = Path(got)
        if not (local.is_file() and not local.is_symlink() and local.resolve().is_relative_to(Path(dst).resolve())):
            raise LcscError(f"run {self.run_id}: checkpoint {path} is not a file in the run's artifacts")
        return local


    def _local_copy(self, path: str, dst: str) -> str | None:
        """A local file store: the run's artifact copied into ``dst`` reading it once, its sha256 kept in
        ``digests`` for the caller's check (no second read of a multi-GB file); None for other stores."""
        root = local_files.local_root(self.run.info.artifact_uri)
        src = None if root is None else local_files.inside_root(root, path)
        if src is None:
            return None
        target = Path(dst) / PurePosixPath(path).name
        self.digests[str(target)] = local_files.copy_hashing(src, target)
        return str(target)


def check_artifact_path(path: Any, run_id: str) -> str:
    """``path`` if it is a relative artifact path without ``..`` (names from a run are untrusted)."""
    parts = PurePosixPath(path).parts if isinstance(path, str) else ()
    if not parts or path.startswith("/") or "\\" in path or any(p in ("..", ".") for p in parts):
        raise LcscError(f"run {run_id}: refusing the artifact path {brief_repr(path)} (absolute, or with '..')")
    return path


def inside(path: Path, root: Path, run_id: str, what: str) -> Path:
    """``path`` if it lies inside ``root`` once resolved (symlinks followed); LcscError otherwise."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise LcscError(f"run {run_id}: {what} would lie outside the cache folder {root}")
    return path


def cache_folder(cache_dir: Path, run_id: str, layout: str) -> Path:
    """The run's folder in the checkpoint cache (``checkpoints/<run id>``; a foreign layout's
    converted files in ``checkpoints/<run id>/<layout>``), created."""
    root = cache_dir / "checkpoints" / validate_run_id(run_id)
    if layout != "lcsc":
        root = root / layout
    inside(root, cache_dir, run_id, "its checkpoint folder")
    root.mkdir(parents=True, exist_ok=True)
    return root


class RunReader:
    """One checkpoint source: a layout of checkpoints inside an MLflow run.

    ``name`` is the layout's name (the registry's key, shown by ``lcsc-ops checkpoints``);
    ``priority`` orders detection (lower first: a specific layout before a generic one).
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 50
    description: ClassVar[str] = ""

    def detect(self, ctx: RunContext) -> bool:
        """Whether the run holds this layout (cheap: an artifact listing, no download)."""
        raise NotImplementedError

    def list_entries(self, ctx: RunContext) -> Listing:
        """Every checkpoint of the run by step and kind; LcscError (one line) if it holds none usable."""
        raise NotImplementedError

    def fetch(self, ctx: RunContext, entries: Sequence[SourceEntry], root: Path, spec: ModelSpec
              ) -> list[CheckpointEntry]:
        """Download the weight files of ``entries`` (only those) into the cache folder ``root``, verify
        them, convert to safetensors there when needed; the verified local entries, in order."""
        raise NotImplementedError

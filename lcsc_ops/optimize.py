"""``lcsc-ops optimize``: baselines, the coefficient search, the final evaluation, registration.

The protocol (LCSC paper, Sec. 4; our noise discipline): every candidate is scored by the
same evaluator on the same fixed noise (search seeds); the strongest baseline is found
first and becomes the centre of the search space; the best candidates and every baseline
are then re-evaluated on fresh seeds never used in the search, paired across methods.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.score_cache import ScoreCache, runtime_identity, score_key
from lcsc_ops.math.merge import merge_state_dicts
from lcsc_ops.math.profiles import ema_decay_grid, ema_profile, one_hot, quantise, uniform
from lcsc_ops.math.streaming import StreamingMerger, make_merger, stack_nbytes
from lcsc_ops.tracking.checkpoints import CheckpointWindow

FINAL_SEED_BASE = 10_000  # final seeds never overlap the search seeds (0, 1, ...)
BASIS_KINDS = {"raw": ("raw",), "ema": ("ema",), "both": ("raw", "ema")}


@dataclass(frozen=True)
class Precision:
    """How search evaluations compute (``--search-precision``); the final evaluation is always ``fp32``.

    ``stack_dtype``: the merge stack's dtype (bf16: the deviation stack of ``StackedMerger``,
    so the bound model's weights are bf16); ``autocast``: the dtype sampling and features
    run in under ``torch.autocast``; ``tf32``: TF32 matmuls and convolutions on CUDA (no
    effect on the CPU).
    """

    stack_dtype: torch.dtype
    autocast: torch.dtype | None = None
    tf32: bool = False


PRECISIONS = {"fp32": Precision(torch.float32), "tf32": Precision(torch.float32, tf32=True),
              "bf16": Precision(torch.bfloat16, autocast=torch.bfloat16)}


@contextlib.contextmanager
def precision_context(name: str, device: str | torch.device) -> Iterator[None]:
    """Run the enclosed evaluations at precision ``name``, restoring torch's TF32 flags after.

    ``fp32`` switches TF32 off for the duration (PyTorch allows it for cuDNN convolutions by
    default), so a full-precision evaluation is full precision on CUDA too.
    """
    p = PRECISIONS[name]
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = p.tf32
    try:
        with torch.autocast(torch.device(device).type, dtype=p.autocast or torch.bfloat16,
                            enabled=p.autocast is not None):
            yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@dataclass(frozen=True)
class OptimizeConfig:
    """The whole optimization, logged as the parent run's params."""

    run_id: str
    window: int = 16
    end_step: int | None = None
    basis: str = "both"
    strategy: str = "cmaes"
    n_trials: int = 100
    radius: float = 0.3
    blocks: int | None = None
    search_samples: int = 1000
    search_seeds: int = 1
    final_samples: int = 2000
    final_seeds: int = 5
    top_k: int = 3
    ema_grid: int = 12
    nfe: int | None = None
    seed: int = 0
    model_name: str | None = None
    evaluator: str | None = None
    feature_extractor: str | None = None
    inception_weights: str | None = None
    device: str = "cpu"
    batch_size: int = 500
    max_stack_memory: float | None = None  # GiB; a bigger window is merged by streaming from the files
    storage: str | None = None
    tracking_uri: str | None = None
    register: bool = True
    # Early stopping (--prune): score each trial at these fractions of search_samples, then at
    # all of them, and stop one that is hopeless at an earlier count. Not in the study key: a
    # complete trial's value is the same with or without it, so a study resumes either way.
    prune: bool = False
    prune_rungs: tuple[float, ...] = (0.25, 0.5)
    # Search evaluations in reduced precision (PRECISIONS); the final evaluation and the
    # registered model stay full precision. In the study key unless fp32 (trial values change).
    search_precision: str = "fp32"
    # Look evaluations up in (and add them to) the score cache beside the checkpoint cache.
    score_cache: bool = True

    def study_key(self) -> dict[str, Any]:
        """The settings that define a study; the same key resumes the same study."""
        keep = ("run_id", "window", "end_step", "basis", "strategy", "radius", "blocks", "search_samples", "search_seeds",
                "nfe", "seed", "evaluator", "feature_extractor")
        key = {k: getattr(self, k) for k in keep}
        if self.search_precision != "fp32":  # absent for fp32, so studies made before the option still resume
            key["search_precision"] = self.search_precision
        return key

    def validate(self) -> None:
        if self.basis not in BASIS_KINDS:
            raise LcscError(f"unknown basis {self.basis!r} (use raw, ema or both)")
        for name in ("window", "n_trials", "search_samples", "search_seeds", "final_samples", "final_seeds",
                     "top_k", "ema_grid", "batch_size"):
            if getattr(self, name) < 1:
                raise LcscError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.radius <= 0:
            raise LcscError(f"radius must be > 0, got {self.radius}")
        if self.max_stack_memory is not None and not self.max_stack_memory > 0:
            raise LcscError(f"max-stack-memory must be > 0 GiB, got {self.max_stack_memory}")
        if self.search_precision not in PRECISIONS:
            raise LcscError(f"unknown search precision {self.search_precision!r} (use {', '.join(PRECISIONS)})")
        if self.prune:
            if self.evaluator:
                raise LcscError("--prune needs the built-in FID: a custom evaluator scores all its samples at once")
            if not self.prune_rungs or not all(0 < f < 1 for f in self.prune_rungs):
                raise LcscError(f"prune rungs must be fractions strictly between 0 and 1, got {list(self.prune_rungs)}")


@dataclass
class Candidate:
    """A merge: coefficients over some entries of the window (indices into ``window.entries``)."""

    name: str
    indices: tuple[int, ...]
    coeffs: tuple[float, ...]
    kind: str  # "baseline" or "lcsc"
    search_fid: float | None = None
    note: str = ""
    final: list[float] = field(default_factory=list)
    second: list[float] = field(default_factory=list)
    final_default_nfe: list[float] = field(default_factory=list)  # baselines at the spec's NFE (with --nfe)

    def dense(self, size: int) -> list[float]:
        out = [0.0] * size
        for i, c in zip(self.indices, self.coeffs):
            out[i] = c
        return out

    @property
    def final_mean(self) -> float:
        return statistics.fmean(self.final) if self.final else math.nan

    @property
    def final_std(self) -> float:
        return statistics.stdev(self.final) if len(self.final) > 1 else 0.0

    @property
    def second_mean(self) -> float | None:
        return statistics.fmean(self.second) if self.second else None


def baselines(window: CheckpointWindow, ema_grid: int, score: Callable[[Candidate], float]) -> list[Candidate]:
    """Last checkpoint, uniform average, EMA* and training EMA, each with its search score.

    EMA* is the best post-hoc EMA recomputed over the saved raw checkpoints on a grid of
    rates (the paper's EMA* baseline), chosen by the same search protocol as every trial.
    """
    raw = tuple(window.indices("raw")) or tuple(window.indices())
    k = len(raw)
    out = [Candidate("last", raw, tuple(one_hot(k, k - 1)), "baseline"),
           Candidate("uniform", raw, tuple(uniform(k)), "baseline")]
    grid = [Candidate(f"ema@{g:.6g}", raw, tuple(ema_profile(k, g)), "baseline") for g in ema_decay_grid(k, ema_grid)]
    for c in grid:
        c.search_fid = score(c)
    best = min(grid, key=lambda c: c.search_fid)
    out.append(dataclasses.replace(best, name="ema_star", note=best.name.replace("ema@", "decay ")))
    if window.training_ema is not None:
        out.append(Candidate("training_ema", (window.entries.index(window.training_ema),), (1.0,), "baseline"))
    for c in out:
        if c.search_fid is None:
            c.search_fid = score(c)
    return out


def centre_in_basis(cands: Sequence[Candidate], basis: Sequence[int]) -> Candidate:
    """The strongest baseline (lowest search FID) that the basis can express exactly."""
    allowed = set(basis)
    expressible = [c for c in cands if set(c.indices) <= allowed]
    if not expressible:
        raise LcscError("no baseline can be expressed in this basis")
    return min(expressible, key=lambda c: c.search_fid)


def restrict(c: Candidate, basis: Sequence[int]) -> list[float]:
    pos = {i: j for j, i in enumerate(basis)}
    out = [0.0] * len(basis)
    for i, a in zip(c.indices, c.coeffs):
        out[pos[i]] = a
    return quantise(out)


def average_coefficients(vectors: Sequence[Sequence[float]]) -> list[float]:
    """Mean of several coefficient vectors (still sums to 1): shrinks the winner's curse."""
    n = len(vectors)
    return quantise([sum(col) / n for col in zip(*vectors)])


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the paired differences a_i - b_i (same seed i)."""
    d = [x - y for x, y in zip(a, b)]
    if not d:
        return math.nan, math.nan
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return statistics.fmean(d), se


def merged_state(window: CheckpointWindow, cand: Candidate) -> dict[str, torch.Tensor]:
    """The candidate's merged weights, recomputed in float64 from the verified files (streamed)."""
    entries = [window.entries[i] for i in cand.indices]
    return merge_state_dicts((e.load() for e in entries), cand.coeffs)


class Scorer:
    """Scores coefficient vectors over the whole window with one merge per call.

    The window is stacked once (one pass over the stack per merge) unless the stack would
    exceed ``max_stack_memory`` GiB; then each merge streams from the memory-mapped
    checkpoint files, with a peak of about two model copies (``mode`` says which).

    ``precision`` (a key of ``PRECISIONS``) sets the stack's dtype and the context every
    evaluation runs in (:meth:`evaluating`). :meth:`full_precision` switches to ``fp32``
    for the final evaluation, rebuilding the merger and the model if the stack was 16-bit.
    A streaming merger always accumulates in float32 (16-bit partial sums would round).
    """

    def __init__(self, window: CheckpointWindow, model_factory: Callable[[], torch.nn.Module], device: str,
                 max_stack_memory: float | None = None, precision: str = "fp32", *,
                 cache: ScoreCache | None = None, model_identity: str = "") -> None:
        if precision not in PRECISIONS:
            raise LcscError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
        self._entries, self._factory, self.device = window.entries, model_factory, device
        self._limit = None if max_stack_memory is None else int(max_stack_memory * 2**30)
        self.precision = precision
        # Scores of evaluators that carry an ``identity`` (the built-in FID) are looked up in
        # ``cache`` first: the key names the files, the coefficients, the merge, the model spec
        # (``model_identity``), the evaluator, the sample count, the seed and the runtime.
        self.cache = cache
        # The parts of a score's cache key that are fixed for this scorer, hashed once (not per trial).
        self._key_base = score_key(files=[e.sha256 for e in window.entries], model=model_identity,
                                   runtime=runtime_identity(device)) if cache is not None else None
        self._build()

    def _build(self) -> None:
        dtype = PRECISIONS[self.precision].stack_dtype
        if self._limit is not None and stack_nbytes(self._entries, dtype) > self._limit:
            dtype = torch.float32  # it will stream
        self.merger = make_merger(self._entries, device=self.device, dtype=dtype, max_stack_bytes=self._limit)
        self.mode = "streaming" if isinstance(self.merger, StreamingMerger) else "stacked"
        self.model = self.merger.bind(self._factory().to(self.device).eval())

    def full_precision(self) -> None:
        """Evaluate in ``fp32`` from now on (the final evaluation); a 16-bit stack is rebuilt in float32."""
        if self.precision == "fp32":
            return
        self.precision = "fp32"
        if self.merger.dtype != torch.float32:
            self.merger = self.model = None  # free the 16-bit stack before building the float32 one
            self._build()

    def evaluating(self) -> contextlib.AbstractContextManager:
        """The context evaluations run in at the current precision (autocast, TF32 flags)."""
        return precision_context(self.precision, self.device)

    def lazily(self, scores: Iterator[float]) -> Iterator[float]:
        """``scores`` (a lazy iterator that evaluates, e.g. FID rungs) with each step run in :meth:`evaluating`."""
        scores = iter(scores)
        try:
            while True:
                with self.evaluating():
                    try:
                        value = next(scores)
                    except StopIteration:
                        return
                yield value
        finally:  # a consumer that stops early (a pruned trial) closes the inner iterator too
            close = getattr(scores, "close", None)
            if close is not None:
                close()

    def _key(self, coeffs: Sequence[float], evaluator: Any, num_samples: int, seed: int) -> str | None:
        identity = getattr(evaluator, "identity", None)
        if self.cache is None or not self.cache.enabled or identity is None:
            return None
        return score_key(base=self._key_base, coefficients=[float(c) for c in coeffs],
                         merge=[self.mode, str(self.merger.dtype)], precision=self.precision,
                         evaluator=identity, num_samples=int(num_samples), seed=int(seed))

    def _cached(self, keys: Sequence[str | None]) -> list[float | None]:
        return [None if k is None else self.cache.get(k) for k in keys]

    def _store(self, keys: Sequence[str | None], values: Sequence[float]) -> None:
        if self.cache is not None:
            self.cache.put_many((k, v) for k, v in zip(keys, values) if k is not None)

    def per_seed(self, coeffs: Sequence[float], evaluator: Callable, num_samples: int,
                 seeds: Sequence[int]) -> list[float]:
        keys = [self._key(coeffs, evaluator, num_samples, s) for s in seeds]
        known = self._cached(keys)
        if all(v is not None for v in known):
            return [float(v) for v in known]
        self.merger.merge(coeffs)
        with self.evaluating():
            out = [float(v) if v is not None else float(evaluator(self.model, num_samples, s))
                   for s, v in zip(seeds, known)]
        self._store([k for k, v in zip(keys, known) if v is None], [o for o, v in zip(out, known) if v is None])
        return out

    def per_seed_pair(self, coeffs: Sequence[float], first: Any, second: Any, num_samples: int,
                      seeds: Sequence[int]) -> tuple[list[float], list[float]]:
        """Scores under two FID scorers from ONE set of samples per seed (the final evaluation)."""
        keys_a = [self._key(coeffs, first, num_samples, s) for s in seeds]
        keys_b = [self._key(coeffs, second, num_samples, s) for s in seeds]
        known_a, known_b = self._cached(keys_a), self._cached(keys_b)
        a, b = list(known_a), list(known_b)
        missing = [i for i in range(len(seeds)) if a[i] is None or b[i] is None]
        if missing:
            self.merger.merge(coeffs)
            with self.evaluating():
                for i in missing:
                    images = first.sample(self.model, num_samples, seeds[i])
                    a[i] = first.score_images(images)
                    b[i] = second.score_images(images)
            self._store([keys_a[i] for i in missing], [a[i] for i in missing])
            self._store([keys_b[i] for i in missing], [b[i] for i in missing])
        return [float(v) for v in a], [float(v) for v in b]

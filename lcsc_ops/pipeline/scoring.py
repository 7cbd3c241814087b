"""Scoring coefficient vectors: one merge per call, the evaluator, the score cache."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from lcsc_ops.checkpoints import CheckpointWindow
from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.precision import PRECISIONS, precision_context
from lcsc_ops.evaluation.score_cache import ScoreCache, code_identity, runtime_identity, score_key
from lcsc_ops.math.streaming import StreamingMerger, make_merger, stack_nbytes


def free_memory(device: str) -> int | None:
    """Bytes free on ``device`` now: CUDA's free memory, or the host's ``MemAvailable`` (None if unknown)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


# Without --max-stack-memory, the stack may take this share of the free memory: the rest is for the
# model, sampling and features, and whatever else runs on the machine.
AUTO_STACK_FRACTION = 0.5


def auto_stack_limit(device: str) -> int | None:
    """The stack's byte limit when the user gives none: half the free memory (None: unknown, no limit)."""
    free = free_memory(device)
    return None if free is None else int(AUTO_STACK_FRACTION * free)


def describe_choice(mode: str, dtype: torch.dtype, need: int, limit: int | None, given: bool) -> str:
    """One log line: which merger, in which dtype, and the limit it was held against."""
    gib = 2 ** 30
    what = "--max-stack-memory" if given else f"half the free memory, {2 * limit / gib:.1f} GiB free" \
        if limit is not None else "free memory unknown, no limit"
    name = str(dtype).replace("torch.", "")
    if mode == "stacked":
        return f"merge: stacked {name}, {need / gib:.2f} GiB (limit {'none' if limit is None else f'{limit / gib:.1f} GiB'}: {what})"
    return (f"merge: streaming from the checkpoint files (a {name} stack would take {need / gib:.2f} GiB, over "
            f"{limit / gib:.1f} GiB: {what})")


class Scorer:
    """Scores coefficient vectors over the whole window with one merge per call.

    The window is stacked once (one pass over the stack per merge) unless the stack would
    exceed ``max_stack_memory`` GiB; then each merge reads the checkpoint files slice by
    slice (:class:`~lcsc_ops.math.streaming.StreamingMerger`), with a peak of about one model
    copy (``mode`` says which). Without ``max_stack_memory`` the limit is half the device's free
    memory now (:func:`free_memory`);
    ``choice`` says what was chosen and why, for the log.

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
        self._given = max_stack_memory is not None
        self._limit = int(max_stack_memory * 2**30) if self._given else auto_stack_limit(device)
        self.choice = ""
        self.precision = precision
        # Scores of evaluators that carry an ``identity`` (the built-in FID; a user's evaluator:
        # its import path, version and source hash, see UserEvaluator) are looked up in
        # ``cache`` first: the key names the files, the coefficients, the merge, the model spec
        # (``model_identity``), the evaluator, the sample count, the seed, the runtime and the
        # scoring code (``code_identity``). ``cache=None`` computes every score.
        self.cache = cache
        # The parts of a score's cache key that are fixed for this scorer, hashed once (not per trial).
        self._key_base = score_key(files=[e.sha256 for e in window.entries], model=model_identity,
                                   runtime=runtime_identity(device),
                                   code=code_identity()) if cache is not None else None
        self._build()

    def _build(self) -> None:
        dtype = PRECISIONS[self.precision].stack_dtype
        need = stack_nbytes(self._entries, dtype)
        if self._limit is not None and need > self._limit:
            dtype = torch.float32  # it will stream
        self.merger = make_merger(self._entries, device=self.device, dtype=dtype, max_stack_bytes=self._limit)
        self.mode = "streaming" if isinstance(self.merger, StreamingMerger) else "stacked"
        self.choice = describe_choice(self.mode, PRECISIONS[self.precision].stack_dtype, need, self._limit,
                                      self._given)
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

    def per_seed_values(self, coeffs: Sequence[float], fn: Callable[[torch.nn.Module, int, int], Any],
                        num_samples: int, seeds: Sequence[int]) -> list[Any]:
        """``fn(model, num_samples, seed)`` per seed for the merge of ``coeffs``, not cached: a value
        that is not a score (a conditional model's per-class accuracy)."""
        self.merger.merge(coeffs)
        with self.evaluating():
            return [fn(self.model, num_samples, s) for s in seeds]

    def per_seed_pair(self, coeffs: Sequence[float], first: Any, second: Any, num_samples: int,
                      seeds: Sequence[int]) -> tuple[list[float], list[float]]:
        """Scores under two evaluators per seed from ONE merge (the final evaluation): two FID
        scorers share one set of samples per seed; otherwise (a user's second evaluator) each is
        called on the merged model."""
        keys_a = [self._key(coeffs, first, num_samples, s) for s in seeds]
        keys_b = [self._key(coeffs, second, num_samples, s) for s in seeds]
        a, b = self._cached(keys_a), self._cached(keys_b)
        missing = [i for i in range(len(seeds)) if a[i] is None or b[i] is None]
        if missing:
            shared = all(hasattr(e, "sample") and hasattr(e, "score_images") for e in (first, second))
            self.merger.merge(coeffs)
            with self.evaluating():
                for i in missing:
                    if shared:
                        images = first.sample(self.model, num_samples, seeds[i])
                        a[i], b[i] = first.score_images(images), second.score_images(images)
                        continue
                    if a[i] is None:
                        a[i] = float(first(self.model, num_samples, seeds[i]))
                    if b[i] is None:
                        b[i] = float(second(self.model, num_samples, seeds[i]))
            self._store([keys_a[i] for i in missing], [a[i] for i in missing])
            self._store([keys_b[i] for i in missing], [b[i] for i in missing])
        return [float(v) for v in a], [float(v) for v in b]

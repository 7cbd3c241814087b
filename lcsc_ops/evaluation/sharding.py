"""FID sharded over the processes of a ``torch.distributed`` group (``accelerate launch``).

Rank 0 runs the optimization; its FID evaluators are :class:`ShardedFID` wrappers. Each
evaluation is a :class:`Command` broadcast from rank 0 (merge coefficients, sample count,
seed, sampler settings, precision, which evaluator). Every rank gets the model for those
coefficients (rank 0: the caller's merged model; the others: their own merge of the same
window), samples ITS contiguous block of rows of the fixed noise
``make_noise(num_samples, image_shape, seed)``, and feeds its images to the metric's own
``update`` (the same feature extractor, float64 sums). The fake-side sums (feature sum, sum
of outer products, count) are then summed onto rank 0, which computes the Fréchet distance
against the same reference statistics. Images and features stay where they were made:
``sample`` returns a :class:`ShardedImages` handle that ``score_images`` recognises, so a
second FID scores the same images with no extra sampling. Ranks > 0 run :func:`follow`
until rank 0 sends ``stop``.

The result is one process's FID up to float rounding (other batch boundaries in sampling and
features, another order of the float64 sums; ``tests/test_distributed.py`` measures it), so
a sharded evaluator's score-cache identity names the number of processes.

Commands and statuses travel as objects over a CPU (gloo) group with a long timeout (rank 0
may spend hours between evaluations: MLflow, other study workers); the sums travel over the
default group (NCCL between GPUs). A failure on any rank becomes one :class:`LcscError` on
rank 0 after the collective, never a hang; torchmetrics' own cross-process sync is switched
off on every metric used here (it would wait for ranks that are not computing).
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.fid import FIDScorer, make_noise, sample_in_batches
from lcsc_ops.models.sampling import Guidance
from lcsc_ops.redact import mask_credentials

STOP, READY, SAMPLE, SCORE = "stop", "ready", "sample", "score"
# How long a follower waits for rank 0's next command (between evaluations rank 0 may log to
# MLflow or wait for another worker of the study for a long time).
COMMAND_TIMEOUT = timedelta(days=7)

# (coefficients, precision) -> the model merged with them, on this rank's device.
ModelFor = Callable[[Sequence[float], str], nn.Module]


@dataclass
class Command:
    """What every rank does next; rank 0 broadcasts it."""

    op: str
    coefficients: list[float] | None = None
    num_samples: int = 0
    seed: int = 0
    precision: str = "fp32"
    sampler: dict[str, Any] | None = None  # sampler settings; None: the evaluator's own
    guidance: float | None = None  # guidance scale of a conditional model; None: the evaluator's own
    evaluator: str = "main"
    token: int = 0  # which sample a score command scores


@dataclass(frozen=True)
class ShardedImages:
    """A handle on images that lie on every rank, each its block of rows (never gathered)."""

    token: int
    num_samples: int


def shard_rows(num_samples: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block [start, stop) of ``num_samples`` rows."""
    return num_samples * rank // world, num_samples * (rank + 1) // world


def describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return mask_credentials(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _no_sync() -> bool:
    return False


def unsynced(metric: Any) -> Any:
    """Switch off torchmetrics' cross-process sync in ``compute`` (the sums are combined here)."""
    metric.distributed_available_fn = _no_sync
    return metric


class ShardGroup:
    """This process's view of the group: commands over ``commands`` (gloo), sums over the default group."""

    def __init__(self, commands: Any = None) -> None:
        self.rank, self.world, self.commands = dist.get_rank(), dist.get_world_size(), commands

    @classmethod
    def create(cls, timeout: timedelta = COMMAND_TIMEOUT) -> "ShardGroup":
        """Called by every rank, in the same order (``new_group`` is collective)."""
        return cls(dist.new_group(backend="gloo", timeout=timeout))

    def send(self, command: Command) -> None:
        dist.broadcast_object_list([command], src=0, group=self.commands)

    def receive(self) -> Command:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def exchange(self, status: Any) -> list[Any]:
        """Every rank's ``status``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, status, group=self.commands)
        return out

    def sum_to_main(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)


def sample_rows(scorer: FIDScorer, sampler: Any, model: nn.Module, noise: torch.Tensor,
                guidance: Guidance | None = None) -> torch.Tensor:
    """Images from ``noise`` rows (and ``guidance``, the same rows' labels), batch by batch, the
    model in eval mode (as :meth:`FIDScorer.sample`)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return sample_in_batches(sampler, model, noise, guidance, batch_size=scorer.batch_size,
                                     device=scorer.device)
    finally:
        model.train(was_training)


class ShardWorker:
    """What a rank does for a command: sample its rows, score them, combine the sums on rank 0.

    ``scorers`` maps an evaluator's name (``main``, ``second``) to this rank's FIDScorer.
    ``model_for`` merges on ranks > 0 (rank 0 passes the caller's model); ``context`` gives
    the precision context a rank > 0 evaluates in (rank 0 is already inside the scorer's).
    """

    def __init__(self, group: ShardGroup, scorers: dict[str, FIDScorer | None], model_for: ModelFor | None = None,
                 context: Callable[[str], ContextManager] | None = None) -> None:
        self.group, self.model_for = group, model_for
        self.scorers = {k: v for k, v in scorers.items() if v is not None}
        for s in self.scorers.values():
            unsynced(s.metric)
        self.context = context or (lambda precision: contextlib.nullcontext())
        self.images: torch.Tensor | None = None
        self.token, self.error, self._exc = 0, None, None
        self._samplers: dict[str, Any] = {}

    def sampler(self, settings: dict[str, Any] | None) -> Any:
        """The sampler for ``settings`` (None or the main evaluator's own: its sampler)."""
        main = self.scorers["main"]
        if settings is None or settings == getattr(main, "identity", {}).get("sampler"):
            return main.sampler
        key = json.dumps(settings, sort_keys=True)
        if key not in self._samplers:
            from lcsc_ops.models.diffusion import make_sampler

            self._samplers[key] = make_sampler(settings)
        return self._samplers[key]

    def run(self, command: Command, model: nn.Module | None = None) -> float | None:
        """Do ``command``; a score returns the FID on rank 0 (None elsewhere)."""
        if command.op == SAMPLE:
            self._sample(command, model)
            return None
        if command.op == SCORE:
            return self._score(command)
        raise LcscError(f"unknown sharding command {command.op!r}")

    def _sample(self, cmd: Command, model: nn.Module | None) -> None:
        self.images, self.token, self.error = None, cmd.token, None
        try:
            if model is None:
                model = self.model_for(cmd.coefficients, cmd.precision)
            start, stop = shard_rows(cmd.num_samples, self.group.rank, self.group.world)
            main = self.scorers["main"]
            noise = make_noise(cmd.num_samples, main.image_shape, cmd.seed)[start:stop]
            guidance = main.guidance(cmd.num_samples, cmd.seed, cmd.guidance)
            with self.context(cmd.precision):
                self.images = sample_rows(main, self.sampler(cmd.sampler), model, noise,
                                          None if guidance is None else guidance[start:stop])
        except Exception as exc:
            if self.group.rank == 0:
                raise  # no collective is pending: rank 0's own error, as it is
            self.error = describe(exc)  # reported at the next score, inside its collective

    def _score(self, cmd: Command) -> float | None:
        scorer = self.scorers.get(cmd.evaluator)
        status: dict[str, Any] = {"error": self.error, "finite": True, "count": 0}
        self._exc = None
        if status["error"] is None:
            try:
                with self.context(cmd.precision):
                    status.update(self._update(scorer, cmd))
            except Exception as exc:
                status["error"], self._exc = describe(exc), exc
        return self._combine(scorer, self.group.exchange(status), cmd)

    def _update(self, scorer: FIDScorer | None, cmd: Command) -> dict[str, Any]:
        """Feed this rank's images to the metric's fake side (reset first), as FIDScorer does."""
        if scorer is None:
            raise LcscError(f"no {cmd.evaluator!r} FID evaluator on this process")
        if self.images is None or self.token != cmd.token:
            raise LcscError(f"sample {cmd.token} is not held by this process")
        scorer.metric.reset()
        with torch.no_grad():
            for batch in self.images.split(scorer.batch_size):
                if not torch.isfinite(batch).all():
                    return {"finite": False}
                scorer.metric.update(batch.to(scorer.device), real=False)
        return {"count": len(self.images)}

    def _combine(self, scorer: FIDScorer | None, statuses: list[dict[str, Any]], cmd: Command) -> float | None:
        """Every rank knows every status: they agree on what follows (no collective is skipped by one)."""
        main = self.group.rank == 0
        errors = [f"process {r}: {s['error']}" for r, s in enumerate(statuses) if s["error"]]
        if errors:
            if main and self._exc is not None:
                raise self._exc
            if main:
                raise LcscError("sharded FID evaluation failed on " + "; ".join(errors))
            return None
        if not all(s["finite"] for s in statuses):
            return math.inf if main else None  # non-finite samples score inf, as unsharded
        count = sum(s["count"] for s in statuses)
        if count != cmd.num_samples:
            if main:
                raise LcscError(f"sharded FID: the processes scored {count} samples, not {cmd.num_samples}")
            return None
        metric = scorer.metric
        self.group.sum_to_main([metric.fake_features_sum, metric.fake_features_cov_sum,
                                metric.fake_features_num_samples])
        if not main:
            metric.reset()
            return None
        value = float(metric.compute())
        return math.inf if math.isnan(value) else value


class ShardedFID:
    """Rank 0's FID evaluator: the contract of :class:`FIDScorer` (``__call__``, ``sample``,
    ``score_images``, ``identity``), every evaluation sharded over the group.

    ``coefficients()`` gives the merge coefficients of the model the caller passes (None
    when unknown: an error, rather than other ranks scoring another model); ``precision()``
    the precision the caller evaluates in. ``name`` says which of the ranks' evaluators this is.
    """

    def __init__(self, inner: FIDScorer, name: str, worker: ShardWorker,
                 coefficients: Callable[[], Sequence[float] | None], precision: Callable[[], str]) -> None:
        self.inner, self.name, self.worker = inner, name, worker
        self.coefficients, self.precision = coefficients, precision
        # Not bit-identical to one process (other batch boundaries and sum order): its own cache key.
        self.identity = {**getattr(inner, "identity", {}), "processes": worker.group.world}
        self._sampler = inner.sampler
        self.guidance_scale = getattr(inner, "guidance_scale", None)

    # What code that reaches into an FIDScorer uses (FID rungs: unsharded, on rank 0 only).
    sampler = property(lambda self: self._sampler, lambda self, value: setattr(self, "_sampler", value))
    metric = property(lambda self: self.inner.metric)
    device = property(lambda self: self.inner.device)
    image_shape = property(lambda self: self.inner.image_shape)
    batch_size = property(lambda self: self.inner.batch_size)
    conditioning = property(lambda self: self.inner.conditioning)

    def guidance(self, num_samples: int, seed: int, scale: float | None = None) -> Guidance | None:
        return self.inner.guidance(num_samples, seed, self.guidance_scale if scale is None else scale)

    def sample(self, model: nn.Module, num_samples: int, seed: int) -> ShardedImages:
        """Every rank samples its rows of the fixed noise of ``seed``; returns a handle on them."""
        world = self.worker.group.world
        if num_samples < max(2, world):
            raise LcscError(f"FID over {world} processes needs at least {max(2, world)} samples, got {num_samples}")
        coeffs = self.coefficients()
        if coeffs is None:
            raise LcscError("sharded FID: the merge coefficients of this model are unknown "
                            "(evaluate through the Scorer)")
        cmd = Command(SAMPLE, [float(c) for c in coeffs], int(num_samples), int(seed), self.precision(),
                      self.identity.get("sampler"), self.guidance_scale, self.name, token=self.worker.token + 1)
        self.worker.group.send(cmd)
        self.worker.run(cmd, model)
        return ShardedImages(cmd.token, int(num_samples))

    def score_images(self, images: Any) -> float:
        """FID of a :class:`ShardedImages` handle (sharded), or of plain images (here, unsharded)."""
        if not isinstance(images, ShardedImages):
            return self.inner.score_images(images)
        cmd = Command(SCORE, num_samples=images.num_samples, precision=self.precision(), evaluator=self.name,
                      token=images.token)
        self.worker.group.send(cmd)
        return float(self.worker.run(cmd))

    def __call__(self, model: nn.Module, num_samples: int, seed: int) -> float:
        return self.score_images(self.sample(model, num_samples, seed))


def stop(group: ShardGroup) -> None:
    """Rank 0: end the followers' loops."""
    group.send(Command(STOP))


def follow(group: ShardGroup, worker: ShardWorker | None) -> None:
    """Ranks > 0: do rank 0's commands until ``stop``."""
    while True:
        cmd = group.receive()
        if cmd.op == STOP:
            return
        if worker is None:  # cannot happen: rank 0 stops a group whose preparation failed
            raise LcscError(f"command {cmd.op!r} on a process that could not prepare")
        worker.run(cmd)

"""Helpers for bench_quality: a tuned training EMA, protocol-exact scoring, checkpoint density.

Kept out of the library on purpose: these exist so the benchmark's baselines are as strong
as we can make them (several online EMA decays, each scored under the optimize protocol),
and so the density claim (post-hoc EMA over logged checkpoints ≈ online EMA) is measured.
"""
from __future__ import annotations

import contextlib
import math
import statistics
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lcsc_ops.checkpoints import CheckpointEntry, CheckpointWindow, sha256_file, write_checkpoint
from lcsc_ops.math.ema import ema_decay_at, ema_update_
from lcsc_ops.math.merge import merge_state_dicts
from lcsc_ops.math.profiles import quantise
from lcsc_ops.pipeline.candidates import FINAL_SEED_BASE, fresh_seeds
from lcsc_ops.pipeline.config import OptimizeConfig
from lcsc_ops.pipeline.scoring import Scorer
from lcsc_ops.store import logger as ckpt_mod


@contextlib.contextmanager
def extra_online_emas(decays: Sequence[float], out_dir: Path) -> Iterator[None]:
    """While training, keep online EMAs at more ``decays`` and write them to ``out_dir`` at the end.

    ``lcsc_ops.training`` looks ``lcsc_ops.store.logger.CheckpointLogger`` up when it opens the
    run (it offers no other hook for the logger), so swapping the class for a subclass here
    adds EMAs without touching the library. The subclass uses the logger's public interface
    only: after each ``step`` it updates its own EMAs with the same warm-up schedule as the
    logger's (update ``n`` uses ``ema_decay_at(d, n)``; the first step copies the weights), and
    ``close`` writes them. Files are ``ema-<decay>.safetensors`` (same metadata as logged checkpoints).
    """
    base = ckpt_mod.CheckpointLogger
    out_dir.mkdir(parents=True, exist_ok=True)

    class MultiEmaLogger(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.extra: dict[float, dict[str, torch.Tensor]] = {}
            self.extra_updates, self.last_step = 0, 0

        def step(self, model: torch.nn.Module, step: int) -> None:
            super().step(model, step)
            if self.is_main:
                self.last_step = step
                self.update_extra(unwrap(model, self.accelerator))

        @torch.no_grad()
        def update_extra(self, net: torch.nn.Module) -> None:
            state = net.state_dict()
            if not self.extra:
                self.extra = {d: {k: v.detach().clone() for k, v in state.items()} for d in decays}
                return
            self.extra_updates += 1
            for d, ema in self.extra.items():
                ema_update_(ema, state, ema_decay_at(d, self.extra_updates, self.ema_warmup))

        def close(self, *args: Any, **kwargs: Any) -> None:  # the logger's own arguments (e.g. complete=)
            if self.is_main:
                for d, ema in self.extra.items():
                    write_checkpoint(out_dir / f"ema-{d}.safetensors", ema, step=self.last_step, kind="ema",
                                     spec=self.spec, extra={"lcsc.ema_decay": repr(d)})
            super().close(*args, **kwargs)

    ckpt_mod.CheckpointLogger = MultiEmaLogger
    try:
        yield
    finally:
        ckpt_mod.CheckpointLogger = base


def unwrap(model: torch.nn.Module, accelerator: Any = None) -> torch.nn.Module:
    """The bare module the logger snapshots: unwrapped by accelerate (and DataParallel / DDP)."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def local_entry(path: Path, step: int, kind: str = "ema") -> CheckpointEntry:
    return CheckpointEntry(step=step, kind=kind, file=path.name, sha256=sha256_file(path),
                           bytes=path.stat().st_size, path=path)


class ProtocolScorer:
    """Scores fixed state dicts exactly as ``lcsc-ops optimize`` scores its candidates.

    Search: mean FID over search seeds ``0..S-1`` at ``search_samples``; final: FID and the
    second metric from one set of samples per fresh test seed ``10000 + i`` at ``final_samples``;
    selection: FID on the selection seeds after them.
    """

    def __init__(self, cfg: OptimizeConfig, spec: Any, entries: Sequence[CheckpointEntry], cache_dir: Path) -> None:
        from lcsc_ops.evaluation.evaluators import build_evaluators

        self.cfg = cfg
        self.window = CheckpointWindow(run_id=cfg.run_id, spec=spec, entries=tuple(entries), training_ema=None,
                                       steps=tuple(sorted({e.step for e in entries})))
        ev = build_evaluators(spec, evaluator=cfg.evaluator, feature_extractor=cfg.feature_extractor,
                              inception_weights=cfg.inception_weights, batch_size=cfg.batch_size, device=cfg.device,
                              cache_dir=cache_dir)
        self.first, self.second = ev.main, ev.second
        self.scorer = Scorer(self.window, spec.build, cfg.device)

    def one_hot(self, i: int) -> list[float]:
        out = [0.0] * len(self.window.entries)
        out[i] = 1.0
        return out

    def search(self, dense: Sequence[float]) -> float:
        seeds = list(range(self.cfg.search_seeds))
        return statistics.fmean(self.scorer.per_seed(dense, self.first, self.cfg.search_samples, seeds))

    def final(self, dense: Sequence[float], n_seeds: int | None = None) -> tuple[list[float], list[float]]:
        seeds = [FINAL_SEED_BASE + i for i in range(n_seeds or self.cfg.final_seeds)]
        if self.second is None:
            return self.scorer.per_seed(dense, self.first, self.cfg.final_samples, seeds), []
        return self.scorer.per_seed_pair(dense, self.first, self.second, self.cfg.final_samples, seeds)

    def selection(self, dense: Sequence[float]) -> list[float]:
        """FID on the optimize run's selection seeds (after its test seeds): what a choice is made on."""
        seeds = fresh_seeds(self.cfg.final_seeds, self.cfg.selection_seeds)["selection"]
        return self.scorer.per_seed(dense, self.first, self.cfg.final_samples, seeds)


def posthoc_ema_state(raw: Sequence[CheckpointEntry], decay_per_step: float, warmup: bool = True
                      ) -> dict[str, torch.Tensor]:
    """The online EMA's recursion replayed over saved raw checkpoints only.

    Between checkpoints at steps ``s`` and ``t`` the online EMA multiplies its old value by
    the product of its per-update decays, ``prod(ema_decay_at(d, n) for n in s..t-1)`` (update
    ``n`` happens at step ``n + 1``; with the logger's warm-up, like the online EMA); here that
    whole product weighs the previous post-hoc value and the rest goes to the checkpoint at ``t``.
    """
    steps = [e.step for e in raw]
    coeffs = [1.0]
    for prev, cur in zip(steps, steps[1:]):
        g = math.prod(ema_decay_at(decay_per_step, n, warmup) for n in range(prev, cur))
        coeffs = [c * g for c in coeffs] + [1.0 - g]
    return merge_state_dicts((e.load() for e in raw), quantise(coeffs))


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||ref - b||`` over the floating-point tensors (b is the target)."""
    num = den = 0.0
    for k, v in b.items():
        if v.is_floating_point():
            num += float((a[k].double() - v.double()).pow(2).sum())
            den += float((ref[k].double() - v.double()).pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")

"""The optimization's settings: one frozen dataclass, the single source of every default.

The ``optimize`` command's options are generated from these fields; the whole config is
logged as the parent run's params.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from lcsc_ops.errors import LcscError
from lcsc_ops.pipeline.candidates import FINAL_SEED_BASE
from lcsc_ops.evaluation.precision import PRECISIONS
from lcsc_ops.options import check_positive, option, parse_fractions, parse_image_shape, parse_json_object
from lcsc_ops.spec import check_module_prefixes, parse_module_prefixes

# A metric name becomes part of MLflow metric keys (search_<name>.<method>) and tags: no dots.
METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
BASIS_KINDS = {"raw": ("raw",), "ema": ("ema",), "both": ("raw", "ema")}
BASIS, SEARCH, EVAL, MLFLOW, TRUST, WORKERS = "Basis", "Search", "Evaluation", "MLflow", "Trust", "Workers"
SOURCE = "Runs of other tools"
SOURCE_FIELDS = ("factory", "factory_kwargs", "sampler_steps", "dataset", "image_shape", "conditioning", "key_prefix",
                 "layout")


@dataclass(frozen=True)
class OptimizeConfig:
    """The whole optimization, logged as the parent run's params."""

    run_id: str = option(help="MLflow run id of the training run.")
    window: int | None = option(None, "Use the last N checkpoint steps (default: the last 16, or all the run has "
                                      "if fewer; asking for more than the run has is an error).", panel=BASIS)
    end_step: int | None = option(None, "Window ends at or before this step (default: the last).", panel=BASIS)
    basis: str = option("both", "Merge raw checkpoints, EMA snapshots, or both.", panel=BASIS)
    strategy: str = option("evolution", "Search strategy: evolution (the best at 100 trials in make "
                                        "bench-strategies), cmaes, cmaes-sep, cmaes-margin, gp, tpe, random.",
                           panel=SEARCH)
    n_trials: int = option(100, "Total trials in the study (a resumed study runs the rest).", panel=SEARCH)
    radius: float = option(0.3, "Half-width of the search box around the strongest baseline.", panel=SEARCH)
    blocks: int | None = option(None, "Group coefficients into B blocks per kind.", panel=SEARCH)
    seed: int = option(0, "Search strategy seed.", panel=SEARCH)
    prune: bool = option(False, "Stop hopeless trials early: prune a trial worse than the median of complete "
                                "trials at the same sample count (off by default, see README).", panel=SEARCH)
    prune_rungs: tuple[float, ...] = option((0.25, 0.5), "With --prune: the earlier sample counts, as fractions "
                                            "of --search-samples.", panel=SEARCH, parse=parse_fractions)
    storage: str | None = option(None, "Optuna storage: a journal file path or a database URL (default: "
                                       "optuna.journal beside the MLflow store).", panel=SEARCH)
    workers: int = option(1, "Local worker processes sharing the study (more may join from any host with the "
                             "same --storage and tracking URI).", panel=WORKERS)
    devices: str | None = option(None, "Devices of the local workers, round-robin, e.g. cuda:0,cuda:1 "
                                       "(default: --device for all).", panel=WORKERS)
    search_samples: int = option(1000, "Samples per search evaluation.", panel=EVAL)
    search_seeds: int = option(1, "Fixed noise seeds averaged per search evaluation.", panel=EVAL)
    final_samples: int = option(2000, "Samples per final evaluation.", panel=EVAL)
    final_seeds: int = option(5, "Fresh paired test seeds: every final figure (mean ± std, the paired "
                                 "difference) comes from these only.", panel=EVAL)
    selection_seeds: int = option(2, "More fresh paired seeds, disjoint from the test seeds, on which the "
                                     "strongest baseline and the winner are chosen (never reported).", panel=EVAL)
    top_k: int = option(3, "Best trials re-evaluated (plus their average).", panel=EVAL)
    ema_grid: int = option(12, "Post-hoc EMA rates tried for the EMA* baseline.", panel=EVAL)
    nfe: int | None = option(None, "Sample with N function evaluations instead of the spec's.", panel=EVAL)
    guidance: float | None = option(None, "Class-conditional models: sample with classifier-free guidance scale W "
                                          "instead of the spec's (0: unconditional, 1: conditional); the baselines "
                                          "are also reported at the spec's scale.", panel=EVAL)
    evaluator: str | None = option(None, "Own score 'module:callable(model, num_samples, seed) -> float', "
                                         "lower is better (its package must be importable here).", panel=EVAL)
    second_evaluator: str | None = option(None, "A second metric 'module:callable(model, num_samples, seed) -> "
                                                "float', scored on the final seeds only (the table's 2nd metric "
                                                "column; default: FID under a second feature extractor for the "
                                                "built-in FID, none for --evaluator).", panel=EVAL)
    evaluator_version: str | None = option(None, "Version of your --evaluator / --second-evaluator in the score "
                                                 "cache key: bump it when its scores change for reasons outside "
                                                 "its module's source (default: the callable's __lcsc_version__).",
                                           panel=EVAL)
    metric_name: str | None = option(None, "Name of the score in MLflow metrics (search_<name>.<method>, "
                                           "final_<name>.<method>, the trials' <name>) and version tags "
                                           "(lcsc.final_<name> …) (default: fid for the built-in FID, score for "
                                           "--evaluator).", panel=EVAL)
    feature_extractor: str | None = option(None, "FID feature extractor (default by data set).", panel=EVAL)
    inception_weights: str | None = option(None, "Local Inception weights for machines without network.",
                                           panel=EVAL)
    search_precision: str = option("fp32", "Search evaluations in fp32, tf32 (CUDA) or bf16; the final evaluation "
                                           "and the registered model are always full precision.", panel=EVAL)
    score_cache: bool = option(True, "Reuse scores computed before for the same files, coefficients, model, "
                                     "evaluator, code, samples and seed (scores.sqlite beside the checkpoint "
                                     "cache).", panel=EVAL)
    device: str = option("auto", "auto, cpu, cuda, cuda:1 …")
    batch_size: int = option(500, "Sampling batch size.")
    max_stack_memory: float | None = option(None, "GiB the stacked window may take on the device; above it, "
                                                  "merges stream from the checkpoint files (default: half the "
                                                  "device's free memory when the optimization starts).")
    model_name: str | None = option(None, "Registered model name (default: the training run's tag "
                                          "lcsc.model_name, set by train --model-name or "
                                          "CheckpointLogger(model_name=...); else lcsc-model).", panel=MLFLOW)
    register: bool = option(True, "Register the winning merge.", panel=MLFLOW)
    trust_factory: tuple[str, ...] = option((), "Module prefixes whose model factories (and data-set loaders) a "
                                                "run's spec may name, "
                                                "comma-separated (e.g. my_pkg,other.nets; also from "
                                                "LCSC_OPS_TRUST_FACTORY). The package's model factories and "
                                                "diffusers model classes need none. Building a model runs its "
                                                "factory's code: list only modules of authors you trust.",
                                            panel=TRUST, parse=lambda t: parse_module_prefixes(t, ""))
    trust_remote_code: bool = option(False, "Build whatever model factory the run's spec names (runs code chosen "
                                            "by whoever can write to the tracking store).", panel=TRUST)
    allow_pickle: bool = option(False, "Fully unpickle checkpoint files that need it, e.g. a .ckpt whose "
                                       "hyper-parameters are objects (runs code from the file: only for runs you "
                                       "trust).", panel=TRUST)
    factory: str | None = option(None, "A run another tool logged (Lightning, ...) records no model spec: the model "
                                       "factory 'module:callable' that rebuilds its network, as for lcsc-ops import "
                                       "(docs/runs-you-have.md).", panel=SOURCE)
    factory_kwargs: dict = option(help="With --factory: its kwargs as JSON.", panel=SOURCE, parse=parse_json_object,
                                  default_factory=dict)
    sampler_steps: int | None = option(None, "With --factory: DDIM sampling steps (default 10).", panel=SOURCE)
    dataset: str | None = option(None, "With --factory: reference data set for FID (default digits).", panel=SOURCE)
    image_shape: tuple[int, ...] | None = option(None, "With --factory: C,H,W of one sample (default 1,8,8).",
                                                 panel=SOURCE, parse=parse_image_shape)
    conditioning: dict = option(help="With --factory: a class-conditional model, JSON of num_classes, null_label, "
                                     "guidance, label_keyword.", panel=SOURCE,
                                parse=lambda t: parse_json_object(t, "--conditioning"), default_factory=dict)
    key_prefix: str | None = option(None, "The prefix of the weights' keys in the run's files, e.g. 'net.' "
                                          "(default: the one prefix that maps them onto the factory's model).",
                                    panel=SOURCE)
    layout: str | None = option(None, "Read the run as this layout: lcsc, lightning, ... (default: detected).",
                                panel=SOURCE)
    quiet: bool = option(False, "No progress bars or lines and no log lines on stderr: only the result "
                                "(stdout) and errors. Not part of the run's params.")
    tracking_uri: str | None = option(None, cli=False)

    def study_key(self) -> dict[str, Any]:
        """The settings that define a study; the same key resumes the same study."""
        keep = ("run_id", "window", "end_step", "basis", "strategy", "radius", "blocks", "search_samples",
                "search_seeds", "nfe", "seed", "evaluator", "feature_extractor")
        key = {k: getattr(self, k) for k in keep}
        if self.search_precision != "fp32":  # absent for fp32, so earlier studies still resume
            key["search_precision"] = self.search_precision
        for name in ("metric_name", "evaluator_version", "guidance"):  # absent when unset, for the same reason
            if getattr(self, name) is not None:
                key[name] = getattr(self, name)
        for name in SOURCE_FIELDS:  # a run another tool logged: the spec and reading given here
            if getattr(self, name) not in (None, {}):
                key[name] = getattr(self, name)
        return key

    def validate(self) -> None:
        """Every option checked before anything is downloaded or scored."""
        from lcsc_ops.search.storage import check_storage
        from lcsc_ops.search.strategies import check_strategy

        if self.basis not in BASIS_KINDS:
            raise LcscError(f"unknown basis {self.basis!r} (use raw, ema or both)")
        check_positive(self, ("workers", "window", "n_trials", "search_samples", "search_seeds", "final_samples", "final_seeds",
                              "selection_seeds", "top_k", "ema_grid", "batch_size", "blocks", "nfe"))
        if self.search_seeds > FINAL_SEED_BASE:
            raise LcscError(f"--search-seeds must be at most {FINAL_SEED_BASE} (the fresh final seeds start at "
                            f"{FINAL_SEED_BASE}), got {self.search_seeds}")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise LcscError(f"--radius must be a finite number > 0, got {self.radius}")
        if self.max_stack_memory is not None and not (math.isfinite(self.max_stack_memory) and self.max_stack_memory > 0):
            raise LcscError(f"--max-stack-memory must be > 0 GiB, got {self.max_stack_memory}")
        if self.search_precision not in PRECISIONS:
            raise LcscError(f"unknown search precision {self.search_precision!r} (use {', '.join(PRECISIONS)})")
        check_strategy(self.strategy)
        if isinstance(self.trust_factory, str) or not isinstance(self.trust_factory, (tuple, list)):
            raise LcscError(f"--trust-factory must be a tuple of module prefixes, got {self.trust_factory!r}")
        check_module_prefixes(tuple(self.trust_factory), "--trust-factory")
        if self.storage:
            check_storage(self.storage)
        self._validate_evaluators()
        if self.factory is None:
            given = [f"--{n.replace('_', '-')}" for n in SOURCE_FIELDS[1:6] if getattr(self, n) not in (None, {})]
            if given:
                raise LcscError(f"{', '.join(given)} describe the model of a run that records no model spec: "
                                f"give --factory too")
        if self.nfe is not None and self.evaluator:
            raise LcscError("--nfe applies to the built-in FID only; a custom evaluator samples by itself")
        if self.guidance is not None:
            if isinstance(self.guidance, bool) or not (math.isfinite(self.guidance) and self.guidance >= 0):
                raise LcscError(f"--guidance must be a finite number >= 0, got {self.guidance}")
            if self.evaluator:
                raise LcscError("--guidance applies to the built-in FID only; a custom evaluator samples by itself")
        if self.prune:
            if self.evaluator:
                raise LcscError("--prune needs the built-in FID: a custom evaluator scores all its samples at once")
            if not self.prune_rungs or not all(0 < f < 1 for f in self.prune_rungs):
                raise LcscError(f"--prune-rungs must be fractions strictly between 0 and 1, got {list(self.prune_rungs)}")

    def _validate_evaluators(self) -> None:
        if self.metric_name is not None and not (isinstance(self.metric_name, str)
                                                 and METRIC_NAME.fullmatch(self.metric_name)):
            raise LcscError(f"--metric-name must be a letter then letters, digits, '_' or '-' (at most 64), "
                            f"got {self.metric_name!r}")
        if self.evaluator_version is not None and not (self.evaluator or self.second_evaluator):
            raise LcscError("--evaluator-version versions a custom evaluator: give --evaluator or --second-evaluator")

# Two entry points for a fresh machine: `make demo` and `make test` (both create ./.venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LCSC   := $(VENV)/bin/lcsc-ops
STAMP  := $(VENV)/.installed

# Demo recipe = the quality benchmark's (benchmarks/RESULTS.md): ~2 min of training on 2 CPU cores, then a
# 100-trial search with the default strategy (evolution, OptimizeConfig.strategy) over 40 checkpoint steps (raw + EMA,
# 8 blocks per kind) scored on 2 fixed seeds.
DEMO_STEPS  ?= 3000
DEMO_TRIALS ?= 100
DEMO_MODEL  ?= digits-ddpm

.PHONY: install demo test test-ui docs docs-serve bench bench-quality bench-prune bench-scale bench-cm bench-nfe bench-strategies bench-conditional bench-size bench-slots clean

install: $(STAMP)

# torch is pinned to the local CPU wheel first, so nothing below can pull another build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,diffusers,postgres]'
	@$(PY) -m pip list 2>/dev/null | grep -E '^torch ' | grep -q '2.13.0' || { echo "error: wrong torch installed"; exit 1; }
	touch $(STAMP)

demo: $(STAMP)
	@set -e; \
	run=$$($(LCSC) train --steps $(DEMO_STEPS) --experiment lcsc-demo --model-name $(DEMO_MODEL) | tail -n 1); \
	echo "training run: $$run"; \
	$(LCSC) optimize $$run --window 40 --blocks 8 --search-seeds 2 --n-trials $(DEMO_TRIALS) --report .lcsc-demo.json; \
	version=$$($(PY) -c "import json; print(json.load(open('.lcsc-demo.json'))['registered_model']['version'])"); \
	$(LCSC) promote $(DEMO_MODEL) $$version --alias champion; \
	echo "browse it all with: $(VENV)/bin/mlflow ui"

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

# The documentation site (mkdocs.yml, docs/): built with --strict (a broken link or a page left out of the nav fails it);
# `make test` builds it too (tests/test_docs.py). docs-serve rebuilds on every edit, on http://127.0.0.1:8000 only.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict -a 127.0.0.1:8000

# The MLflow UI in headless Chromium (Debian's, apt-get installed if missing: run as root): the optimize run,
# its trial runs and the registered model with its alias; screenshots -> docs/mlflow-ui-runs.png, docs/mlflow-ui-model.png.
test-ui: $(STAMP)
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }
	LCSC_UI_SCREENSHOTS=docs $(PY) -m pytest -q -rs tests/test_ui.py

# Per-trial cost benchmarks (~5-10 min on 2 cores): benchmarks/results/perf.json + benchmarks/RESULTS.md.
bench: $(STAMP)
	$(PY) benchmarks/bench_perf.py

# Quality benchmark (~50 min on 2 idle CPU cores): every search strategy vs the baselines on one digits recipe;
# table -> benchmarks/RESULTS.md, figures -> benchmarks/results/quality.json. `--quick` checks the plumbing.
bench-quality: $(STAMP)
	$(PY) benchmarks/bench_quality.py

# Early stopping (~5 min on 2 cores): the same search with and without --prune (reuses bench-quality's run
# when its checkpoints are cached); figures -> benchmarks/results/prune.json, section in benchmarks/RESULTS.md.
bench-prune: $(STAMP)
	$(PY) benchmarks/bench_prune.py

# Scale-out (~25 min on 2 cores): --workers 2 vs 1, two processes on one study (journal and PostgreSQL), kill -9 and
# resume, checkpoint-logging overhead (local store and mlflow server); benchmarks/results/scale.json + RESULTS.md.
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py

# Issue 14, three stages (each ~35-40 min on 2 idle cores; they reuse bench-quality's DDPM run under benchmarks/work/full,
# training it there first if it is missing, so they run in any order). Figures are merged into
# benchmarks/results/quality.json under their own keys; each replaces its own section of benchmarks/RESULTS.md;
# `--quick` checks the plumbing in a few minutes, `--fresh` starts over.
# Consistency training cost: iCT and distillation from the DDPM run, each for the full budget and for 1/8, 1/4, 1/2 of
# it; LCSC on each shorter run vs the full run's strongest baseline at 1 and 2 steps, and the speed-up (search counted)
# -> `cm_shorter` (~50 min on 2 cores; `--no-cd`: iCT only).
bench-cm: $(STAMP)
	$(PY) benchmarks/bench_cm.py

# Fewer sampling steps: the DDPM merge searched at 9 (and 12) steps vs the strongest baseline at 15, with DDIM and
# DPM-Solver++ 2M, each against its own base -> `nfe`. Two worker processes of one thread.
bench-nfe: $(STAMP)
	$(PY) benchmarks/bench_nfe.py

# Strategies at equal budgets: cmaes, gp, tpe, random, evolution x 5 search seeds x 150 trials; the final FID of what the
# product would register after 25, 50, 100, 150 trials -> `strategies.<name>.final_at_budget`, `default_strategy`,
# plot benchmarks/results/strategies.png. Two worker processes of one thread.
bench-strategies: $(STAMP)
	$(PY) benchmarks/bench_strategies.py

# Class-conditional digits with classifier-free guidance (~25 min on 2 idle cores): one conditional run, a CMA-ES search
# at the spec's guidance scale vs the baselines (training EMA tuned over decays, EMA*, last, uniform), FID plus the digits
# classifier's per-class accuracy -> benchmarks/results/conditional.json + RESULTS.md. `--quick` checks the plumbing.
bench-conditional: $(STAMP)
	$(PY) benchmarks/bench_conditional.py

# Do the logger's shared-memory slots pay for themselves (~5 min on 2 idle cores)? A loop keeping its EMA, unlogged, logged
# as shipped and logged with the slots off -> benchmarks/results/slots.json + RESULTS.md.
bench-slots: $(STAMP)
	$(PY) benchmarks/bench_slots.py

# Model size (issue 24, ~30-40 min on 2 cores, at most 60 GB of disk, removed at the end): a synthetic model of 1e7, 1e8,
# 3e8 and 1e9 parameters (1e9 in bf16) through every stage (CheckpointLogger, import, fetch + sha256, the merger chosen
# from free memory, registration, lcsc_ops.load), each against its floor, with peak RSS and the machine's load;
# benchmarks/results/size.json + size.png + RESULTS.md. Rows resume; `--fresh` reruns them.
bench-size: $(STAMP)
	$(PY) benchmarks/bench_size.py

clean:
	rm -rf $(VENV) mlflow.db optuna.db optuna.journal .lcsc-demo.json site

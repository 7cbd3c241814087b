# Two entry points for a fresh machine: `make demo` and `make test` (both create ./.venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LCSC   := $(VENV)/bin/lcsc-ops
STAMP  := $(VENV)/.installed

# Demo recipe = the quality benchmark's (benchmarks/RESULTS.md): ~2 min of training on 2 CPU cores, then a
# 100-trial CMA-ES search over 40 checkpoint steps (raw + EMA, 8 blocks per kind) scored on 2 fixed seeds.
DEMO_STEPS  ?= 3000
DEMO_TRIALS ?= 100
DEMO_MODEL  ?= digits-ddpm

.PHONY: install demo test test-ui bench bench-quality bench-prune clean

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
	$(PY) -m pytest -q

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

clean:
	rm -rf $(VENV) mlflow.db optuna.db optuna.journal .lcsc-demo.json

# Two-command quick start: `make demo` and `make test` each set up .venv/ first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean default-model

setup: $(STAMP)

# Re-install only when the dependency pins or the project metadata change.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/kmnist-batch predict examples/crops --out runs/demo --overwrite
	$(BIN)/kmnist-batch predict --manifest examples/pages/kaggle.csv --export alto --out runs/demo-pages --overwrite

# The whole suite (what CI runs) on both cores: every Ray test in one worker, in order (one session Ray),
# the rest in the other (tests/conftest.py groups them); slowest tests listed at the end.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=20

# The edit loop: tests that start no Ray and train no model (markers set in tests/conftest.py), on both cores.
test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not ray and not training"

bench: setup
	$(BIN)/python bench/predict_throughput.py --sizes 5000,50000

clean:
	rm -rf runs/ .pytest_cache

# How the embedded default model (kmnist_core/default_model/) is made, on 2 CPU cores (docs/model.md, "How
# the default model is made"): plain-oe's 5 folds (two at a time, ~20 min a fold on one idle core), the
# temperature and review thresholds fitted on their 8,000 out-of-fold predictions, then the same recipe
# trained on all 8,000 and installed. Every step resumes where it stopped. Needs the Aoyagi Kouzan brush
# font for training negatives (apt-get install -y fonts-aoyagi-kouzan-t).
default-model: setup
	nice -n 19 $(BIN)/python bench/oof_folds.py --recipe plain-oe --parallel 2
	$(BIN)/python bench/oof_thresholds.py --recipe plain-oe
	nice -n 19 $(BIN)/python bench/oof_final.py --recipe plain-oe --out runs/oof-default --install

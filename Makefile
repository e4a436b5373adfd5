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
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[train,test]'
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
# the default model is made"): the hands-oe recipe's 5 folds over all 14,000 bundled images (two at a time,
# about an hour a fold on one idle core), the review thresholds fitted and checked on their out-of-fold
# predictions, then the same recipe trained on every image and installed. Every step resumes where it
# stopped (rerun the target). Needs the Japanese hands the negatives are drawn in: the recipe's error names
# the Debian packages (kmnist_core/recipe.py, HAND_PACKAGES).
default-model: setup
	nice -n 19 $(BIN)/python -m jobs.recipe folds --parallel 2
	$(BIN)/python -m jobs.recipe review
	nice -n 19 $(BIN)/python -m jobs.recipe final --install

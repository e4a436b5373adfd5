# Two-command quick start: `make demo` and `make test` each set up .venv/ first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean default-model default-model-base

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

# How the embedded default model (kmnist_core/default_model/) was made, in two steps (README, "How the
# default model was made"). default-model-base: five vgg-cnn teachers, then a compact-cnn-wide student
# distilled from their ensemble; a few minutes on one H100 (DEVICE=cuda PARALLEL=8), several hours on 2
# CPU cores; `DATASET=kmnist` runs it on the official 60k training set.
DATASET ?= kmnist-dev
DEVICE ?= auto
PARALLEL ?= 1
default-model-base: setup
	$(BIN)/python bench/distill_recipe.py --dataset $(DATASET) --device $(DEVICE) --parallel $(PARALLEL) \
		--teachers 5 --teacher-epochs 60 --students compact-cnn-wide:0 --student-epochs 180 --out runs/default-model

# default-model: outlier-exposure fine-tuning of that base (the distilled student as committed in git,
# or BASE=DIR, e.g. runs/default-model/student-compact-cnn-wide-s0) on CPU, then temperature and review thresholds fitted on validation; installs the result.
# Needs the Aoyagi Kouzan brush font (apt-get install -y fonts-aoyagi-kouzan-t). ~5 minutes on 2 idle cores.
BASE ?=
default-model: setup
	$(BIN)/python bench/default_model_recipe.py --out runs/default-oe $(if $(BASE),--base $(BASE)) --install

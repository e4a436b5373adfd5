# Two-command quick start: `make demo` and `make test` each set up .venv/ first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean default-model

setup: $(STAMP)

# Re-install only when the dependency pins or the project metadata change.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/kmnist-batch predict examples/crops --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/predict_throughput.py --sizes 2000,20000,100000

clean:
	rm -rf runs/ .pytest_cache

# How the embedded default model (kmnist_core/default_model/) was trained; about 4 minutes on 2 cores.
# `make default-model DATASET=kmnist` runs the same recipe on the official 60k training set.
DATASET ?= kmnist-dev
default-model: setup
	$(BIN)/kmnist-batch train --dataset $(DATASET) --model compact-cnn --epochs 60 --lr 3e-3 --batch-size 128 \
		--optimizer adamw --weight-decay 5e-4 --schedule onecycle --augment strong --threads 1 --out runs/default-model
	cp runs/default-model/model.pt runs/default-model/model_card.json kmnist_core/default_model/

# Every target works on a fresh machine: it creates .venv and installs what it needs, with the exact versions
# of constraints.txt. `make test` also installs Debian's chromium (the browser test). `make web` serves the model
# `make demo` trained; WEB_ARGS adds flags, e.g. make web WEB_ARGS="--host 0.0.0.0 --port 8000".
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two pytest workers, each handed whole modules (module fixtures such as a shared training run are
# built once), longest first (tests/conftest.py): the suite is mostly one-threaded compiling.
PYTEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder
PIP := $(PY) -m pip install --quiet -c constraints.txt
DEMO_OUT := demo_out
WEB_ARGS ?=

.PHONY: demo demo-standin ablate test test-fast lint format web browser install install-dev lmms-eval clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP) -e ".[web,serve]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

# lmms-eval in an environment of its own (it pins av<16 and brings torch, datasets and wandb), with the
# avllm_jax model (integrations/lmms_eval), which asks `python -m avllm_jax.serve`: docs/serving.md.
LMMS_VENV := .venv-lmms
$(LMMS_VENV)/.installed: integrations/lmms_eval/requirements.txt integrations/lmms_eval/pyproject.toml integrations/lmms_eval/avllm_jax_lmms/*.py
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LMMS_VENV)/bin/python -m pip install --quiet -r integrations/lmms_eval/requirements.txt
	$(LMMS_VENV)/bin/python -m pip install --quiet --no-deps integrations/lmms_eval
	touch $@

lmms-eval: $(LMMS_VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev browser

# The data, stage 1, stage 2 and the table: 10.6 min on 2 cores with the stand-in built (it builds it first,
# 10 to 14 min, when demo_out/standin is missing). demo-standin builds only the stand-in and stage 1's start
# (cached in demo_out/).
demo: $(VENV)/.installed
	$(PY) tools/demo.py

demo-standin: $(VENV)/.installed
	$(PY) tools/demo.py --standin-only

# The paper's Table 4 (MAT, PT1, PT2) in miniature: the demo's stage 2, three seeds, from its stage 1 (about 55 min).
ablate: $(VENV)/.installed
	$(PY) tools/ablate.py table4

# Checked on every run (a no-op when chromium is there), so a machine that lost it gets it back.
browser:
	bash tools/install_browser.sh

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(VENV)/.installed-dev browser lmms-eval
	$(PY) -m pytest -q tests $(PYTEST_WORKERS)

# The edit-test loop: no training or server subprocesses, no browser, no TPU compile.
test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests $(PYTEST_WORKERS) -m "not slow and not subprocess and not browser and not tpu"

web: $(VENV)/.installed
	@test -f $(DEMO_OUT)/run/config.json || { echo "make web serves the model that make demo trains: run make demo first"; exit 1; }
	$(PY) -m avllm_jax.web --checkpoint $(DEMO_OUT)/run --examples $(wildcard $(DEMO_OUT)/data/media/eval_0000[0-5].*) $(WEB_ARGS)

clean:
	rm -rf $(VENV) $(LMMS_VENV) .pytest_cache .mypy_cache .ruff_cache

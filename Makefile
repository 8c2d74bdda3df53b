# `make demo`, `make ablate`, `make test` and `make web` work on a fresh machine: each creates .venv and installs what
# it needs (`make test` also Debian's chromium, for the browser test). `make web` serves the model
# `make demo` trained; WEB_ARGS adds flags, e.g. make web WEB_ARGS="--host 0.0.0.0 --port 8000".
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT := demo_out
WEB_ARGS ?=

.PHONY: demo ablate test web browser install install-dev clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt requirements-tpu.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev browser

demo: $(VENV)/.installed
	$(PY) tools/demo.py

# The paper's Table 4 (MAT, PT1, PT2) in miniature on the demo data, three seeds (about 40 minutes).
ablate: $(VENV)/.installed
	$(PY) tools/ablate.py table4

# Checked on every run (a no-op when chromium is there), so a machine that lost it gets it back.
browser:
	bash tools/install_browser.sh

test: $(VENV)/.installed-dev browser
	$(PY) -m pytest -q tests

web: $(VENV)/.installed
	@test -f $(DEMO_OUT)/run/config.json || { echo "make web serves the model that make demo trains: run make demo first"; exit 1; }
	$(PY) -m avllm_jax.web --checkpoint $(DEMO_OUT)/run --examples $(wildcard $(DEMO_OUT)/data/media/eval_0000[0-5].*) $(WEB_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

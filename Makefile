# The two commands of the README:  make demo  (set up + run the workflow on the demo defaults)
#                                   make test  (set up + run the test suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/demo.yaml

.PHONY: demo test test-fast setup clean clean-runs
demo: $(VENV)/.installed
	$(PY) -m waveglow_lib run --params $(PARAMS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

# the suite without the long end-to-end tests (notebook chains, the browser): for a quick local loop
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not e2e"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (waveglow-workflow)" >/dev/null
	touch $@

# removes the environment and build leftovers; your results in runs/ stay (see clean-runs)
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# deletes every run folder under runs/: your results, reports and metrics
clean-runs:
	@echo "deleting runs/ (all run folders: results, reports, metrics)"
	rm -rf runs

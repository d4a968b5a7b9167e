# The two commands of the README:  make demo  (set up + run the workflow on the demo defaults)
#                                   make test  (set up + run the test suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/demo.yaml

.PHONY: demo test setup clean
demo: $(VENV)/.installed
	$(PY) -m waveglow_lib run --params $(PARAMS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (waveglow-workflow)" >/dev/null
	touch $@

clean:
	rm -rf $(VENV) runs

# The two commands of the README:  make demo  (set up + run the workflow on the demo defaults)
#                                   make test  (set up + run the test suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/demo.yaml

.PHONY: demo test test-fast test-isa setup clean clean-runs browser
demo: $(VENV)/.installed
	$(PY) -m waveglow_lib run --params $(PARAMS)

# the ISA-capped runs go on when the main suite fails (one flaky error must not hide them); either failing
# fails `make test`, at the end
test: $(VENV)/.installed browser
	@$(PY) -m pytest -q; suite=$$?; \
	  $(MAKE) --no-print-directory test-isa; isa=$$?; \
	  if [ $$suite -ne 0 ] || [ $$isa -ne 0 ]; then \
	    echo "make test: FAILED (main suite exit $$suite, ISA-capped runs exit $$isa)"; exit 1; fi

# the fast engine's exactness tests again, run as a CPU without AMX (AMD EPYC) and one without AVX-512 would
# run them (WAVEGLOW_ISA_CAP, waveglow_lib/isa.py): a guarantee that holds on one CPU only fails here too
ISA_CAPS  := no_amx avx2
ISA_TESTS := reproduces or matches_reference or reduced_precision or ragged or packed or cache_hit or repacks or threads_per_run or one_shot or calibrated_once
test-isa: $(VENV)/.installed
	@failed=""; for cap in $(ISA_CAPS); do echo "== WAVEGLOW_ISA_CAP=$$cap"; \
	  WAVEGLOW_ISA_CAP=$$cap $(PY) -m pytest -q -p no:cacheprovider tests/test_fast.py -k "$(ISA_TESTS)" \
	    || failed="$$failed $$cap"; done; \
	  if [ -n "$$failed" ]; then echo "test-isa: FAILED with WAVEGLOW_ISA_CAP in:$$failed"; exit 1; fi

# the suite without the long end-to-end tests (notebook chains, the browser): for a quick local loop
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not e2e"

setup: $(VENV)/.installed

# Debian's chromium for the real-browser test (tests/test_browser.py drives it with playwright; no browser
# download). Installed with apt where it is missing and apt can run; otherwise that test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "apt-get could not install chromium: tests/test_browser.py will be skipped"; \
	  else echo "chromium missing and apt-get unavailable (or not root): tests/test_browser.py will be skipped"; fi; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (waveglow-workflow)" >/dev/null
	@# notebooks are committed without outputs: nbstripout cleans them on `git add` (.gitattributes);
	@# --keep-id keeps the notebooks' own cell ids (nbstripout would renumber them); language_info is what
	@# the kernel that last ran a notebook reports (its Python version...): stripped too
	if git rev-parse --git-dir >/dev/null 2>&1; then \
	  $(PY) -m nbstripout --install --attributes .gitattributes && \
	  git config filter.nbstripout.clean '"$(abspath $(PY))" -m nbstripout --keep-id --extra-keys metadata.language_info'; fi
	touch $@

# removes the environment and build leftovers; your results in runs/ stay (see clean-runs)
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# deletes every run folder under runs/: your results, reports and metrics
clean-runs:
	@echo "deleting runs/ (all run folders: results, reports, metrics)"
	rm -rf runs

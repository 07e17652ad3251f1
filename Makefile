# The two commands: `make test` and `make book` (plus `make lab` to work through the labs).
# Each sets up .venv on first use (Python 3.11, the pins in requirements.txt, labkit in editable mode).

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup browser test test-fast book lab release clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium for the site's browser test (tests/test_site.py): installed only where it is missing, and
# only as root (CI runs as root on a fresh Debian); elsewhere that test is skipped unless CI is set.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else \
	    echo "note: /usr/bin/chromium is missing: run 'sudo apt-get install chromium' for the browser test"; \
	  fi; \
	fi

# Unit tests, learner simulations, the release check, the book build and browser test, nbval over every
# master notebook and a run of every untouched student notebook. Two workers, one file each at a time
# (a notebook's cells must share one kernel): the machine's two cores both stay busy.
test: setup browser
	$(PY) -m pytest tests notebooks --nbval-lax --ignore=notebooks/student --ignore=tests/fixtures \
	  --nbval-cell-timeout=300 -n 2 --dist loadfile --durations=40

# A contributor's inner loop: everything but whole-notebook runs, the site and the full batch-grading run.
test-fast: setup
	$(PY) -m pytest tests --ignore=tests/fixtures -m "not slow" -n 2 --dist loadfile

# The course site from the notebooks' stored outputs (nothing is executed), warnings as errors, MathJax served
# from the site itself: it works offline.
book: setup
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "The site is in $(CURDIR)/_build/html/index.html"

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

release: setup
	$(PY) -m labkit release

clean:
	rm -rf _build

# The two commands: `make test` and `make book` (plus `make lab` to work through the labs).
# Each sets up .venv on first use (Python 3.11, the pins in requirements.txt, labkit in editable mode).

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test book lab release clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)

# Unit tests, learner simulations, the release check, the book build, and nbval over every master notebook.
test: setup
	$(PY) -m pytest tests notebooks --nbval-lax --ignore=notebooks/student --nbval-cell-timeout=300

book: setup
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "The site is in $(CURDIR)/_build/html/index.html"

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

release: setup
	$(PY) -m labkit release

clean:
	rm -rf _build

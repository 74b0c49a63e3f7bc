# The two commands of README.md. Each creates or updates the virtual environment in .venv
# (re-installed whenever setup.py changes), so a fresh machine needs only Python 3.11, Java 17 and pip.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
OUT ?= out
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job on the embedded default: real MovieLens-100K logs -> validated logs -> examples.
run: $(STAMP)
	$(BIN)/streamrec data movielens --out $(OUT)/movielens
	$(BIN)/streamrec validate movielens
	$(BIN)/streamrec logs check $(OUT)/movielens --spec movielens
	$(BIN)/streamrec backfill --spec movielens --logs $(OUT)/movielens --out $(OUT)/movielens-examples

# pytest exits 5 when it collected no test: make fails on it, so an empty run never passes.
test: $(STAMP)
	$(BIN)/python -m pytest -q

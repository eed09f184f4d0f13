# Two commands for a newcomer: `make demo` (pipeline end to end on bundled data) and `make test`.
# Both set up everything first: a Java runtime if missing (apt), a virtualenv, the package.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# the deep-learning runtime: TensorFlow, Petastorm, patched Horovod (docs/deep_learning.md)
DLVENV ?= .venv-dl
LAKE ?= ./lake

.PHONY: demo test test-heavy test-fast bench bench-quick lint setup java clean dl-env pathling-env

setup: java $(VENV)/.installed .jars/delta/.fetched

java:
	@if ! command -v java >/dev/null 2>&1 && [ -z "$${JAVA_HOME:-}" ]; then \
	  echo "Java runtime not found: installing openjdk-17-jdk-headless with apt-get (Spark needs Java 17+)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq openjdk-17-jdk-headless; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq openjdk-17-jdk-headless; fi; \
	fi

$(VENV)/.installed: setup.py
	@command -v python3.11 >/dev/null && PYBIN=python3.11 || PYBIN=python3; \
	  $$PYBIN -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

# the native Delta engine's JARs (lake.engine: native; docs/operations.md), fetched once with Maven,
# and ehrlake's Spark classes (infra/spark: the lake catalog, the policy guard, the JVM column sealer)
# compiled against them
.jars/delta/.fetched: infra/delta/pom.xml $(wildcard infra/spark/src/ehrlake/*.java) lib/ehrlake/security/seal-v1.zdict scripts/delta_jars.sh $(VENV)/.installed
	bash scripts/delta_jars.sh .jars/delta "$$($(PY) -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')"
	@touch $@

dl-env: $(DLVENV)/.installed

$(DLVENV)/.installed: requirements/dl.txt scripts/dl_env.sh setup.py
	bash scripts/dl_env.sh $(DLVENV)
	@touch $@

# Pathling 6.3.1 on Spark 3.3 (its JARs inside the wheel), only for bench/views.py's comparison
pathling-env: .venv-pathling/.installed

.venv-pathling/.installed:
	@command -v python3.11 >/dev/null && PYBIN=python3.11 || PYBIN=python3; $$PYBIN -m venv .venv-pathling
	.venv-pathling/bin/pip install -q pathling==6.3.1 pyspark==3.3.4
	@touch $@

demo: setup dl-env
	bash scripts/demo.sh $(LAKE)

# the main suite in the main runtime (it skips tests/test_dl.py, which needs TensorFlow), two test
# files at a time (pytest-xdist, a SparkSession per worker: on the suite's small tables Spark waits
# on itself more than on the two cores), then the deep-learning tests in the deep-learning runtime
test: setup dl-env
	$(PY) -m pytest -q -m "not heavy" -n 2 --dist loadfile --no-loadscope-reorder
	$(DLVENV)/bin/python -m pytest -q -m "not heavy" tests/test_dl.py

# the crash, concurrency, cluster, whole-lake and whole-data-set tests (about 40 minutes on 2 cores,
# which CI's limit has no room for): run them before changing ingest, the lake's commits, the security
# of what is written, features, scoring or federated training
test-heavy: setup dl-env
	$(PY) -m pytest -q -m heavy
	$(DLVENV)/bin/python -m pytest -q -m heavy tests/test_dl.py

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# every stage at 1k/10k/100k patients with baselines, slopes, memory, 1 vs 2 workers; then the
# per-stage benchmarks. bench-quick: the harness at 200 and 1,000 patients; fails when the driver's
# memory grows or an ingest's (CSV, FHIR) ratio to its bare pass is 1.5x the committed quick result's (by hand: .ci/run)
bench: setup dl-env pathling-env
	$(PY) bench/harness.py --sizes 1000,10000,100000 --workers-compare 10000
	$(PY) bench/ingest.py
	$(PY) bench/ingest_profile.py --sizes 10000,100000,300000
	$(PY) bench/views.py
	$(PY) bench/eda.py
	$(PY) bench/models.py
	$(PY) bench/xgboost_scale.py --rows 1000000,3000000,10000000
	$(DLVENV)/bin/python bench/dl.py
	$(PY) bench/federated.py
	$(DLVENV)/bin/python bench/federated.py --model ann
	$(PY) bench/federated_states.py

bench-quick: setup
	$(PY) bench/harness.py --quick

lint: setup
	$(VENV)/bin/ruff check lib jobs tests bench scripts

clean:
	rm -rf $(LAKE) .cluster spark-warehouse

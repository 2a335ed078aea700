# The README's commands. Each installs what it needs first (scripts/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: deps test test-long lint unit image-test demo bench clean

deps:
	@bash scripts/bootstrap.sh

lint: deps
	$(VENV)/bin/ruff check exporter tests bench scripts
	$(VENV)/bin/mypy

## make test: the whole suite (lint, types, unit, namespace integration, lab, end-to-end)
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

unit: deps
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

## make test-long: the long tests left out of make test: the whole e2e fault matrix (~5 min a fault), the
## 30-minute healthy soak, the glibc/musl distribution comparison (~3 min)
test-long: deps
	CDE_SLOW=1 $(PY) -m pytest tests/e2e tests/integration/test_resolver_distribution.py -m "long or slow" $(PYTEST_ARGS)

## make image-test: build the image with podman on a local bookworm base and run it with runc as the DaemonSet
## does, with and without NET_ADMIN (root; apt-get install podman buildah mmdebstrap uidmap runc; ~1-2 min)
image-test: deps
	CDET_IMAGE_TEST=1 $(PY) -m pytest tests/integration/test_image.py -m image $(PYTEST_ARGS)

## make demo [SCENARIO=table-full] [DEMO_SECONDS=30]: the exporter in a live lab with Prometheus and Alertmanager
demo: deps
	$(PY) -m tests.lab demo $(if $(SCENARIO),--scenario $(SCENARIO)) $(if $(DEMO_SECONDS),--seconds $(DEMO_SECONDS))

## make bench: benchmarks, printed as ratios against named references
bench: deps
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The README's two commands: `make demo` and `make test` (as root on Debian/Ubuntu).
PY := .venv/bin/python

.PHONY: setup demo test unit lab golden lint

setup:
	./scripts/setup.sh

# Build a namespace lab, apply examples/l2-web.json with the real CLI, send
# TCP and UDP flows, print the report, tear down (KEEP=1 leaves the lab up).
demo: setup
	$(PY) netns-lab/demo.py $(if $(KEEP),--keep,)

# Unit tests (no root) and host-kernel lab tests (root, network namespaces).
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests netns-lab

unit: setup
	$(PY) -m pytest -q tests

lab: setup
	$(PY) -m pytest -q netns-lab

# Rewrite tests/golden/ from the current compiler; review the diff.
golden: setup
	$(PY) -m pytest -q tests/test_golden.py --update-golden

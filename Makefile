# Every target bootstraps .venv on first use. MATRIX=path selects another matrix file;
# INSTANCE=g5 (or INSTANCE="g5 p5") selects instance families.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MATRIX ?= matrix.yaml
INSTANCE ?=
LMI := $(BIN)/lmi --matrix $(MATRIX)
SELECT := $(foreach i,$(INSTANCE),--instance $(i))
# Extra flags for `lmi build` and `lmi test`, e.g. BUILD_FLAGS="-j 2 --force", TEST_FLAGS="--gpu required".
BUILD_FLAGS ?=
TEST_FLAGS ?=
LOCK_FLAGS ?=
# Where `make push` publishes: ecr://ACCOUNT/REGION[/PREFIX] or oci://HOST[:PORT][/PREFIX]; the default is
# the embedded local registry, started when absent.
REGISTRY ?= oci://127.0.0.1:5000

# The local test matrix builds offline: its stand-ins are prepared first, and torch comes from pip's
# local wheel folder (PIP_FIND_LINKS), unless WHEELHOUSE says otherwise.
# tests/matrix.gpu-local.yaml builds real GPU images on CUDA bases made here from Debian packages.
LOCAL := $(findstring local,$(notdir $(MATRIX)))
WHEELHOUSE ?= $(if $(findstring matrix.local,$(MATRIX)),$(firstword $(PIP_FIND_LINKS)))

.PHONY: help venv mpi engine registry build test-images push lock render validate plan lint test test-e2e test-gpu-stack test-vllm facts-upstream bench bench-hostile bench-stream clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The venv is rebuilt when pyproject.toml changes. Debian's python3 needs python3-venv for `-m venv`.
$(VENV)/.ready: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
	  || { echo "error: $(PYTHON) is older than 3.10; set PYTHON=python3.10 or newer" >&2; exit 2; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
	  else echo "error: '$(PYTHON) -m venv' failed; install your distribution's python3-venv" >&2; exit 2; fi; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,host]'
	@touch $@

venv: $(VENV)/.ready ## create .venv with the toolkit and its dev tools

# The DeepSpeed handler's tests start real ranks with mpirun, as DJL's MPI mode does.
mpi:
	@command -v mpirun >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openmpi-bin >/dev/null; \
	  else echo "error: mpirun is missing; install your distribution's openmpi-bin" >&2; exit 2; fi; }

engine: venv ## make sure a Docker engine with BuildKit answers (installs and starts docker.io if needed)
	$(BIN)/lmi engine

build: engine ## validate, then build the images of INSTANCE (all when unset) with BuildKit
	$(LMI) validate
	$(if $(LOCAL),$(BIN)/python -m tests.local.prepare --matrix $(MATRIX) --serve 3600)
	$(LMI) build $(SELECT) $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE)) $(BUILD_FLAGS)

test-images: engine ## smoke-test the built images of INSTANCE (cpu, gpu where usable, serving)
	$(LMI) test $(SELECT) --junit .lmi/smoke-junit.xml $(TEST_FLAGS)

registry: venv ## start the embedded local registry on 127.0.0.1:5000 when absent
	$(BIN)/lmi registry

push: engine ## push the smoke-tested images of INSTANCE to REGISTRY and record them in images.json
	$(LMI) push $(SELECT) --registry $(REGISTRY)

# Locks need the package indexes; the local matrix also resolves from the wheelhouse (its torch wheel).
lock: venv ## resolve every image's Python dependencies, hashed, into MATRIX's .lock, then re-render
	$(LMI) lock $(SELECT) $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE)) $(LOCK_FLAGS)

render: venv ## re-render images/ from the matrix and templates
	$(LMI) render

validate: venv ## check the matrix against the compatibility rules
	$(LMI) validate --verbose

# The hash `make build` labels each image with: the wheelhouse, a base mirror or a package index is where a
# build fetches from, not what the image is, so none of them changes it (render.plan).
plan: venv ## image ids, tags and content hashes
	$(LMI) plan $(SELECT)

lint: venv ## ruff, the import contracts, the profiles' type check, the render and lock gates, hadolint
	$(BIN)/ruff check buildkit tests bench
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/mypy
	$(BIN)/lmi render --check
	$(BIN)/lmi lock --check
	$(BIN)/lmi --matrix tests/matrix.local.yaml lock --check
	$(BIN)/lmi --matrix $(VLLM_MATRIX) lock --check
	$(BIN)/hadolint --config .hadolint.yaml images/*/Dockerfile
	$(BIN)/actionlint

# The engine tier (one Docker engine, one session's built image and package server) runs in order in one
# pytest; the rest of the suite (unit tests, the handler's ranks) runs beside it in another: most of the
# engine tier waits on Docker, so the two share the cores instead of taking turns. A few single-process
# modules (TAIL_TESTS, ~1 min each on a busy machine) run after whichever of the two ends first: each is
# claimed once (mkdir is atomic), the engine side taking them in order and the other side from the end, so
# the engine tier's run-to-run spread (the forced DJL step's apt downloads) moves them, not the wall time.
# Lint runs beside the tests too (its output is shown at the end); any failure fails `make test`.
# Each process of the suite computes on one thread (OMP_NUM_THREADS, unless set): the two pytests, the stand-in's
# ranks and Docker's builds share the cores, and an OpenMP team per process over-subscribes them (test_ways.py
# alone on a busy 2-core machine: 35 CPU-s with torch's 2 threads, 14 with 1).
TAIL_TESTS := tests/test_smoke.py tests/test_cli.py
TAIL_REVERSED := $(shell printf '%s\n' $(TAIL_TESTS) | tac)
test: venv engine mpi ## lint, and the test suite (engine tests build real images)
	@export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; \
	mkdir -p .lmi; rm -rf .lmi/tail-claims; mkdir .lmi/tail-claims; lint=0; unit=0; engine=0; \
	tail_tests() { rc=0; for t in "$$@"; do mkdir .lmi/tail-claims/$$(basename $$t) 2>/dev/null || continue; \
	  echo "--- $$t (after the $$side)"; \
	  $(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 -m "not e2e and not engine" $$t || rc=$$?; \
	done; return $$rc; }; \
	$(MAKE) --no-print-directory lint > .lmi/test-lint.log 2>&1 & lint_pid=$$!; \
	( side="rest of the suite"; rc=0; \
	  $(BIN)/python -m pytest -q -p no:cacheprovider --durations=40 -m "not e2e and not engine" \
	    $(foreach t,$(TAIL_TESTS),--ignore=$(t)) || rc=$$?; \
	  tail_tests $(TAIL_REVERSED) || rc=$$?; exit $$rc ) > .lmi/test-unit.log 2>&1 & unit_pid=$$!; \
	side="engine tier"; \
	$(BIN)/python -m pytest -q --durations=40 -m "engine and not e2e" || engine=$$?; \
	tail_tests $(TAIL_TESTS) || engine=$$?; \
	wait $$unit_pid || unit=$$?; \
	echo "--- the rest of the suite (run beside the engine tier; .lmi/test-unit.log):"; cat .lmi/test-unit.log; \
	wait $$lint_pid || lint=$$?; \
	echo "--- make lint (run beside the tests; .lmi/test-lint.log):"; cat .lmi/test-lint.log; \
	test $$engine -eq 0 -a $$unit -eq 0 -a $$lint -eq 0

# The publish.yml sequence and the weekly rebuild end to end with the 2 GB local image, and the image serving
# two passive DJL ranks through its entrypoint (~20 min on 2 cores); last result in bench/results.md.
test-e2e: engine mpi ## the publishing workflows and passive-rank serving end to end on local registries
	$(BIN)/python -m pytest -q --durations=5 -m e2e

# The GPU stack: real GPU images (DeepSpeed ops compiled for sm_86 and sm_70) on a CUDA toolchain made
# here from Debian packages; ~1 h on 2 cores, GBs of downloads. Too heavy for `make test`.
GPU_MATRIX := tests/matrix.gpu-local.yaml
test-gpu-stack: engine ## build and smoke-test the GPU images of tests/matrix.gpu-local.yaml; results in bench/results.md
	$(BIN)/lmi --matrix $(GPU_MATRIX) validate
	$(BIN)/python -m tests.local.prepare --matrix $(GPU_MATRIX) --serve 7200
	mkdir -p .lmi; set -o pipefail; $(BIN)/lmi --matrix $(GPU_MATRIX) build -j 1 --plain $(BUILD_FLAGS) | tee .lmi/gpu-stack-build.txt
	$(BIN)/lmi --matrix $(GPU_MATRIX) test --tier cpu,serving --junit .lmi/gpu-stack-junit.xml
	$(BIN)/python bench/gpu_stack.py

# The vLLM line built here: its production templates and locks on a Debian 12 base made here (4.3 GB of wheels
# from the package index on a cold cache); the CPU tier runs (serving needs a GPU). Results: bench/results.md.
VLLM_MATRIX := tests/matrix.vllm-local.yaml
test-vllm: engine ## build the vLLM image of tests/matrix.vllm-local.yaml and run its CPU tier
	$(BIN)/lmi --matrix $(VLLM_MATRIX) validate
	$(BIN)/python -m tests.local.prepare --matrix $(VLLM_MATRIX)
	mkdir -p .lmi; set -o pipefail; $(BIN)/lmi --matrix $(VLLM_MATRIX) build --plain $(BUILD_FLAGS) | tee .lmi/vllm-build.txt
	$(BIN)/lmi --matrix $(VLLM_MATRIX) test --tier cpu --junit .lmi/vllm-junit.xml

# Real releases through `lmi facts add`: cuobjdump against the .nv_fatbin reader, every derived record re-read from
# its wheel, and the index's newest vLLM to a locked, rendered line in a scratch copy (.lmi/upstream-bench/);
# ~2 GB of wheels from the package index on a cold cache. Results: bench/results.md.
facts-upstream: venv ## re-derive the wheel facts from real releases and time a release to a locked line
	$(BIN)/python bench/upstream_bench.py

# What the GPU families of a line store and pull beside one image, from the engine's layers of the images
# `make test-gpu-stack` built (before/after side by side); results in bench/results.md.
.PHONY: bench-fleet
bench-fleet: engine ## fleet bytes of a line's GPU families vs one image (needs make test-gpu-stack's images)
	$(BIN)/python bench/fleet_bench.py

bench: engine ## measure render and build speed into bench/results.md
	$(BIN)/python bench/render_bench.py
	$(BIN)/python bench/build_bench.py

# Time to first answer of a ~1 GB random model through the local CPU image's entrypoint, per way (DeepSpeed tp=1 and
# tp=2, Accelerate, Diffusion with a ~0.7 GB pipeline), beside plain Transformers/Diffusers in the same image (needs
# the image: make build INSTANCE=cpu MATRIX=tests/matrix.local.yaml; ~10 min on 2 cores); results in
# bench/results.md. COLD_FLAGS="--before IMAGE" also serves an earlier build in the same rounds.
.PHONY: bench-cold-start
bench-cold-start: engine ## time to first answer per way: the image's entrypoint vs plain Transformers/Diffusers
	$(BIN)/python bench/cold_start_bench.py $(COLD_FLAGS)

bench-hostile: venv ## what hostile requests cost the handler before and after its bounds, into bench/results.md
	$(BIN)/python bench/hostile_bench.py

# A ~1 GB model from loopback S3 (moto, s5cmd) vs mounted, and s5cmd vs a sequential boto3 download, in one
# run (~10 min on 2 cores, ~4 GB of disk); results in bench/results.md.
.PHONY: bench-deploy
bench-deploy: venv mpi ## time to first answer from S3 vs mounted, s5cmd vs boto3; results in bench/results.md
	$(BIN)/python bench/deploy_bench.py

# Token streaming through the DJL stand-in: time to the first chunk vs the whole answer (mpirun; ~3 min on 2 cores).
bench-stream: venv mpi ## measure streaming's time to first token into bench/results.md
	$(BIN)/python bench/stream_bench.py

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

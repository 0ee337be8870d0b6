"""Fixtures: a real LLM (llama.cpp + SmolLM2), the mock provider, and the bulwark-sidecar
binary in standalone mode on a directory of LLMRoute YAML, all on free loopback ports."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("BULWARK_BIN", ROOT / "target" / "debug"))


_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port free right now, and never handed out before in this run: a port picked
    here is bound later by a child, and until then the kernel may offer it again."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def start(args, url, log_name):
    log = open(Path(tempfile.gettempdir()) / f"bulwark-e2e-{log_name}.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(url, proc)
    except Exception:
        proc.kill()
        log.close()
        print(Path(log.name).read_text()[-4000:], file=sys.stderr)
        raise
    return proc


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


AIMOCK = Path(os.environ.get("AIMOCK", ROOT / ".tools/npm/node_modules/.bin/llmock"))


def start_aimock(fixtures, name):
    """aimock (the third-party mock, installed by scripts/tools.sh) serving `fixtures`: (its
    process, its URL)."""
    import json

    if not AIMOCK.exists():
        pytest.fail(f"{AIMOCK} is missing: run scripts/tools.sh")
    d = Path(tempfile.mkdtemp(prefix=f"bulwark-{name}-"))
    (d / "fixtures.json").write_text(json.dumps({"fixtures": fixtures}))
    port = free_port()
    proc = start([str(AIMOCK), "-h", "127.0.0.1", "-p", str(port), "-f", str(d / "fixtures.json")],
                 f"http://127.0.0.1:{port}/health", name)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def llm():
    port = free_port()
    proc = start([sys.executable, str(ROOT / "tests/e2e/llm_server.py"), "--port", str(port)],
                 f"http://127.0.0.1:{port}/health", "llm")
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


@pytest.fixture(scope="session")
def mock():
    port = free_port()
    proc = start([str(BIN / "bulwark-mock-provider"), "--listen", f"127.0.0.1:{port}", "--chunk-delay-ms", "5"],
                 f"http://127.0.0.1:{port}/v1/models", "mock")
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


ROUTES = """
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {{name: e2e}}
spec:
  backends:
    - {{name: llama, provider: openai-compatible, url: "{llm}"}}
  rules:
    - name: local
      match: {{models: [smollm2]}}
      backends: [{{name: llama, provider: openai-compatible, url: "{llm}"}}]
      timeouts: {{request: 60s, firstToken: 30s}}
    - name: messages
      match: {{paths: [/v1/messages]}}
      backends: [{{name: llama-anthropic, provider: anthropic, url: "{llm}"}}]
    - name: flaky
      match: {{models: [flaky]}}
      backends: [{{name: mock, url: "{mock}"}}]
      fallback: [{{backend: llama}}]
    - name: mock
      match: {{models: ["mock-*"]}}
      backends: [{{name: mock, url: "{mock}"}}]
    - name: limited
      match: {{models: [limited]}}
      backends: [{{name: mock, url: "{mock}"}}]
      rateLimit: {{requestsPerMinute: 1}}
    - name: cached
      match: {{models: [cached]}}
      backends: [{{name: mock, url: "{mock}"}}]
      cache: {{exact: {{ttl: 1m}}}}
    - name: embeddings
      match: {{paths: [/v1/embeddings]}}
      backends: [{{name: mock, url: "{mock}"}}]
    - name: guarded
      match: {{models: [guarded]}}
      backends: [{{name: mock, url: "{mock}"}}]
      scannerPolicyRef: {{name: guard}}
---
apiVersion: bulwark.dev/v1alpha1
kind: ScannerPolicy
metadata: {{name: guard}}
spec:
  input:
    - {{type: promptInjection, action: block}}
    - {{type: pii, entities: [email], action: redact, restoreInResponse: true}}
  output:
    - {{type: secrets, action: redact}}
"""


@pytest.fixture(scope="session")
def sidecar(llm, mock):
    d = Path(tempfile.mkdtemp(prefix="bulwark-e2e-"))
    (d / "routes.yaml").write_text(ROUTES.format(llm=llm, mock=mock))
    port, admin = free_port(), free_port()
    proc = start([str(BIN / "bulwark-sidecar"), "--manifests", str(d), "--listen", str(port), "--admin", str(admin)],
                 f"http://127.0.0.1:{admin}/ready", "sidecar")
    yield {"base": f"http://127.0.0.1:{port}", "admin": f"http://127.0.0.1:{admin}", "dir": d}
    stop(proc)

"""The webhook scanner against a real guardrail service this test starts: HTTPS that requires a
client certificate, a bearer token, verdicts pass / redact / block, a slow answer, a flaky
one, a concurrency bound, and a service that is down. Requests and answers go through the
openai SDK and the sidecar to the echoing mock provider."""

import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from conftest import BIN, free_port, start, stop

TOKEN = "guard-token-8c1f"
CARD = "4111 1111 1111 1111"


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def certificates(d: Path):
    """A CA, the service's certificate for 127.0.0.1, and the sidecar's client certificate."""
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
       "-subj", "/CN=guard CA", "-addext", "basicConstraints=critical,CA:TRUE", "-keyout", str(d / "ca.key"),
       "-out", str(d / "ca.crt"))
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        sh("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj",
           f"/CN={name}", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        sh("openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
           str(d / "ca.key"), "-CAcreateserial", "-days", "1", "-extfile", str(d / f"{name}.ext"),
           "-out", str(d / f"{name}.crt"))


class Guard(BaseHTTPRequestHandler):
    """The guardrail service: its verdict follows words in the texts."""

    calls: list = []
    flaky_seen: set = set()
    in_flight = {"input": 0, "output": 0}
    most_in_flight = {"input": 0, "output": 0}
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        auth = self.headers.get("authorization")
        peer = self.connection.getpeercert()
        # Calls of the concurrency test, in flight at once per scanner (direction).
        held = body["direction"] if any("hold" in t["text"] for t in body["texts"]) else None
        with Guard.lock:
            Guard.calls.append({"body": body, "auth": auth, "client": dict(x[0] for x in peer["subject"])["commonName"]})
            if held:
                Guard.in_flight[held] += 1
                Guard.most_in_flight[held] = max(Guard.most_in_flight[held], Guard.in_flight[held])
        try:
            status, verdict = self.verdict(body, auth)
        finally:
            if held:
                with Guard.lock:
                    Guard.in_flight[held] -= 1
        out = json.dumps(verdict).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    @staticmethod
    def verdict(body, auth):
        if auth != f"Bearer {TOKEN}":
            return 401, {"error": "who are you"}
        texts = [t["text"] for t in body["texts"]]
        joined = " ".join(texts)
        if "slow" in joined:
            time.sleep(1.0)
        if "hold" in joined:
            time.sleep(0.04)
        if "flaky" in joined and joined not in Guard.flaky_seen:
            Guard.flaky_seen.add(joined)
            return 503, {"error": "busy"}
        if "toxic" in joined:
            return 200, {"verdict": "block", "reason": "toxic language"}
        if body["direction"] == "output" and "forbidden" in joined:
            return 200, {"verdict": "block", "reason": "forbidden output"}
        if CARD in joined:
            return 200, {"verdict": "redact", "reason": "card number",
                         "texts": [t.replace(CARD, "[CARD]") if CARD in t else None for t in texts]}
        return 200, {"verdict": "pass"}


POLICY = """
apiVersion: bulwark.dev/v1alpha1
kind: ScannerPolicy
metadata: {{name: {name}}}
spec:
  input: [{{type: webhook, webhook: {hook}}}]
  output: [{{type: webhook, webhook: {hook}}}]
"""

ROUTES = """
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {{name: guarded}}
spec:
  rules:
    - match: {{models: [open]}}
      backends: [{{name: mock, provider: openai-compatible, url: "{mock}"}}]
      scannerPolicyRef: {{name: down}}
    - match: {{models: [hasty]}}
      backends: [{{name: mock, provider: openai-compatible, url: "{mock}"}}]
      scannerPolicyRef: {{name: hasty}}
    - backends: [{{name: mock, provider: openai-compatible, url: "{mock}"}}]
      scannerPolicyRef: {{name: guard}}
"""


@pytest.fixture(scope="module")
def env(mock):
    d = Path(tempfile.mkdtemp(prefix="bulwark-webhook-"))
    certificates(d)
    (d / "token").write_text(TOKEN + "\n")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "server.crt", d / "server.key")
    ctx.load_verify_locations(d / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED
    port = free_port()
    srv = ThreadingHTTPServer(("127.0.0.1", port), Guard)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    # A generous timeout, so a loaded machine never turns a check into a retry; `hasty` is the
    # same service with a timeout shorter than its slow answer.
    hook = {
        "url": f"https://127.0.0.1:{port}/check", "timeout": "5s", "retries": 1, "maxConcurrency": 2,
        "bearerToken": {"file": str(d / "token")}, "caFile": str(d / "ca.crt"),
        "clientCertificate": {"certFile": str(d / "client.crt"), "keyFile": str(d / "client.key")},
    }
    hasty = json.dumps({**hook, "timeout": "300ms"})
    down = json.dumps({"url": f"http://127.0.0.1:{free_port()}/check", "onError": "failOpen", "timeout": "200ms"})
    manifests = d / "manifests"
    manifests.mkdir()
    (manifests / "all.yaml").write_text("---".join([
        POLICY.format(name="guard", hook=json.dumps(hook)), POLICY.format(name="down", hook=down),
        POLICY.format(name="hasty", hook=hasty), ROUTES.format(mock=mock)]))
    sport, admin = free_port(), free_port()
    proc = start([str(BIN / "bulwark-sidecar"), "--manifests", str(manifests), "--listen", str(sport),
                  "--admin", str(admin)], f"http://127.0.0.1:{admin}/ready", "webhook-sidecar")
    yield {"base": f"http://127.0.0.1:{sport}", "admin": f"http://127.0.0.1:{admin}"}
    stop(proc)
    srv.shutdown()


def client(env):
    return openai.OpenAI(base_url=env["base"] + "/v1", api_key="unused", max_retries=0, timeout=30)


def chat(env, text, model="m", **kw):
    return client(env).chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def test_a_passing_text_goes_through_and_the_service_sees_texts_token_and_certificate(env):
    Guard.calls.clear()
    r = chat(env, "echo: hello there")
    assert r.choices[0].message.content == "hello there"
    directions = [c["body"]["direction"] for c in Guard.calls]
    assert directions == ["input", "output"]
    first = Guard.calls[0]
    assert first["auth"] == f"Bearer {TOKEN}" and first["client"] == "client"
    assert first["body"]["texts"] == [{"text": "echo: hello there", "source": "user"}]
    assert first["body"]["policy"] == "default/guard" and first["body"]["route"] == "default/guarded"


def test_a_block_verdict_refuses_the_request_with_its_reason(env):
    with pytest.raises(openai.BadRequestError) as e:
        chat(env, "some toxic words")
    assert e.value.code == "blocked_by_policy"
    assert "webhook said block: toxic language" in e.value.message


def test_a_redact_verdict_rewrites_the_text_before_the_provider(env):
    r = chat(env, f"echo: my card is {CARD}, thanks")
    assert r.choices[0].message.content == "my card is [CARD], thanks", "the provider echoed the redacted prompt"


def test_the_answer_is_judged_whole_and_streamed(env):
    r = chat(env, "echo: this is forbidden text")
    assert r.choices[0].finish_reason == "content_filter" and not r.choices[0].message.content
    with httpx.stream("POST", env["base"] + "/v1/chat/completions", timeout=30, json={
            "model": "m", "stream": True,
            "messages": [{"role": "user", "content": "echo: a first sentence that is long enough to be judged alone. now forbidden"}]}) as s:
        text = "".join(s.iter_text())
    assert "output_blocked" in text and "forbidden output" in text, text
    assert "[DONE]" not in text


def test_a_flaky_service_is_retried(env):
    Guard.calls.clear()
    r = chat(env, "echo: flaky service")
    assert r.choices[0].message.content == "flaky service"
    assert sum(1 for c in Guard.calls if c["body"]["direction"] == "input") == 2, "a 503, then the retry"


def test_a_slow_service_fails_closed_after_its_timeout_and_retry(env):
    started = time.time()
    with pytest.raises(openai.BadRequestError) as e:
        chat(env, "a slow check", model="hasty")
    took = time.time() - started
    assert "could not run (no answer within 300ms) and the policy fails closed" in e.value.message
    assert 0.6 <= took < 3, f"two attempts of 300 ms: {took:.2f}s"


def test_a_service_that_is_down_fails_open_when_it_says_so(env):
    r = chat(env, "echo: nobody checks this", model="open")
    assert r.choices[0].message.content == "nobody checks this"


def test_calls_in_flight_are_bounded(env):
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: chat(env, f"echo: hold {i}"), range(6)))
    assert all(a.choices[0].message.content.startswith("hold") for a in answers)
    assert Guard.most_in_flight["input"] == 2 and Guard.most_in_flight["output"] <= 2, Guard.most_in_flight


def test_verdicts_are_counted(env):
    import urllib.request

    with urllib.request.urlopen(env["admin"] + "/metrics") as r:
        m = r.read().decode()
    for outcome in ("pass", "block", "redact", "error"):
        assert f'scanner="webhook",direction="input",outcome="{outcome}"' in m, outcome

"""Upstream faults from a third-party fault-injecting mock (aimock): 429 with retry-after, 500s,
connections closed before an answer, a slow first byte, streams cut, dropped and stalled. Each
gets what the README promises (retry, fallback before the first byte, an explicit error event
after it) through the official SDKs, and is counted in /metrics. aimock's journal is the outside
count of the attempts the provider saw."""

import json
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import anthropic
import httpx2 as httpx
import openai
import pytest

from conftest import BIN, free_port, start, start_aimock, stop

ROUTE = "default/faults"
TEXT = "one two three four five six seven eight nine ten"

# First match wins; `userMessage` is a substring of the last user message.
FIXTURES = [
    {"match": {"model": "steady"}, "response": {"content": "steady answer"}},
    {"match": {"userMessage": "fault:429-once", "sequenceIndex": 0},
     "response": {"status": 429, "retryAfter": 1, "error": {"message": "slow down", "type": "rate_limit_error"}}},
    {"match": {"userMessage": "fault:429-once"}, "response": {"content": "answered after a 429"}},
    {"match": {"userMessage": "fault:429"},
     "response": {"status": 429, "retryAfter": 1, "error": {"message": "slow down", "type": "rate_limit_error"}}},
    {"match": {"userMessage": "fault:500"}, "response": {"status": 500, "error": {"message": "boom", "type": "server_error"}}},
    {"match": {"userMessage": "fault:close"}, "response": {"content": "never sent"}, "chaos": {"disconnectRate": 1}},
    {"match": {"userMessage": "fault:slow"}, "response": {"content": "too late"}, "chaos": {"latencyMs": 8000}},
    {"match": {"userMessage": "fault:cut"}, "response": {"content": TEXT}, "chunkSize": 5, "latency": 20,
     "truncateAfterChunks": 4},
    {"match": {"userMessage": "fault:drop"}, "response": {"content": TEXT}, "chunkSize": 5, "latency": 100,
     "disconnectAfterMs": 450},
    {"match": {"userMessage": "fault:stall"}, "response": {"content": TEXT}, "chunkSize": 5,
     "streamingProfile": {"ttft": 0, "tps": 0.001}},
]

RETRY_ON = '[connect-failure, timeout, "429", "5xx", reset]'
TIMEOUTS = "{firstToken: 1s, idle: 1s}"
ROUTES = f"""
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {{name: faults}}
spec:
  backends:
    - {{name: steady, provider: openai-compatible, url: "{{mock}}", model: steady}}
  rules:
    - name: retried
      match: {{models: [retried]}}
      backends: [{{name: flaky, provider: openai-compatible, url: "{{mock}}"}}]
      retry: {{attempts: 2, backoff: {{base: 20ms, max: 2s}}, retryOn: {RETRY_ON}}}
      timeouts: {TIMEOUTS}
    - name: failover
      match: {{models: [failover]}}
      backends: [{{name: primary, provider: openai-compatible, url: "{{mock}}"}}]
      retry: {{attempts: 1, backoff: {{base: 20ms, max: 100ms}}, retryOn: {RETRY_ON}}}
      fallback: [{{backend: steady}}]
      timeouts: {TIMEOUTS}
    - name: bare
      match: {{models: [bare]}}
      backends: [{{name: only, provider: openai-compatible, url: "{{mock}}"}}]
      timeouts: {TIMEOUTS}
    - name: claude
      match: {{paths: [/v1/messages]}}
      backends: [{{name: claude, provider: anthropic, url: "{{mock}}"}}]
      timeouts: {TIMEOUTS}
"""


@pytest.fixture(scope="module")
def aimock():
    proc, url = start_aimock(FIXTURES, "aimock")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def sidecar(aimock):
    """This module's own sidecar, routing every rule to aimock."""
    d = Path(tempfile.mkdtemp(prefix="bulwark-faults-"))
    (d / "routes.yaml").write_text(ROUTES.replace("{mock}", aimock + "/v1"))
    port, admin = free_port(), free_port()
    proc = start([str(BIN / "bulwark-sidecar"), "--manifests", str(d), "--listen", str(port), "--admin", str(admin)],
                 f"http://127.0.0.1:{admin}/ready", "faults-sidecar")
    yield {"base": f"http://127.0.0.1:{port}", "admin": f"http://127.0.0.1:{admin}", "mock": aimock}
    stop(proc)


@pytest.fixture
def oai(sidecar):
    return openai.OpenAI(base_url=sidecar["base"] + "/v1", api_key="unused", max_retries=0, timeout=30)


class Upstream:
    """What aimock saw: its journal, read before and after a request."""

    def __init__(self, sidecar):
        self.url = sidecar["mock"] + "/__aimock/journal"
        self.seen = len(self.entries())

    def entries(self):
        with urllib.request.urlopen(self.url) as r:
            return json.load(r)

    def new(self):
        """(the model sent upstream, the last user message) of each request since the start.
        aimock journals a request once it handles it: one held by `latencyMs` and abandoned
        before that never shows."""
        out = []
        for e in self.entries()[self.seen:]:
            body = e.get("body") or {}
            last = (body.get("messages") or [{}])[-1].get("content")
            out.append((body.get("model"), last))
        return out


class Metrics:
    """Counter deltas on the sidecar's /metrics between construction and `delta`."""

    def __init__(self, sidecar):
        self.url = sidecar["admin"] + "/metrics"
        self.before = self.read()

    def read(self):
        with urllib.request.urlopen(self.url) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
            if m:
                values[m[1] + (m[2] or "")] = float(m[3])
        return values

    def delta(self, name, **labels):
        want = [f'{k}="{v}"' for k, v in labels.items()]

        def total(values):
            return sum(v for k, v in values.items()
                       if k.split("{")[0] == name and all(w in k for w in want))

        return total(self.read()) - total(self.before)


def ask(oai, model, fault, **kw):
    return oai.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": fault}], **kw)


def test_429_retry_after_is_honoured_then_passed_on(oai, sidecar):
    up, m = Upstream(sidecar), Metrics(sidecar)
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as err:
        ask(oai, "retried", "fault:429")
    elapsed = time.monotonic() - t0
    assert len(up.new()) == 3, "the first attempt and two retries"
    assert elapsed >= 2.0, f"each retry waited the upstream's retry-after of 1 s ({elapsed:.2f}s)"
    assert err.value.code == "upstream_rate_limited"
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert m.delta("bulwark_retries_total", route=ROUTE, backend="flaky") == 2
    assert m.delta("bulwark_request_errors_total", code="upstream_rate_limited") == 1


def test_429_once_then_answered_by_the_retry(oai, sidecar):
    up, m = Upstream(sidecar), Metrics(sidecar)
    r = ask(oai, "retried", "fault:429-once")
    assert r.headers["x-bulwark-backend"] == "flaky"
    assert r.parse().choices[0].message.content == "answered after a 429"
    assert len(up.new()) == 2
    assert m.delta("bulwark_retries_total", route=ROUTE, backend="flaky") == 1
    assert m.delta("bulwark_requests_total", route=ROUTE, backend="flaky", status_class="2xx") == 1


@pytest.mark.parametrize("fault", ["fault:500", "fault:close", "fault:slow"])
@pytest.mark.parametrize("stream", [False, True])
def test_failure_before_the_first_byte_falls_back(oai, sidecar, fault, stream):
    up, m = Upstream(sidecar), Metrics(sidecar)
    t0 = time.monotonic()
    r = ask(oai, "failover", fault, stream=stream)
    assert r.headers["x-bulwark-backend"] == "steady"
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in r.parse() if c.choices)
    else:
        text = r.parse().choices[0].message.content
    assert text == "steady answer"
    seen = [model for model, _ in up.new()]
    if fault == "fault:slow":
        # Both attempts were abandoned unanswered, at firstToken (1 s) each.
        assert seen == ["steady"], seen
        assert 2.0 <= time.monotonic() - t0 < 5.5, "cut at firstToken, not waited out"
    else:
        assert seen == ["failover", "failover", "steady"], seen
    assert m.delta("bulwark_retries_total", route=ROUTE, backend="primary") == 1
    assert m.delta("bulwark_fallbacks_total", route=ROUTE, backend="steady") == 1
    assert m.delta("bulwark_requests_total", route=ROUTE, backend="steady", status_class="2xx") == 1


@pytest.mark.parametrize("fault,status,code,error", [
    ("fault:500", 502, "upstream_unavailable", openai.InternalServerError),
    ("fault:close", 502, "upstream_unavailable", openai.InternalServerError),
    ("fault:slow", 504, "upstream_timeout", openai.InternalServerError),
])
def test_failure_without_fallback_is_an_openai_error(oai, sidecar, fault, status, code, error):
    up, m = Upstream(sidecar), Metrics(sidecar)
    t0 = time.monotonic()
    with pytest.raises(error) as err:
        ask(oai, "bare", fault)
    assert err.value.status_code == status
    assert err.value.code == code
    assert "only" in err.value.message, "the message names the backend that failed"
    assert len(up.new()) == (0 if fault == "fault:slow" else 1), "no retry without a retry policy"
    assert time.monotonic() - t0 < 4.0, "a slow first byte is cut at firstToken (1 s), not waited out"
    assert m.delta("bulwark_request_errors_total", code=code) == 1
    assert m.delta("bulwark_requests_total", route=ROUTE, backend="only", status_class="5xx") == 1


@pytest.mark.parametrize("fault,code", [
    ("fault:cut", "upstream_stream_broken"),
    ("fault:drop", "upstream_stream_broken"),
    ("fault:stall", "upstream_idle_timeout"),
])
def test_stream_broken_after_the_first_byte_ends_in_an_error_event(oai, sidecar, fault, code):
    up, m = Upstream(sidecar), Metrics(sidecar)
    deltas = []
    with pytest.raises(openai.APIError) as err:
        for chunk in oai.chat.completions.create(model="failover", stream=True,
                                                 messages=[{"role": "user", "content": fault}]):
            deltas += [c.delta.content for c in chunk.choices if c.delta.content]
    assert err.value.code == code, err.value
    if fault != "fault:stall":
        assert deltas, "what arrived before the break was passed on"
    assert "".join(deltas) != TEXT, "the stream never looks complete"
    assert [model for model, _ in up.new()] == ["failover"], "no retry or fallback once bytes reached the client"
    assert m.delta("bulwark_stream_errors_total", route=ROUTE, backend="primary") == 1
    assert m.delta("bulwark_requests_total", route=ROUTE, backend="primary", status_class="5xx") == 1
    assert m.delta("bulwark_fallbacks_total", route=ROUTE) == 0


def test_stream_error_event_on_the_wire(sidecar):
    """The raw bytes: the provider's events, then `event: error` with the code, and no `[DONE]`."""
    body = {"model": "bare", "stream": True, "messages": [{"role": "user", "content": "fault:cut"}]}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", sidecar["base"] + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            raw = b""
            with pytest.raises(httpx.RemoteProtocolError):
                for part in r.iter_raw():
                    raw += part
    events = raw.decode().strip().split("\n\n")
    assert events[0].startswith("data: {") and "chat.completion.chunk" in events[0]
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert error["code"] == "upstream_stream_broken" and error["type"] == "api_error"
    assert "[DONE]" not in raw.decode()


def test_anthropic_stream_cut_is_an_anthropic_error(sidecar):
    claude = anthropic.Anthropic(base_url=sidecar["base"], api_key="unused", max_retries=0, timeout=30)
    m = Metrics(sidecar)
    text = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with claude.messages.stream(model="claude-test", max_tokens=64,
                                    messages=[{"role": "user", "content": "fault:drop"}]) as s:
            for t in s.text_stream:
                text.append(t)
    assert text and "".join(text) != TEXT
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "api_error"
    assert "stream broke" in err.value.body["error"]["message"]
    assert m.delta("bulwark_stream_errors_total", route=ROUTE, backend="claude") == 1

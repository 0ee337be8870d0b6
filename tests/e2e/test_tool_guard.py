"""Secrets in tool calls, both ways, through the official SDKs: a tool call the model makes
(streamed in small pieces by a third-party mock, aimock, or sent whole) reaches the client with
the secret redacted and its arguments still valid JSON, assembled by the SDK's own stream
helpers; a tool call in the request's history reaches the provider redacted, as aimock's
journal shows."""

import json
import tempfile
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest

from conftest import BIN, free_port, start, start_aimock, stop

KEY = "AKIAIOSFODNN7EXAMPLE"
REDACTED = "[REDACTED_AWS_ACCESS_KEY_ID]"
ARGS = {"region": "eu", "aws_key": KEY, "note": 'say "hi"', "tags": ["a", KEY]}

FIXTURES = [
    # Arguments streamed four characters at a time: the key is cut across events.
    {"match": {"userMessage": "tool:key"}, "response": {"toolCalls": [{"name": "deploy", "arguments": ARGS}]},
     "chunkSize": 4},
    # The key hidden behind a JSON escape, in a second, parallel call.
    {"match": {"userMessage": "tool:two"}, "chunkSize": 3, "response": {"toolCalls": [
        {"name": "deploy", "arguments": {"region": "us"}},
        {"name": "rotate", "arguments": '{"old": "\\u0041KIAIOSFODNN7EXAMPLE"}'}]}},
    # Text first, then the call.
    {"match": {"userMessage": "tool:text"}, "chunkSize": 5,
     "response": {"content": f"calling with {KEY} now", "toolCalls": [{"name": "deploy", "arguments": ARGS}]}},
    {"match": {"userMessage": "history"}, "response": {"content": "noted"}},
]

ROUTES = """
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: tools}
spec:
  rules:
    - match: {paths: [/v1/messages]}
      backends: [{name: claude, provider: anthropic, url: "MOCK"}]
      scannerPolicyRef: {name: guard}
    - backends: [{name: gpt, provider: openai-compatible, url: "MOCK"}]
      scannerPolicyRef: {name: guard}
---
apiVersion: bulwark.dev/v1alpha1
kind: ScannerPolicy
metadata: {name: guard}
spec:
  input: [{type: secrets, action: redact}]
  output: [{type: secrets, action: redact}]
  streaming: {windowChars: 32}
"""

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("deploy", "rotate")]


@pytest.fixture(scope="module")
def env():
    mock, mock_url = start_aimock(FIXTURES, "aimock-tools")
    manifests = Path(tempfile.mkdtemp(prefix="bulwark-tools-"))
    (manifests / "routes.yaml").write_text(ROUTES.replace("MOCK", f"{mock_url}/v1"))
    port, admin = free_port(), free_port()
    sidecar = start([str(BIN / "bulwark-sidecar"), "--manifests", str(manifests), "--listen", str(port),
                     "--admin", str(admin)], f"http://127.0.0.1:{admin}/ready", "tools-sidecar")
    yield {"base": f"http://127.0.0.1:{port}", "mock": mock_url}
    stop(sidecar)
    stop(mock)


def oai(env):
    return openai.OpenAI(base_url=env["base"] + "/v1", api_key="unused", max_retries=0, timeout=30)


def claude(env):
    return anthropic.Anthropic(base_url=env["base"], api_key="unused", max_retries=0, timeout=30)


def expected(args):
    return json.loads(json.dumps(args).replace(KEY, REDACTED))


@pytest.mark.parametrize("stream", [True, False])
def test_an_openai_tool_call_reaches_the_client_redacted_and_valid(env, stream):
    client = oai(env)
    messages = [{"role": "user", "content": "tool:key"}]
    if stream:
        with client.chat.completions.stream(model="m", messages=messages, tools=TOOLS) as s:
            raw = [chunk.model_dump_json() for chunk in s]
            done = s.get_final_completion()
        assert not any(KEY in r for r in raw), "no event carries the key"
        assert len(raw) > 10, "the arguments came in pieces"
    else:
        done = client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
    call = done.choices[0].message.tool_calls[0]
    assert call.function.name == "deploy", "the name is sent once, not joined twice"
    assert json.loads(call.function.arguments) == expected(ARGS)
    assert done.choices[0].finish_reason == "tool_calls"


def test_parallel_openai_tool_calls_are_each_scanned_with_escapes_decoded(env):
    with oai(env).chat.completions.stream(model="m", messages=[{"role": "user", "content": "tool:two"}],
                                          tools=TOOLS) as s:
        done = s.get_final_completion()
    calls = done.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["deploy", "rotate"]
    assert json.loads(calls[0].function.arguments) == {"region": "us"}
    assert json.loads(calls[1].function.arguments) == {"old": REDACTED}


def test_text_then_a_tool_call_are_both_redacted(env):
    with oai(env).chat.completions.stream(model="m", messages=[{"role": "user", "content": "tool:text"}],
                                          tools=TOOLS) as s:
        done = s.get_final_completion()
    message = done.choices[0].message
    assert message.content == f"calling with {REDACTED} now"
    assert json.loads(message.tool_calls[0].function.arguments) == expected(ARGS)


@pytest.mark.parametrize("stream", [True, False])
def test_an_anthropic_tool_use_reaches_the_client_redacted_and_valid(env, stream):
    client = claude(env)
    kwargs = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "tool:key"}],
              "tools": [{"name": "deploy", "input_schema": {"type": "object"}}]}
    if stream:
        with client.messages.stream(**kwargs) as s:
            raw = [event.model_dump_json() for event in s]
            done = s.get_final_message()
        assert not any(KEY in r for r in raw)
    else:
        done = client.messages.create(**kwargs)
    use = next(b for b in done.content if b.type == "tool_use")
    assert use.name == "deploy"
    assert use.input == expected(ARGS), "the SDK parsed the streamed input as JSON"


def test_tool_calls_in_the_history_reach_the_provider_redacted(env):
    journal = env["mock"] + "/__aimock/journal"
    seen = len(json.load(urllib.request.urlopen(journal)))
    escaped = '{"old": "\\u0041KIAIOSFODNN7EXAMPLE", "n": 1}'
    oai(env).chat.completions.create(model="m", tools=TOOLS, messages=[
        {"role": "user", "content": "rotate it"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "rotate", "arguments": escaped}}]},
        {"role": "tool", "tool_call_id": "c1", "content": f"rotated {KEY}"},
        {"role": "user", "content": "history"},
    ])
    sent = json.load(urllib.request.urlopen(journal))[seen:]
    assert len(sent) == 1
    body = sent[0]["body"]
    assert KEY not in json.dumps(body) and "\\u0041KIA" not in json.dumps(body)
    assert json.loads(body["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"old": REDACTED, "n": 1}
    assert body["messages"][2]["content"] == f"rotated {REDACTED}"

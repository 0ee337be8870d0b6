"""Transparent capture in a network namespace of its own (run by test_transparent.py under
`unshare -n -m`, as root): test hosts are addresses on the namespace's loopback, named in a
private /etc/hosts; the sidecar runs as its own uid with --transparent; `bulwark-sidecar
redirect` installs the nat rules; clients that know nothing of the sidecar (curl, the openai
SDK) call the hosts by name. Exits non-zero with the failed check on stderr."""

import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BIN = Path(os.environ["BULWARK_BIN"]).resolve()
SIDECAR = str(BIN / "bulwark-sidecar")
PROXY_UID = 1337
LLM, OTHER, RAW, SECURE, PROXY = "198.51.100.10", "198.51.100.20", "198.51.100.30", "198.51.100.40", "198.51.100.50"
SECRET = "AKIAIOSFODNN7EXAMPLE"


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def network(tmp: Path):
    sh("ip", "link", "set", "lo", "up")
    for addr in (LLM, OTHER, RAW, SECURE, PROXY):
        sh("ip", "addr", "add", f"{addr}/32", "dev", "lo")
    hosts = tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{LLM} api.llm.test\n{OTHER} other.test\n{SECURE} chat.secure.test\n{PROXY} proxy.test\n")
    sh("mount", "--bind", str(hosts), "/etc/hosts")


class Provider(BaseHTTPRequestHandler):
    """An OpenAI-style provider at api.llm.test:80 that remembers what it was sent."""

    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        Provider.seen.append((self.headers.get("host"), body.decode()))
        out = json.dumps({
            "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class Plain(BaseHTTPRequestHandler):
    """Not an LLM: other.test answers with what reached it."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        out = f"direct host={self.headers.get('host')} via={self.headers.get('x-bulwark-route')}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class KeepAlive(Plain):
    """proxy.test: a forward proxy, as far as these tests go (HTTP/1.1, keep-alive, and it
    answers every GET itself)."""

    protocol_version = "HTTP/1.1"
    seen: list = []

    def do_GET(self):
        KeepAlive.seen.append(("GET", self.path))
        super().do_GET()

    def do_POST(self):
        KeepAlive.seen.append(("POST", self.path))
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()


def serve_http(addr, port, handler, tls=None):
    srv = ThreadingHTTPServer((addr, port), handler)
    if tls:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def serve_raw(addr, port, banner: bytes | None):
    """A TCP echo server, or (with a banner) one that speaks first."""
    lsock = socket.create_server((addr, port))

    def conn(c):
        with c:
            if banner:
                c.sendall(banner)
            while data := c.recv(65536):
                c.sendall(data)

    def loop():
        while True:
            c, _ = lsock.accept()
            threading.Thread(target=conn, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def certificate(tmp: Path, host: str) -> tuple[Path, Path]:
    key, cert = tmp / f"{host}.key", tmp / f"{host}.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={host}",
       "-addext", f"subjectAltName=DNS:{host}", "-addext", "basicConstraints=critical,CA:FALSE",
       "-addext", "extendedKeyUsage=serverAuth", "-keyout", str(key), "-out", str(cert))
    os.chmod(key, 0o644)
    return key, cert


def interception_ca(tmp: Path) -> Path:
    """The pod's CA, as a Kubernetes TLS Secret would hold it (tls.crt, tls.key)."""
    ca = tmp / "intercept"
    ca.mkdir()
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
       "-days", "1", "-subj", "/CN=bulwark interception CA", "-addext", "basicConstraints=critical,CA:TRUE",
       "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", str(ca / "tls.key"), "-out", str(ca / "tls.crt"))
    os.chmod(ca / "tls.key", 0o644)
    return ca


def tls_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


MANIFESTS = """apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: captured}
spec:
  rules:
    - match: {hosts: [api.llm.test, "*.llm.test"]}
      backends: [{name: provider, provider: openai-compatible, url: "http://api.llm.test/v1"}]
      scannerPolicyRef: {name: guard}
---
apiVersion: bulwark.dev/v1alpha1
kind: ScannerPolicy
metadata: {name: guard}
spec:
  input: [{type: secrets, action: redact}]
---
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: secure}
spec:
  rules:
    - match: {hosts: ["*.secure.test"]}
      backends: [{name: provider, provider: openai-compatible, url: "https://chat.secure.test/v1"}]
      scannerPolicyRef: {name: guard}
"""


def start_sidecar(tmp: Path, intercept: Path, upstream_ca: Path):
    manifests = tmp / "manifests"
    manifests.mkdir()
    (manifests / "routes.yaml").write_text(MANIFESTS)
    os.chmod(tmp, 0o755)
    log = open(tmp / "sidecar.log", "w")
    proc = subprocess.Popen(
        [SIDECAR, "--manifests", str(manifests), "--listen", "15080", "--admin", "15090", "--transparent", "15081",
         "--intercept-ca", str(intercept), "--upstream-ca", str(upstream_ca),
         "--max-body-bytes", "65536", "--header-timeout", "1s", "--body-timeout", "1s"],
        stdout=log, stderr=subprocess.STDOUT, user=PROXY_UID, group=PROXY_UID,
        env={**os.environ, "BULWARK_LOG": "debug"},
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with urllib.request.urlopen("http://127.0.0.1:15090/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the sidecar did not become ready:\n" + (tmp / "sidecar.log").read_text()[-3000:])


def metrics() -> str:
    with urllib.request.urlopen("http://127.0.0.1:15090/metrics", timeout=5) as r:
        return r.read().decode()


def counter(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def check(ok, what):
    if not ok:
        raise AssertionError(what)
    print("ok:", what.split(":")[0])


CLOSE = 0  # among a case's outcomes: the connection closed without a response


def exchange(sock, data: bytes, trickle: tuple[int, float] | None) -> int:
    """Sends `data` (with a trickle `(n, pause)`: its first n bytes, then a byte every pause) and
    reads a response head: its status, or CLOSE. A case with neither within 8 s is a hang, and
    fails."""
    sock.settimeout(8)
    try:
        if trickle:
            upfront, pause = trickle
            sock.sendall(data[:upfront])
            for i in range(upfront, len(data)):
                time.sleep(pause)
                sock.sendall(data[i:i + 1])
        else:
            sock.sendall(data)
    except OSError:
        pass  # closed while sending: the read says how
    got = b""
    try:
        while b"\r\n\r\n" not in got and (piece := sock.recv(4096)):
            got += piece
    except (ConnectionResetError, ssl.SSLError):
        pass
    except TimeoutError:
        raise AssertionError(f"no answer and no close within 8 s: {data[:80]!r}")
    if not got:
        return CLOSE
    if not got.startswith(b"HTTP/1."):
        raise AssertionError(f"not an HTTP response: {got[:80]!r}")
    return int(got[9:12])


SLOW = "POST /v1/chat/completions HTTP/1.1\r\nHost: HOST\r\nX-Slow: " + "z" * 60


def corpus(host: str):
    """Malformed and hostile requests to a routed host, each with the statuses it may get. Every
    one names the host first, so every one must be routed, and answered by the sidecar."""
    def post(body: bytes, headers: str = "", path: str = "/v1/chat/completions") -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nConnection: close\r\n"
                f"{headers}Content-Length: {len(body)}\r\n\r\n").encode() + body

    def head(text: str) -> bytes:
        return text.replace("HOST", host).encode()

    chat = lambda content: post(b'{"model":"m","messages":[{"role":"user","content":' + content + b"}]}")
    many = "".join(f"X-H{i}: v\r\n" for i in range(1000))
    return [
        ("truncated JSON", post(b'{"model":"m","mess'), None, {400}),
        ("deep JSON", post(b'{"model":"m","messages":' + b"[" * 20_000), None, {400}),
        ("huge JSON", chat(b'"' + b"a" * 200_000 + b'"'), None, {413}),
        ("invalid UTF-8", chat(b'"\xff\xfe"'), None, {400}),
        ("lone surrogate", chat(b'"\\ud800"'), None, {400}),
        ("NUL byte", post(b'{"model":"m",\0"messages":[]}'), None, {400}),
        ("wrong type", chat(b"5"), None, {400}),
        ("null message", post(b'{"model":"m","messages":[null]}'), None, {400}),
        ("not an object", post(b"[1, 2, 3]"), None, {400}),
        ("lying content-length", head("POST /v1/chat/completions HTTP/1.1\r\nHost: HOST\r\nContent-Length: 1000\r\n\r\n{"),
         None, {400, 408}),
        ("bad chunked encoding", head("POST /v1/chat/completions HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
         None, {400}),
        ("two content-lengths", head("POST /v1/chat/completions HTTP/1.1\r\nHost: HOST\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
         None, {400}),
        ("content-length and chunked", head("POST /v1/chat/completions HTTP/1.1\r\nHost: HOST\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
         None, {400}),
        # Heads longer than the sniffer reads, or with more headers than it parses: still routed.
        ("oversized header", post(b"{}", "X-Big: " + "b" * 600_000 + "\r\n"), None, {431, 400}),
        ("a thousand headers", post(b"{}", many), None, {431, 400}),
        # A head that never finishes: routed once its Host line is in, then cut by --header-timeout;
        # or trickled from its first byte, and cut before its Host is known (never passed through).
        ("slowloris", head(SLOW), (len(head(SLOW)) - 60, 0.05), {408, CLOSE}),
        ("slowloris from the first byte", head(SLOW), (0, 0.05), {408, CLOSE}),
        ("unknown method", head("BREW /v1/chat/completions HTTP/1.1\r\nHost: HOST\r\nConnection: close\r\n\r\n"), None, {404, 405}),
        ("path traversal", head("GET /../../etc/passwd HTTP/1.1\r\nHost: HOST\r\nConnection: close\r\n\r\n"), None, {400, 404}),
    ]


def fragmented_tls(addr, host: str, cafile: str, request: bytes, size: int = 40) -> bytes:
    """An HTTPS exchange whose ClientHello is cut into TLS records of `size` bytes: the answer."""
    tls_ctx = ssl.create_default_context(cafile=cafile)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    sock = socket.create_connection((addr, 443), timeout=8)
    first = [True]

    def flush():
        data = outgoing.read()
        if first[0] and data:
            first[0] = False
            n = int.from_bytes(data[3:5], "big")
            hello, rest = data[5:5 + n], data[5 + n:]
            data = b"".join(bytes([0x16, 3, 1]) + len(c).to_bytes(2, "big") + c
                            for c in (hello[i:i + size] for i in range(0, len(hello), size))) + rest
        sock.sendall(data)

    def pump():
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        incoming.write(data)

    with sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                pump()
        tls.write(request)
        flush()
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                pump()
        return answer


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def hostile(proc, ca: Path):
    """The hostile corpus on the transparent listener, over captured plain HTTP and intercepted
    TLS: every case is routed to the sidecar's L7 path and gets its 4xx (or a close), never a
    5xx or a hang; bytes that are not HTTP go on to the original destination; memory stays flat."""
    client_tls = ssl.create_default_context(cafile=str(ca / "tls.crt"))
    rss = []
    for round_ in range(3):
        before = metrics()
        routed = 0
        for addr, host, tls in ((LLM, "api.llm.test", False), (SECURE, "chat.secure.test", True)):
            cases = corpus(host)
            results = {}

            def run(case, addr=addr, host=host, tls=tls, results=results):
                name, data, trickle, _ = case
                sock = socket.create_connection((addr, 443 if tls else 80), timeout=8)
                if tls:
                    sock = client_tls.wrap_socket(sock, server_hostname=host)
                with sock:
                    try:
                        results[name] = exchange(sock, data, trickle)
                    except AssertionError as e:
                        results[name] = e

            threads = [threading.Thread(target=run, args=(c,)) for c in cases]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            for name, _, _, allowed in cases:
                got = results.get(name)
                check(got in allowed, f"round {round_} {host} {name}: got {got}, expected one of {sorted(allowed)}")
            routed += len(cases)
        after = metrics()
        grew = lambda protocol, action: counter(after, f'bulwark_transparent_connections_total{{protocol="{protocol}",action="{action}"}}') \
            - counter(before, f'bulwark_transparent_connections_total{{protocol="{protocol}",action="{action}"}}')
        # Over plain HTTP the head trickled from its first byte is cut by the sniffer; over TLS the
        # ClientHello came at once and the head is cut by the L7 listener.
        n = routed // 2
        got = (grew("http", "routed"), grew("http", "timeout"), grew("tls", "routed"), grew("http", "passthrough"))
        check(got == (n - 1, 1, n, 0), f"every case is routed by its Host, none passed through: {got}")
        rss.append(rss_kib(proc.pid))

    # Bytes that are not HTTP, or not an HTTP/1 head, go to the original destination, which
    # answers them itself; a ClientHello that never finishes is closed by the sidecar.
    before = metrics()
    for data in (b"\x00\x01\x02\xff\xfe garbage \r\n\r\n", b"GET / HTTP/7.0\r\nHost: api.llm.test\r\n\r\n",
                 b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
        with socket.create_connection((LLM, 80), timeout=8) as sock:
            sock.sendall(data)
            got = b""
            try:
                while piece := sock.recv(4096):
                    got += piece
            except ConnectionResetError:
                pass
            # Python's server answers the garbage as HTTP/0.9 (a bare page), HTTP/7.0 with a 505.
            origin = b"Error response" in got
            check(origin == (data[0] != 0x16), f"passed on to the provider, or closed: {data[:12]!r} {got[:60]!r}")
    after = metrics()
    grew = lambda protocol, action: counter(after, f'bulwark_transparent_connections_total{{protocol="{protocol}",action="{action}"}}') \
        - counter(before, f'bulwark_transparent_connections_total{{protocol="{protocol}",action="{action}"}}')
    got = (grew("other", "passthrough"), grew("tls", "timeout"), grew("tls", "passthrough"))
    check(got == (2, 1, 0), f"non-HTTP bytes passed through, a cut ClientHello closed: {got}")

    grown = rss[2] - min(rss[0], rss[2])
    check(grown < 16 << 10, f"RSS flat from the first round to the third: {rss} KiB")
    m = metrics()
    bad = [l for l in m.splitlines() if l.startswith("bulwark_requests_total") and 'status_class="5xx"' in l
           and not l.endswith(" 0")]
    check(not bad, f"no 5xx from the sidecar: {bad}")


def main():
    tmp = Path(tempfile.mkdtemp(prefix="bulwark-capture-"))
    network(tmp)
    serve_http(LLM, 80, Provider)
    serve_http(OTHER, 80, Plain)
    serve_http(PROXY, 80, KeepAlive)
    key, cert = certificate(tmp, "other.test")
    serve_http(OTHER, 443, Plain, tls_context(cert, key))
    skey, scert = certificate(tmp, "chat.secure.test")
    serve_http(SECURE, 443, Provider, tls_context(scert, skey))
    serve_raw(RAW, 80, None)
    serve_raw(RAW, 443, b"220 raw.test ready\r\n")
    ca = interception_ca(tmp)
    proc = start_sidecar(tmp, ca, scert)
    try:
        sh(SIDECAR, "redirect", "--proxy-uid", str(PROXY_UID), "--redirect-port", "15081", "--exclude-ports", "15080,15090")
        rules = sh("iptables", "-t", "nat", "-S").stdout
        check("-A OUTPUT -p tcp -j BULWARK_OUTPUT" in rules, f"the jump is installed: {rules}")

        # A plain-HTTP LLM call by curl, which knows nothing of the sidecar: routed and guarded.
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"my key is {SECRET}"}]})
        out = sh("curl", "-sS", "-D", "-", "http://api.llm.test/v1/chat/completions",
                 "-H", "content-type: application/json", "-d", body).stdout
        check(" 200" in out.splitlines()[0] and "x-bulwark-route: default/captured" in out.lower(),
              f"curl's call is routed by the sidecar: {out}")
        host, sent = Provider.seen[-1]
        check(SECRET not in sent and "my key is" in sent, f"the secret is redacted before the provider: {sent}")
        check(host == "api.llm.test", f"the provider is called by its name: {host}")

        # The openai SDK, pointed at the provider by name.
        import openai

        client = openai.OpenAI(base_url="http://api.llm.test/v1", api_key="unused", max_retries=0)
        resp = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": f"again {SECRET}"}])
        check(resp.headers.get("x-bulwark-route") == "default/captured", f"the SDK's call is routed: {resp.headers}")
        check(resp.parse().choices[0].message.content == "hello", "the SDK reads the answer")
        check(SECRET not in Provider.seen[-1][1], "the SDK's secret is redacted too")

        # Plain HTTP to a host no route names: passed through unchanged.
        out = sh("curl", "-sS", "http://other.test/").stdout
        check(out == "direct host=other.test via=None", f"plain HTTP to another host passes through: {out}")

        # HTTPS to another host: passed through; the client sees the real server's certificate.
        out = sh("curl", "-sS", "--cacert", str(cert), "https://other.test/").stdout
        check(out == "direct host=other.test via=None", f"TLS passes through with the real certificate: {out}")

        # HTTPS to a routed host, intercepted: the client trusts only the pod's CA; the call is
        # guarded and re-encrypted to the provider, whose own certificate the sidecar checks.
        out = sh("curl", "-sS", "-D", "-", "--cacert", str(ca / "tls.crt"), "https://chat.secure.test/v1/chat/completions",
                 "-H", "content-type: application/json", "-d", body).stdout
        check(" 200" in out.splitlines()[0] and "x-bulwark-route: default/secure" in out.lower(),
              f"HTTPS to a routed host is intercepted and routed: {out}")
        host, sent = Provider.seen[-1]
        check(SECRET not in sent and host == "chat.secure.test", f"guarded, then re-encrypted to the provider: {host} {sent}")
        os.environ["SSL_CERT_FILE"] = str(ca / "tls.crt")
        secure = openai.OpenAI(base_url="https://chat.secure.test/v1", api_key="unused", max_retries=0)
        resp = secure.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": f"tls {SECRET}"}])
        check(resp.headers.get("x-bulwark-route") == "default/secure", "the SDK, trusting the bundle, is intercepted")
        check(SECRET not in Provider.seen[-1][1], "and guarded")
        del os.environ["SSL_CERT_FILE"]
        out = subprocess.run(["curl", "-sS", "--cacert", str(ca / "tls.crt"), "https://other.test/"],
                             capture_output=True, text=True)
        check(out.returncode != 0, "an unrouted host keeps its own certificate, which the CA did not sign")

        # A byte stream that is not HTTP, and a server that speaks first.
        blob = bytes(range(256)) * 64
        with socket.create_connection((RAW, 80), timeout=5) as s:
            s.sendall(blob)
            got = b""
            while len(got) < len(blob):
                got += s.recv(65536)
        check(got == blob, "a non-HTTP byte stream passes through intact")
        with socket.create_connection((RAW, 443), timeout=5) as s:
            banner = s.recv(100)
        check(banner == b"220 raw.test ready\r\n", f"a server-first protocol gets its banner through: {banner!r}")

        m = metrics()
        routed = counter(m, 'bulwark_transparent_connections_total{protocol="http",action="routed"}')
        plain = counter(m, 'bulwark_transparent_connections_total{protocol="http",action="passthrough"}')
        tls_n = counter(m, 'bulwark_transparent_connections_total{protocol="tls",action="passthrough"}')
        other = counter(m, 'bulwark_transparent_connections_total{protocol="other",action="passthrough"}')
        # The sidecar's own calls to api.llm.test:80 are not captured again: two routed
        # connections (curl's and the SDK's), not four.
        tls_routed = counter(m, 'bulwark_transparent_connections_total{protocol="tls",action="routed"}')
        check((routed, plain, tls_n, other, tls_routed) == (2, 1, 2, 2, 2),
              f"connections counted once each: {routed, plain, tls_n, other, tls_routed}")
        up = counter(m, 'bulwark_transparent_passthrough_bytes_total{direction="upstream"}')
        check(up >= len(blob), f"passthrough bytes counted: {up}")

        # curl through a forward proxy at proxy.test: the proxy's keep-alive connection first
        # carries a request for other.test (passed through), then one for api.llm.test, which the
        # sidecar serves and guards once the first is answered (the proxy never sees it), then
        # one for other.test again, which the sidecar sends on to the proxy.
        proxy = ["-x", "http://proxy.test:80"]
        out = subprocess.run(["curl", "-sS", "-v", *proxy, "http://other.test/", "--next", *proxy, "-D", "-",
                              "http://api.llm.test/v1/chat/completions", "-H", "content-type: application/json", "-d", body,
                              "--next", *proxy, "http://other.test/again"],
                             capture_output=True, text=True, check=True)
        check(out.stderr.count("Re-using existing") == 2, f"curl used one connection for all three: {out.stderr}")
        check(out.stdout.startswith("direct host=other.test via=None") and "x-bulwark-route: default/captured" in out.stdout.lower()
              and '"hello"' in out.stdout, f"the first passes through, the second is routed: {out.stdout}")
        check(out.stdout.endswith("}direct host=other.test via=None"), f"and the third goes on to the proxy: {out.stdout}")
        host, sent = Provider.seen[-1]
        check(host == "api.llm.test" and SECRET not in sent, f"and guarded: {host} {sent}")

        later = metrics()
        grew = lambda action: counter(later, f'bulwark_transparent_connections_total{{protocol="http",action="{action}"}}') - counter(m, f'bulwark_transparent_connections_total{{protocol="http",action="{action}"}}')
        check((grew("passthrough"), grew("rerouted"), grew("routed")) == (1, 1, 0),
              f"one connection, passed through then routed: {grew('passthrough'), grew('rerouted'), grew('routed')}")
        # Requests on a passed-through connection that a server could frame another way are not
        # passed on: the one before is answered, then the connection closes, and the request
        # hidden behind the ambiguous one never reaches the proxy.
        hidden = (f"POST http://api.llm.test/v1/chat/completions HTTP/1.1\r\nHost: api.llm.test\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}")
        ambiguous = [
            f"POST /cl-te HTTP/1.1\r\nHost: other.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}",
            f"POST /two-cl HTTP/1.1\r\nHost: other.test\r\nContent-Length: 0\r\nContent-Length: {len(hidden)}\r\n\r\n{hidden}",
            f"POST /te HTTP/1.1\r\nHost: other.test\r\nTransfer-Encoding: xchunked\r\n\r\n{hidden}",
            f"POST /chunks HTTP/1.1\r\nHost: other.test\r\nTransfer-Encoding: chunked\r\n\r\n3;\nabc\r\n0\r\n\r\n{hidden}",
            "\x00\x01 not a request",
        ]
        malformed_before = counter(metrics(), 'bulwark_transparent_connections_total{protocol="http",action="malformed"}')
        for case in ambiguous:
            seen_before = len(KeepAlive.seen)
            with socket.create_connection((PROXY, 80), timeout=8) as s:
                s.sendall(b"GET /first HTTP/1.1\r\nHost: other.test\r\n\r\n" + case.encode())
                got = b""
                while piece := s.recv(65536):
                    got += piece
            # A chunked head goes on before its bad chunk: this proxy, reading no body, answers it.
            expect = [("GET", "/first")] + ([("POST", "/chunks")] if "/chunks" in case else [])
            check(got.startswith(b"HTTP/1.1 200") and got.count(b"HTTP/1.") == len(expect),
                  f"the requests before are answered, then the connection closes: {case[:40]!r} {got!r}")
            sent_on = KeepAlive.seen[seen_before:]
            check(sent_on == expect, f"nothing after it reaches the proxy: {case[:40]!r} {sent_on}")
        malformed = counter(metrics(), 'bulwark_transparent_connections_total{protocol="http",action="malformed"}')
        check(malformed - malformed_before == len(ambiguous), f"each is counted as malformed: {malformed - malformed_before}")

        # A ClientHello cut into many small records is put together: still intercepted, guarded.
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: chat.secure.test\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}").encode()
        calls = len(Provider.seen)
        answer = fragmented_tls(SECURE, "chat.secure.test", str(ca / "tls.crt"), request).decode(errors="replace")
        check(" 200" in answer.splitlines()[0] and "x-bulwark-route: default/secure" in answer.lower(),
              f"a ClientHello in 40-byte records is intercepted and routed: {answer[:300]}")
        check(len(Provider.seen) == calls + 1 and SECRET not in Provider.seen[-1][1], "and guarded")

        hostile(proc, ca)

        # The rules: idempotent, and removable.
        sh(SIDECAR, "redirect", "--proxy-uid", str(PROXY_UID), "--redirect-port", "15081", "--exclude-ports", "15080,15090")
        again = sh("iptables", "-t", "nat", "-S").stdout
        check(again == rules, f"installing again changes nothing: {again}")
        sh(SIDECAR, "redirect", "--remove")
        left = sh("iptables", "-t", "nat", "-S").stdout
        check("BULWARK" not in left, f"--remove deletes the chains: {left}")
        out = sh("curl", "-sS", "-D", "-", "http://api.llm.test/v1/chat/completions", "-d", body).stdout
        check("x-bulwark-route" not in out.lower(), "without the rules, calls go direct")
    except Exception:
        print((tmp / "sidecar.log").read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()

//! Malformed and hostile input over raw sockets and HTTP/2, on the sidecar's LLM and admin
//! listeners and the operator's stream and webhook ports. Each case gets a clear 4xx, or the
//! connection is closed for bytes that are not HTTP: never a 5xx, a panic or a hang; the
//! process still serves afterwards and its memory stays bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{net::SocketAddr, time::Duration};

use bulwark_tests::{harness::Harness, mock::MockProvider, procfs::rss_kib};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// What a connection got back.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A response with this status.
    Status(u16),
    /// Closed (or reset) without a response.
    Closed,
}

/// Longest a case may take to be answered or closed (the operator gives headers 5 s).
const ANSWER: Duration = Duration::from_secs(8);

/// The tests measure memory and share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sends `bytes` (in pieces `every` apart, if given), then waits for a response head or the
/// connection's end. A case that gets neither within `ANSWER` fails: that is a hang.
async fn send(addr: SocketAddr, bytes: &[u8], trickle: Option<(usize, Duration)>) -> Outcome {
    send_on(TcpStream::connect(addr).await.unwrap(), bytes, trickle).await
}

/// `send` over TLS, trusting `ca` for `localhost`.
async fn send_tls(addr: SocketAddr, ca: &std::path::Path, bytes: &[u8], trickle: Option<(usize, Duration)>) -> Outcome {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    send_on(tls, bytes, trickle).await
}

async fn send_on<S>(stream: S, bytes: &[u8], trickle: Option<(usize, Duration)>) -> Outcome
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write = async {
        match trickle {
            None => {
                let _ = wr.write_all(bytes).await;
                let _ = wr.flush().await;
            }
            Some((size, every)) => {
                for piece in bytes.chunks(size) {
                    if wr.write_all(piece).await.is_err() || wr.flush().await.is_err() {
                        break;
                    }
                    tokio::time::sleep(every).await;
                }
            }
        }
        // Not closed for writing: a server must not wait for the client to give up.
        std::future::pending::<()>().await;
    };
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        got
    };
    let got = tokio::time::timeout(ANSWER, async {
        tokio::select! {
            got = read => got,
            () = write => unreachable!(),
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("no answer and no close within {ANSWER:?}: {:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(80)]))
    });
    let head = String::from_utf8_lossy(&got);
    match head.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|c| c.parse().ok()) {
        Some(code) => Outcome::Status(code),
        None if got.is_empty() => Outcome::Closed,
        // A TLS port answers bytes that are not TLS with an alert, then closes.
        None if got[0] == 0x15 => Outcome::Closed,
        None => panic!("not an HTTP response: {head:?}"),
    }
}

const GOAWAY: u8 = 7;

/// Sends `bytes` and reads HTTP/2 frames until the server closes: their types.
async fn h2_frames(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(ANSWER, s.read_to_end(&mut got)).await.expect("closed in time").unwrap_or_default();
    let mut types = vec![];
    let mut at = 0;
    while at + 9 <= got.len() {
        let len = (usize::from(got[at]) << 16) | (usize::from(got[at + 1]) << 8) | usize::from(got[at + 2]);
        types.push(got[at + 3]);
        at += 9 + len;
    }
    types
}

fn post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A case: its name, its bytes, how they trickle (piece size, pause), what may answer.
type Case = (&'static str, Vec<u8>, Option<(usize, Duration)>, &'static [u16]);

/// The cases every HTTP listener gets, and what each may answer (`CLOSE`: a close).
fn http_corpus(path: &str) -> Vec<Case> {
    let chat = |body: &str| post(path, "", body.as_bytes());
    let deep = format!("{{\"model\":\"gpt-4\",\"messages\":{}", "[".repeat(20_000));
    let huge =
        format!("{{\"model\":\"gpt-4\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}", "a".repeat(200_000));
    let lying = format!(
        "POST {path} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
    )
    .into_bytes();
    let slow = format!("POST {path} HTTP/1.1\r\nHost: sidecar\r\nX-Slow: {}\r\n\r\n", "z".repeat(200)).into_bytes();
    vec![
        ("truncated JSON", chat("{\"model\":\"gpt-4\",\"mess"), None, &[400]),
        ("deep JSON", chat(&deep), None, &[400]),
        ("huge JSON", chat(&huge), None, &[413]),
        ("invalid UTF-8", post(path, "", b"{\"model\":\"gpt-4\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"), None, &[400]),
        ("lone surrogate", chat(r#"{"model":"gpt-4","messages":[{"role":"user","content":"\ud800"}]}"#), None, &[400]),
        ("NUL byte", post(path, "", b"{\"model\":\"gpt-4\",\0\"messages\":[]}"), None, &[400]),
        ("wrong type", chat(r#"{"model":"gpt-4","messages":[{"role":"user","content":5}]}"#), None, &[400]),
        ("null message", chat(r#"{"model":"gpt-4","messages":[null]}"#), None, &[400]),
        ("not an object", chat("[1, 2, 3]"), None, &[400]),
        ("lying content-length", lying, None, &[400, 408]),
        (
            "bad chunked encoding",
            format!("POST {path} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").into_bytes(),
            None,
            &[400],
        ),
        (
            "two content-lengths",
            format!("POST {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}").into_bytes(),
            None,
            &[400],
        ),
        (
            "content-length and chunked",
            format!("POST {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes(),
            None,
            &[400],
        ),
        ("oversized header", post(path, &format!("X-Big: {}\r\n", "b".repeat(600_000)), b"{}"), None, &[431, 400]),
        (
            "a thousand headers",
            post(path, &(0..1000).map(|i| format!("X-H{i}: v\r\n")).collect::<String>(), b"{}"),
            None,
            &[431, 400],
        ),
        ("duplicate authorization", post(path, "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n", b"{\"model\":\"gpt-4\",\"messages\":[]}"), None, &[200, 400, 404]),
        // Headers that never finish: the connection is closed when the header timeout runs out.
        ("slowloris", slow, Some((1, Duration::from_millis(100))), &[408, CLOSE]),
        ("garbage", b"\x00\x01\x02\xff\xfe garbage \r\n\r\n".to_vec(), None, &[400]),
        ("TLS on a plain port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), None, &[400]),
        ("unknown method", format!("BREW {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes(), None, &[404, 405]),
        ("path traversal", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), None, &[400, 404]),
        ("bad version", format!("GET {path} HTTP/7.0\r\nHost: x\r\n\r\n").into_bytes(), None, &[400]),
    ]
}

/// Stands for a close among a case's allowed outcomes.
const CLOSE: u16 = 0;

/// The outcomes allowed for a case: one of `statuses` (`CLOSE` for a close without a response).
fn check(name: &str, got: &Outcome, statuses: &[u16]) {
    let ok = match got {
        Outcome::Status(s) => statuses.contains(s),
        Outcome::Closed => statuses.contains(&CLOSE),
    };
    assert!(ok, "{name}: got {got:?}, expected one of {statuses:?} (0: a close)");
    if let Outcome::Status(s) = got {
        assert!(*s < 500, "{name}: a {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_listeners_answer_hostile_input_with_4xx_or_a_close() {
    let _serial = SERIAL.lock().await;
    let mock = MockProvider::start().await;
    let yaml = format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: chat}}\nspec:\n  rules:\n  - match: {{models: [\"gpt-*\"]}}\n    backends: [{{name: a, url: '{}'}}]\n",
        mock.url()
    );
    let env = Harness::start("bulwark-hostile", &yaml, |o| {
        o.limits.max_body_bytes = 64 << 10;
        o.limits.body_timeout = Duration::from_secs(1);
        o.limits.header_timeout = Duration::from_secs(1);
    })
    .await
    .unwrap();
    let (proxy, admin) = (env.sidecar.proxy_addr, env.sidecar.admin_addr);
    let mut rss = vec![];
    for round in 0..3 {
        for (addr, path) in
            [(proxy, "/v1/chat/completions"), (proxy, "/v1/messages"), (admin, "/rollouts/default/x/promote")]
        {
            let cases = http_corpus(path);
            let runs: Vec<_> = cases
                .into_iter()
                .map(|(name, bytes, trickle, statuses)| {
                    tokio::spawn(async move { (name, send(addr, &bytes, trickle).await, statuses) })
                })
                .collect();
            for run in runs {
                let (name, got, statuses) = run.await.unwrap();
                let statuses: &[u16] = if addr == admin && !statuses.contains(&431) && name != "slowloris" {
                    // The admin listener has no LLM API: any 4xx, as long as it is one.
                    &[400, 404, 405, 408, 413]
                } else {
                    statuses
                };
                check(&format!("round {round} {addr} {path} {name}"), &got, statuses);
            }
        }
        rss.push(rss_kib(std::process::id()).unwrap());
    }
    // The first round sets the allocator's high-water mark; a leak would grow every round.
    let grown = rss[2] - rss[0].min(rss[2]);
    assert!(grown < 16 << 10, "RSS grew by {grown} KiB from the first round of the corpus to the third ({rss:?})");

    // HTTP/2: a bad body gets its 400; frames that are not HTTP/2 end the connection.
    let h2 = bulwark_tests::client::Client::h2(format!("http://{proxy}"));
    let r = h2.raw(http::Method::POST, "/v1/chat/completions", "{\"model\": 5}", &[]).await.unwrap();
    assert_eq!(r.status, 400);
    let big = "h".repeat(100 << 10);
    assert!(
        h2.raw(http::Method::POST, "/v1/chat/completions", "{}", &[("x-big", &big)])
            .await
            .map_or(true, |r| r.status == 431),
        "an oversized header list is refused"
    );
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(b"\x00\x00\x04\x09\x00\x00\x00\x00\x01garbage frame");
    assert_eq!(h2_frames(proxy, &preface).await.last(), Some(&GOAWAY), "a GOAWAY, then the end");

    // Everything still works.
    let ok = env
        .client
        .post("/v1/chat/completions", &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}), &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    let metrics = env.metrics().await.unwrap();
    assert!(
        !metrics.lines().any(|l| l.starts_with("bulwark_requests_total")
            && l.contains("status_class=\"5xx\"")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    env.sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_stream_and_webhook_answer_hostile_input_with_4xx_or_a_close() {
    let _serial = SERIAL.lock().await;
    use bulwark_tests::cluster::{Cluster, free_port};
    let Some(c) = Cluster::start("bulwark-hostile-operator").await.unwrap() else { return };
    c.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: bot-1, namespace: shop, labels: {app: bot, bulwark.dev/inject: \"true\"}}\nspec:\n  serviceAccountName: default\n  containers: [{name: app, image: example/app}]\n",
    )
    .unwrap();
    let token = std::fs::read_to_string(c.token("shop", "default", "bot-1").unwrap()).unwrap();
    let (stream, webhook) = (free_port().unwrap(), free_port().unwrap());
    let op = c
        .operator(
            "op-1",
            stream,
            &[
                &format!("--webhook-listen=127.0.0.1:{webhook}"),
                "--sidecar-image=bulwark-sidecar:test",
                &format!("--stream-url=https://localhost:{stream}"),
            ],
        )
        .unwrap();
    let (stream_addr, webhook_addr): (SocketAddr, SocketAddr) =
        (([127, 0, 0, 1], stream).into(), ([127, 0, 0, 1], webhook).into());
    for addr in [stream_addr, webhook_addr] {
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let before = rss_kib(op.proc.pid()).unwrap();
    let auth = format!("Authorization: Bearer {}\r\n", token.trim());
    // Without a token, with one (the report's body is read), and on the webhook.
    let targets = [
        (stream_addr, "/v1/report", String::new()),
        (stream_addr, "/v1/report", auth),
        (webhook_addr, "/inject", String::new()),
    ];
    for (addr, path, extra) in &targets {
        let cases = http_corpus(path);
        for (name, mut bytes, trickle, _) in cases {
            if let Some(at) = bytes.windows(2).position(|w| w == b"\r\n").filter(|_| !extra.is_empty()) {
                bytes.splice(at + 2..at + 2, extra.bytes());
            }
            let got = send_tls(*addr, &c.tls.ca, &bytes, trickle).await;
            // Any clear refusal; a close only for headers that never finish.
            let allowed: &[u16] =
                if name == "slowloris" { &[408, CLOSE] } else { &[400, 401, 404, 405, 408, 413, 431] };
            check(&format!("{addr} {path} {} {name}", if extra.is_empty() { "" } else { "(token)" }), &got, allowed);
        }
        // Bytes that are not TLS at all: an alert and a close.
        for (name, bytes, _, _) in http_corpus(path).into_iter().take(3) {
            check(&format!("{addr} plain {name}"), &send(*addr, &bytes, None).await, &[CLOSE]);
        }
    }
    // A report with a valid token and a body of the wrong shape gets a 400 that says why.
    let report = post("/v1/report", &format!("Authorization: Bearer {}\r\n", token.trim()), br#"{"outcomes": "many"}"#);
    assert_eq!(send_tls(stream_addr, &c.tls.ca, &report, None).await, Outcome::Status(400));
    let grown = rss_kib(op.proc.pid()).unwrap().saturating_sub(before);
    assert!(grown < 64 << 10, "the operator's RSS grew by {grown} KiB");
    // Still serving: a real review is answered.
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u-1",
        "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE", "namespace": "shop",
        "object": {"metadata": {"name": "p", "namespace": "shop"}, "spec": {"containers": []}}}});
    let ok = post("/inject", "", review.to_string().as_bytes());
    assert_eq!(send_tls(webhook_addr, &c.tls.ca, &ok, None).await, Outcome::Status(200));
}

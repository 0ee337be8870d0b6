//! Rollout signals from a Prometheus the user runs: each query of `analysis.prometheus` is run
//! against the Prometheus HTTP API (`GET /api/v1/query`) for the canary, and for the stable
//! where a threshold is relative; its one number replaces that signal from the reports.

use std::time::Duration;

use bulwark_api::rollout::{ModelRolloutSpec, PrometheusSignals, analysis::Measured};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use serde_json::Value;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Largest query answer read.
const MAX_ANSWER: usize = 1 << 20;

pub fn client() -> anyhow::Result<HttpClient> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

/// `$backend`, `$route`, `$namespace` and `$window` replaced in a query.
pub fn render(query: &str, namespace: &str, route: &str, backend: &str, window: Duration) -> String {
    query
        .replace("$backend", backend)
        .replace("$route", route)
        .replace("$namespace", namespace)
        .replace("$window", &format!("{}s", window.as_secs().max(1)))
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The one number of a query answer: a scalar, or a vector of exactly one sample; `None` for
/// an empty vector (no series yet: nothing to measure, which is no verdict rather than an error).
pub fn number(answer: &Value) -> Result<Option<f64>, String> {
    if answer["status"] != "success" {
        let why = answer["error"].as_str().unwrap_or("no reason given");
        return Err(format!("Prometheus refused the query: {why}"));
    }
    let data = &answer["data"];
    let sample = match data["resultType"].as_str() {
        Some("scalar") => &data["result"],
        Some("vector") => match data["result"].as_array().map(Vec::as_slice) {
            Some([one]) => &one["value"],
            Some([]) => return Ok(None),
            Some(many) => return Err(format!("the query returned {} samples; it must return one", many.len())),
            None => return Err("the answer has no result".into()),
        },
        other => return Err(format!("the query returned a {}; it must return one number", other.unwrap_or("nothing"))),
    };
    let text = sample.get(1).and_then(Value::as_str).ok_or("a sample without a value")?;
    let v: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    // 0/0 (no requests in the window) is NaN: nothing to measure either.
    if v.is_nan() {
        return Ok(None);
    }
    if v.is_finite() { Ok(Some(v)) } else { Err(format!("the query returned {text}")) }
}

/// Runs one instant query.
pub async fn query(client: &HttpClient, p: &PrometheusSignals, promql: &str) -> Result<Option<f64>, String> {
    let url = format!("{}/api/v1/query?query={}", p.address.trim_end_matches('/'), encode(promql));
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let req = http::Request::get(uri).body(Empty::new()).map_err(|e| e.to_string())?;
    let answer = async {
        let resp = client.request(req).await.map_err(|e| format!("{}: {e}", p.address))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER).collect().await.map_err(|e| e.to_string())?.to_bytes();
        let v: Value = serde_json::from_slice(&body)
            .map_err(|_| format!("{}: answered {status} with a body that is not the query API's JSON", p.address))?;
        Ok::<_, String>(v)
    };
    let v = tokio::time::timeout(p.timeout.as_std(), answer)
        .await
        .map_err(|_| format!("{} did not answer within {}", p.address, p.timeout))??;
    number(&v)
}

/// Replaces the signals the spec reads from Prometheus in `canary` (and in `stable` where a
/// relative threshold needs them), or says which query failed. `window` is the analysis window
/// as it is now: never longer than the attempt has run. The queries run at once.
pub async fn measure(
    client: &HttpClient,
    spec: &ModelRolloutSpec,
    namespace: &str,
    window: Duration,
    canary: &mut Measured,
    stable: &mut Measured,
) -> Result<(), String> {
    let a = &spec.analysis;
    let Some(p) = &a.prometheus else { return Ok(()) };
    let relative = a.max_error_rate_increase.is_some()
        || a.max_p95_latency_increase.is_some()
        || a.max_p95_first_token_increase.is_some()
        || a.max_block_rate_increase.is_some();
    let route = &spec.route_ref.name;
    let mut asked = vec![];
    for (signal, q) in &p.queries {
        asked.push((signal.as_str(), true, render(q, namespace, route, &spec.canary.backend, window)));
        if relative || signal == "requests" {
            asked.push((signal.as_str(), false, render(q, namespace, route, &spec.stable.backend, window)));
        }
    }
    let answers = futures_util::future::join_all(asked.iter().map(|(_, _, promql)| query(client, p, promql))).await;
    for ((signal, of_canary, _), answer) in asked.into_iter().zip(answers) {
        let whose = if of_canary { "canary" } else { "stable" };
        let value = answer.map_err(|e| format!("{signal} of the {whose}: {e}"))?;
        if of_canary { canary.set(signal, value) } else { stable.set(signal, value) }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn queries_are_rendered_and_answers_read_as_one_number() {
        let q = r#"sum(rate(x{namespace="$namespace",route="$route",backend="$backend"}[$window]))"#;
        assert_eq!(
            render(q, "shop", "chat", "canary", Duration::from_secs(120)),
            r#"sum(rate(x{namespace="shop",route="chat",backend="canary"}[120s]))"#
        );
        assert_eq!(encode(r#"a{b="c"} / 2"#), "a%7Bb%3D%22c%22%7D%20%2F%202");
        let vector = |result: Value| json!({"status": "success", "data": {"resultType": "vector", "result": result}});
        assert_eq!(number(&vector(json!([{"metric": {}, "value": [1.0, "0.25"]}]))), Ok(Some(0.25)));
        let scalar = json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}});
        assert_eq!(number(&scalar), Ok(Some(3.0)));
        assert_eq!(number(&vector(json!([]))), Ok(None), "no series yet: nothing to measure");
        assert_eq!(number(&vector(json!([{"value": [1, "NaN"]}]))), Ok(None), "0/0: nothing to measure");
        let two = vector(json!([{"value": [1, "1"]}, {"value": [1, "2"]}]));
        assert_eq!(number(&two), Err("the query returned 2 samples; it must return one".into()));
        assert_eq!(number(&vector(json!([{"value": [1, "+Inf"]}]))), Err("the query returned +Inf".into()));
        let refused = json!({"status": "error", "errorType": "bad_data", "error": "parse error at char 3"});
        assert_eq!(number(&refused), Err("Prometheus refused the query: parse error at char 3".into()));
    }
}

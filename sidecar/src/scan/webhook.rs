//! The `webhook` scanner: an external guardrail service, called over HTTP(S). The texts of a
//! request or an answer are POSTed as JSON; the service answers pass, redact (the texts
//! rewritten) or block (with a reason). Calls are bounded in time (`timeout`, per attempt,
//! waiting for a slot included) and in number (`maxConcurrency` per sidecar), retried after a
//! connection failure, a timeout, a 429 or a 5xx; a bearer token and a client certificate are
//! read from files (mounted Secrets) and never logged.
//!
//! ```json
//! → {"direction": "input", "policy": "team-a/guard", "route": "team-a/chat",
//!    "texts": [{"text": "...", "source": "user"}, {"text": "...", "source": "tool"}]}
//! ← {"verdict": "pass"}
//! ← {"verdict": "block", "reason": "toxic language"}
//! ← {"verdict": "redact", "texts": [null, "the card is [CARD]"], "reason": "card number"}
//! ```
//!
//! `texts` in a redact verdict has one entry per text sent, `null` for one left as it is.

use std::{path::Path, sync::Arc, time::Duration};

use bulwark_api::{
    config::CredentialSource,
    policy::{Source, Webhook as Spec},
    route::Credentials,
};
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use serde::{Deserialize, Serialize};
use tokio::{sync::Semaphore, time::Instant};

use crate::{
    credentials::Credential,
    upstream::{self, Ca, Identity},
};

/// The longest answer read from a service.
const MAX_ANSWER: usize = 8 << 20;

pub struct Webhook {
    url: http::Uri,
    /// The URL as errors show it: without credentials or a query.
    shown: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    retries: u32,
    slots: Arc<Semaphore>,
    token: Option<Credential>,
}

#[derive(Serialize)]
struct Call<'a> {
    direction: &'a str,
    policy: &'a str,
    route: &'a str,
    texts: Vec<CallText<'a>>,
}

#[derive(Serialize)]
struct CallText<'a> {
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'static str>,
}

/// A service's verdict.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "verdict", rename_all = "camelCase")]
pub enum Answer {
    Pass,
    Block {
        #[serde(default)]
        reason: Option<String>,
    },
    Redact {
        texts: Vec<Option<String>>,
        #[serde(default)]
        reason: Option<String>,
    },
}

impl Webhook {
    pub fn new(spec: &Spec) -> Result<Self, String> {
        let url: http::Uri = spec.url.parse().map_err(|e| format!("the webhook url is not a URL: {e}"))?;
        let identity = match &spec.client_certificate {
            Some(c) => match (&c.cert_file, &c.key_file) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                _ => return Err("the client certificate's Secret is mounted only by the operator's compile".into()),
            },
            None => None,
        };
        let ca = spec.ca_file.as_ref().map(|f| Ca::File(f.into()));
        let connector = upstream::connector_as(
            ca.as_ref(),
            identity.as_ref().map(|(cert, key)| Identity { cert: Path::new(cert), key: Path::new(key) }),
            false,
        )
        .map_err(|e| format!("{e:#}"))?;
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        let token = match &spec.bearer_token {
            None => None,
            Some(Credentials { env: Some(name), .. }) => Some(CredentialSource::Env { name: name.clone() }),
            Some(Credentials { file: Some(path), .. }) => Some(CredentialSource::File { path: path.clone() }),
            Some(_) => return Err("the bearer token's Secret is mounted only by the operator's compile".into()),
        };
        let host = url.host().unwrap_or_default();
        let shown = match url.port_u16() {
            Some(port) => format!("{}://{host}:{port}{}", url.scheme_str().unwrap_or("http"), url.path()),
            None => format!("{}://{host}{}", url.scheme_str().unwrap_or("http"), url.path()),
        };
        Ok(Self {
            url,
            shown,
            client,
            timeout: spec.timeout.map_or(Duration::from_secs(1), |t| t.as_std()),
            retries: spec.retries.unwrap_or(1),
            slots: Arc::new(Semaphore::new(spec.max_concurrency.unwrap_or(16).max(1) as usize)),
            token: token.map(Credential::new),
        })
    }

    /// Asks the service about `texts`. An error says why the call failed, never the token.
    pub async fn call(
        &self,
        direction: &str,
        policy: &str,
        route: &str,
        texts: &[&str],
        sources: Option<&[Source]>,
    ) -> Result<Answer, String> {
        let call = Call {
            direction,
            policy,
            route,
            texts: texts
                .iter()
                .enumerate()
                .map(|(i, text)| CallText { text, source: sources.and_then(|s| s.get(i)).map(|s| s.as_str()) })
                .collect(),
        };
        let body = Bytes::from(serde_json::to_vec(&call).map_err(|e| e.to_string())?);
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(25 << attempt.min(5))).await;
            }
            match tokio::time::timeout(self.timeout, self.attempt(body.clone())).await {
                Ok(Ok(answer)) => return check(answer, texts.len()),
                Ok(Err((e, false))) => return Err(e),
                Ok(Err((e, true))) => last = e,
                Err(_) => last = format!("no answer within {}ms", self.timeout.as_millis()),
            }
        }
        Err(last)
    }

    /// One call; an error says whether it is worth another try.
    async fn attempt(&self, body: Bytes) -> Result<Answer, (String, bool)> {
        let _slot = self.slots.acquire().await.map_err(|_| ("the webhook is closed".to_owned(), false))?;
        let mut req = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            let key = token.get(Instant::now()).map_err(|e| (e, false))?;
            let mut bearer = http::HeaderValue::from_bytes(&[b"Bearer ", key.as_bytes()].concat())
                .map_err(|_| ("the token cannot be sent in a header".to_owned(), false))?;
            bearer.set_sensitive(true);
            req = req.header(header::AUTHORIZATION, bearer);
        }
        let req = req.body(Full::new(body)).map_err(|e| (e.to_string(), false))?;
        let resp = self.client.request(req).await.map_err(|e| (format!("calling {}: {e}", self.shown), true))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| (format!("reading the answer of {}: {e}", self.shown), true))?
            .to_bytes();
        if status != StatusCode::OK {
            let retry = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            return Err((format!("{} answered {status}", self.shown), retry));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| (format!("{} answered what is not a verdict: {e}", self.shown), false))
    }
}

/// A redact verdict names one text per text sent.
fn check(answer: Answer, sent: usize) -> Result<Answer, String> {
    match &answer {
        Answer::Redact { texts, .. } if texts.len() != sent => {
            Err(format!("the redact verdict has {} texts for the {sent} sent", texts.len()))
        }
        _ => Ok(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_as_the_contract_says() {
        let read = |s: &str| serde_json::from_str::<Answer>(s);
        assert_eq!(read(r#"{"verdict": "pass"}"#).unwrap(), Answer::Pass);
        assert_eq!(read(r#"{"verdict": "block"}"#).unwrap(), Answer::Block { reason: None });
        assert_eq!(
            read(r#"{"verdict": "redact", "texts": [null, "x"], "extra": 1}"#).unwrap(),
            Answer::Redact { texts: vec![None, Some("x".into())], reason: None }
        );
        assert!(read(r#"{"verdict": "maybe"}"#).is_err());
        assert!(read(r#"{"verdict": "redact"}"#).is_err(), "a redact names its texts");
        assert!(check(Answer::Redact { texts: vec![None], reason: None }, 2).is_err());
        let call = Call {
            direction: "input",
            policy: "p",
            route: "r",
            texts: vec![CallText { text: "a", source: Some("tool") }, CallText { text: "b", source: None }],
        };
        assert_eq!(
            serde_json::to_value(&call).unwrap(),
            serde_json::json!({"direction": "input", "policy": "p", "route": "r", "texts": [{"text": "a", "source": "tool"}, {"text": "b"}]})
        );
    }
}

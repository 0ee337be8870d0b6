//! Watches: newline-delimited JSON events streamed from the event log and then live, with
//! bookmarks, timeouts and 410 when the requested resource version is no longer in the log.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::meta;
use crate::resources::ResourceType;
use crate::selector::Selectors;
use crate::store::{Event, EventType, Store};

/// How often a watch that allows bookmarks gets one while nothing else happens.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);

/// What the client asked of the watch.
pub struct WatchParams {
    pub resource_version: Option<String>,
    pub allow_bookmarks: bool,
    pub timeout: Option<Duration>,
    /// `sendInitialEvents=true`: the current objects first, then a bookmark marking their end.
    pub send_initial_events: bool,
}

/// A watch ready to stream: its first frames and its subscription to new events.
pub struct Watch {
    resource: Arc<ResourceType>,
    namespace: Option<String>,
    selectors: Selectors,
    initial: Vec<Bytes>,
    /// Set when the first frames already end the watch (an error).
    finished: bool,
    receiver: broadcast::Receiver<Arc<Event>>,
    /// Changes when the server drops every watch.
    dropped: tokio::sync::watch::Receiver<u64>,
    allow_bookmarks: bool,
    timeout: Option<Duration>,
    /// The newest resource version the client has seen everything up to.
    seen: u64,
}

fn frame(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

impl Watch {
    /// Sets up a watch; call with the state locked so that no event is missed or repeated.
    pub fn start(
        store: &Store,
        resource: Arc<ResourceType>,
        namespace: Option<String>,
        selectors: Selectors,
        params: WatchParams,
    ) -> Result<Self, ApiError> {
        let mut watch = Self {
            namespace,
            selectors,
            initial: Vec::new(),
            finished: false,
            receiver: store.subscribe(),
            dropped: store.watch_drops(),
            allow_bookmarks: params.allow_bookmarks,
            timeout: params.timeout,
            seen: store.resource_version(),
            resource,
        };
        let since = match params.resource_version.as_deref() {
            None | Some("" | "0") => None,
            Some(_) if params.send_initial_events => None,
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion: Invalid value: \"{rv}\": must be a number"))
            })?),
        };
        match since {
            None => {
                let storage = watch.resource.storage();
                let current: Vec<Bytes> = store
                    .list(&storage, watch.namespace.as_deref())
                    .filter(|o| watch.selectors.matches(o))
                    .map(|o| frame("ADDED", &watch.versioned(o.clone())))
                    .collect();
                watch.initial = current;
                if params.send_initial_events {
                    let end = watch.bookmark(json!({"k8s.io/initial-events-end": "true"}));
                    watch.initial.push(end);
                }
            }
            Some(rv) => match store.events_after(rv) {
                Ok(events) => watch.initial = events.iter().filter_map(|e| watch.frame_for(e)).collect(),
                Err(oldest) => {
                    let gone = ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({})", oldest.saturating_sub(1)),
                    );
                    watch.initial = vec![frame("ERROR", &gone.to_status())];
                    watch.finished = true;
                }
            },
        }
        Ok(watch)
    }

    /// `obj` as the watched version of its resource.
    fn versioned(&self, mut obj: Value) -> Value {
        meta::object_mut(&mut obj).insert("apiVersion".into(), json!(self.resource.api_version()));
        obj
    }

    fn bookmark(&self, annotations: Value) -> Bytes {
        let mut metadata = json!({"resourceVersion": self.seen.to_string()});
        if annotations.as_object().is_some_and(|a| !a.is_empty()) {
            metadata["annotations"] = annotations;
        }
        frame(
            "BOOKMARK",
            &json!({"kind": self.resource.kind, "apiVersion": self.resource.api_version(), "metadata": metadata}),
        )
    }

    /// The frame a watcher of this resource, namespace and selectors gets for `event`: objects
    /// that start or stop matching the selectors appear as added or deleted.
    fn frame_for(&self, event: &Event) -> Option<Bytes> {
        if event.resource != self.resource.storage()
            || self.namespace.as_deref().is_some_and(|ns| ns != meta::namespace(&event.object))
        {
            return None;
        }
        let now = self.selectors.matches(&event.object);
        let before = event.previous.as_ref().is_some_and(|p| self.selectors.matches(p));
        let kind = match (event.kind, before, now) {
            (EventType::Added, _, true) | (EventType::Modified, false, true) => "ADDED",
            (EventType::Modified, true, true) => "MODIFIED",
            (EventType::Modified, true, false) | (EventType::Deleted, _, true) => "DELETED",
            _ => return None,
        };
        Some(frame(kind, &self.versioned(event.object.clone())))
    }

    /// Streams the watch as a response body until the client goes away, the timeout passes, the
    /// server drops every watch or shuts down.
    pub fn into_body(self, shutdown: tokio::sync::watch::Receiver<bool>) -> BoxBody<Bytes, Infallible> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(self.run(tx, shutdown));
        let frames = futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx).map(|next| next.map(|bytes| Ok::<_, Infallible>(Frame::data(bytes))))
        });
        StreamBody::new(frames).boxed()
    }

    async fn run(mut self, tx: mpsc::Sender<Bytes>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        for line in std::mem::take(&mut self.initial) {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if self.finished {
            return;
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut bookmarks = tokio::time::interval_at(Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
        loop {
            let line = tokio::select! {
                _ = tx.closed() => return,
                _ = shutdown.changed() => return,
                _ = self.dropped.changed() => return,
                _ = until(deadline) => return,
                _ = bookmarks.tick(), if self.allow_bookmarks => self.bookmark(json!({})),
                received = self.receiver.recv() => match received {
                    Ok(event) => {
                        self.seen = event.resource_version;
                        match self.frame_for(&event) {
                            Some(line) => line,
                            None => continue,
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        let gone = ApiError::new(410, "Expired", "the watch fell too far behind the event stream");
                        let _ = tx.send(frame("ERROR", &gone.to_status())).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

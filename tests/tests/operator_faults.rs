#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Operator faults with a fleet of sidecars connected and serving traffic: the API server drops
//! every watch and has compacted its history (resumes get 410 Gone, so the operator lists
//! again), the leader is killed, the leader is stopped in a rolling restart, and every replica
//! dies at once before one comes back. Throughout, about 100 requests a second go through the
//! sidecars and none may fail; after each fault a weight change must reach every sidecar and
//! the route's status must say so. The time each took is printed.
//!
//! The config stream is reached as a Service would reach it: a forwarder in the test sends each
//! new connection to the replica holding the lease (the one the Service's leader label selects)
//! and refuses connections while that replica is down.
//!
//! `BULWARK_FLEET` sets the number of sidecars (default 100).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use serde_json::json;
use tokio::{net::TcpListener, time::Instant};

use bulwark_tests::{
    client::Client,
    cluster::{Cluster, OperatorProc, SidecarProc, converged, eventually, free_port, weighted_route},
    mock::MockProvider,
};

const NS: &str = "fleet";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/bulwark-system/leases/bulwark-operator";
const ROUTE: &str = "/apis/bulwark.dev/v1alpha1/namespaces/fleet/llmroutes/chat";
/// How long a fleet may take to follow a change (the lease alone is 2 s).
const LIMIT: Duration = Duration::from_secs(30);

fn fleet_size() -> usize {
    std::env::var("BULWARK_FLEET").ok().and_then(|n| n.parse().ok()).unwrap_or(100)
}

fn pods(n: usize) -> String {
    let mut out = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n");
    for i in 0..n {
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: bot-{i:03}\n  namespace: {NS}\n  labels: {{app: bot, bulwark.dev/inject: \"true\", bulwark.dev/workload: bots}}\nspec:\n  serviceAccountName: default\n  containers: [{{name: app, image: example/app}}]\n"
        );
    }
    out
}

fn route(a: &str, b: &str, weights: (u32, u32)) -> String {
    weighted_route(NS, a, b, weights)
}

/// The config stream's Service: each new connection goes to the lease holder, if it is up.
struct Service {
    port: u16,
    /// Replicas that are up: identity → config stream port.
    up: Arc<Mutex<HashMap<String, u16>>>,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl Service {
    async fn start(api: Client) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up: Arc<Mutex<HashMap<String, u16>>> = Arc::default();
        let holder: Arc<Mutex<String>> = Arc::default();
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let h = holder.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(r) = api.get(LEASE).await {
                    *h.lock() = r.json()["spec"]["holderIdentity"].as_str().unwrap_or_default().to_owned();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let (u, r) = (up.clone(), refused.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = u.lock().get(&*holder.lock()).copied();
                let Some(target) = target else {
                    r.fetch_add(1, Ordering::Relaxed);
                    continue; // dropped: the client sees its connection closed
                };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self { port, up, refused })
    }

    fn started(&self, op: &OperatorProc) {
        self.up.lock().insert(op.proc.name.clone(), op.stream);
    }

    fn stopped(&self, op: &OperatorProc) {
        self.up.lock().remove(&op.proc.name);
    }
}

/// One answer through a sidecar: when it was sent, and its status and backend or the error.
type Answer = (Instant, Result<(u16, String), String>);

/// About `rate` requests a second, spread over the sidecars in turn, each on its own task.
struct Load {
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: Arc<AtomicBool>,
}

impl Load {
    fn start(sidecars: &[SidecarProc], rate: u32) -> Self {
        let clients: Vec<Client> =
            sidecars.iter().map(|s| Client::new(format!("http://127.0.0.1:{}", s.listen))).collect();
        let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (out, halt) = (answers.clone(), stop.clone());
        tokio::spawn(async move {
            let body = json!({"model": "small", "messages": [{"role": "user", "content": "hi"}]});
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            for client in clients.iter().cycle() {
                tick.tick().await;
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                let (client, body, out) = (client.clone(), body.clone(), out.clone());
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let answer = match tokio::time::timeout(
                        Duration::from_secs(10),
                        client.post("/v1/chat/completions", &body, &[]),
                    )
                    .await
                    {
                        Err(_) => Err("no answer within 10 s".to_owned()),
                        Ok(Err(e)) => Err(format!("{e:#}")),
                        Ok(Ok(r)) => {
                            Ok((r.status.as_u16(), r.header("x-bulwark-backend").unwrap_or_default().to_owned()))
                        }
                    };
                    out.lock().push((sent, answer));
                });
            }
        });
        Self { answers, stop }
    }

    /// The answers to requests sent after `t`.
    fn since(&self, t: Instant) -> Vec<Answer> {
        self.answers.lock().iter().filter(|(at, _)| *at > t).cloned().collect()
    }

    /// Fails on any answer that is not a 200 from `a` or `b`.
    fn check(&self) -> anyhow::Result<usize> {
        let answers = self.answers.lock();
        let failed: Vec<_> =
            answers.iter().filter(|(_, a)| !matches!(a, Ok((200, b)) if b == "a" || b == "b")).take(5).collect();
        anyhow::ensure!(failed.is_empty(), "of {} requests, these failed (first 5): {failed:?}", answers.len());
        Ok(answers.len())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Waits until the route's status says every sidecar runs its current generation.
async fn status_converged(api: &Client, n: usize) -> anyhow::Result<()> {
    let expected = format!("True/Programmed {n}/{n}");
    eventually(LIMIT, &format!("Ready=True/Programmed with {n} of {n} sidecars"), || async {
        let route = api.get(ROUTE).await.ok()?.json();
        let status = &route["status"];
        let ready = status["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready")?.clone();
        let seen = format!(
            "{}/{} {}/{}",
            ready["status"].as_str()?,
            ready["reason"].as_str()?,
            status["sidecars"]["total"],
            status["sidecars"]["upToDate"]
        );
        let current = status["observedGeneration"] == route["metadata"]["generation"];
        (seen == expected && current).then_some(())
    })
    .await
}

struct Fleet<'a> {
    c: &'a Cluster,
    api: Client,
    sidecars: Vec<SidecarProc>,
    urls: (String, String),
    version: String,
    toward_b: bool,
}

impl Fleet<'_> {
    /// Moves all traffic to the other backend and waits for the sidecars, then the status;
    /// prints how long each took after `since` (the fault, or the change).
    async fn shift(&mut self, fault: &str, since: Instant) -> anyhow::Result<()> {
        self.toward_b = !self.toward_b;
        let weights = if self.toward_b { (0, 100) } else { (100, 0) };
        self.c.apply(&route(&self.urls.0, &self.urls.1, weights))?;
        let applied = Instant::now();
        self.version = converged(&self.sidecars, &self.version, LIMIT).await?;
        let programmed = Instant::now();
        status_converged(&self.api, self.sidecars.len()).await?;
        println!(
            "{fault}: all {} sidecars ran the change {:?} after kubectl apply ({:?} after the fault); the status said so {:?} after the apply",
            self.sidecars.len(),
            programmed - applied,
            programmed - since,
            applied.elapsed()
        );
        Ok(())
    }

    /// The backend all traffic should now reach.
    fn backend(&self) -> &'static str {
        if self.toward_b { "b" } else { "a" }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_keeps_serving_and_converges_through_operator_faults() -> anyhow::Result<()> {
    let Some(c) = Cluster::start("bulwark-operator-faults").await? else { return Ok(()) };
    let n = fleet_size();
    let api = Client::new(c.api.url());
    let a = MockProvider::start_with("a", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    let b = MockProvider::start_with("b", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    c.apply(&pods(n))?;
    let service = Service::start(api.clone()).await?;
    let mut ops = vec![c.operator("op-a", free_port()?, &[])?, c.operator("op-b", free_port()?, &[])?];
    ops.iter().for_each(|o| service.started(o));
    c.apply(&route(&a.url(), &b.url(), (100, 0)))?;

    let started = Instant::now();
    let mut sidecars = vec![];
    for i in 0..n {
        sidecars.push(c.sidecar(NS, &format!("bot-{i:03}"), service.port, &[])?);
    }
    let mut fleet =
        Fleet { c: &c, api: api.clone(), sidecars, urls: (a.url(), b.url()), version: String::new(), toward_b: false };
    fleet.version = converged(&fleet.sidecars, "", LIMIT).await?;
    status_converged(&api, n).await?;
    println!("{n} sidecars started, programmed and counted in the status in {:?}", started.elapsed());
    let load = Load::start(&fleet.sidecars, 100);
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.shift("no fault", Instant::now()).await?;

    // 1. The API server drops every watch and has compacted its history: resumes get 410 Gone.
    // (A write nobody watches first, so that no watch has seen the newest version.)
    c.kubectl(&["create", "configmap", "marker", "-n", "default"])?;
    let audited = c.api.audit().len();
    let fault = Instant::now();
    c.api.compact_watch_history();
    c.api.drop_watches();
    fleet.shift("watches dropped, history compacted", fault).await?;
    let relisted = c.api.audit()[audited..].iter().any(|(method, uri)| {
        method == "GET" && uri.starts_with("/apis/bulwark.dev/v1alpha1/llmroutes?") && !uri.contains("watch=")
    });
    assert!(relisted, "after 410 Gone the operator lists the routes again");

    // 2. The leader is killed (SIGKILL): the standby takes over once the lease runs out.
    let leader = |ops: &[OperatorProc]| -> anyhow::Result<usize> {
        let holder = c.get("bulwark-system", "lease/bulwark-operator", "{.spec.holderIdentity}")?;
        ops.iter().position(|o| o.proc.name == holder).ok_or_else(|| anyhow::anyhow!("no replica holds the lease"))
    };
    let first = leader(&ops)?;
    let fault = Instant::now();
    service.stopped(&ops[first]);
    ops[first].proc.kill();
    fleet.shift("leader killed", fault).await?;

    // 3. A rolling restart: a new replica starts as the standby, then the leader is stopped
    // (SIGTERM), handing the lease over.
    ops.remove(first);
    let replacement = c.operator("op-c", free_port()?, &[])?;
    service.started(&replacement);
    ops.push(replacement);
    eventually(LIMIT, "the new replica to be ready", || async {
        let m = Client::new(format!("http://127.0.0.1:{}", ops[ops.len() - 1].metrics)).get("/metrics").await.ok()?;
        m.text().contains("bulwark_operator_leader 0").then_some(())
    })
    .await?;
    let second = leader(&ops)?;
    let fault = Instant::now();
    service.stopped(&ops[second]);
    ops[second].proc.terminate()?;
    fleet.shift("leader stopped in a rolling restart", fault).await?;

    // 4. Every replica dies at once; a change is made while none is up; one comes back and
    // waits out the dead leader's lease.
    ops.push(c.operator("op-d", free_port()?, &[])?);
    service.started(&ops[2]);
    let fault = Instant::now();
    for op in &mut ops {
        service.stopped(op);
        op.proc.kill();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let back = c.operator("op-e", free_port()?, &[])?;
    service.started(&back);
    fleet.shift("all replicas killed, one restarted", fault).await?;

    // Traffic follows the last change, and no request failed at any point.
    let converged = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = load.since(converged);
    assert!(after.len() > 50, "the load kept going: {} answers in the last second", after.len());
    assert!(after.iter().all(|(_, a)| matches!(a, Ok((200, b)) if b == fleet.backend())), "all to {}", fleet.backend());
    let total = load.check()?;
    println!(
        "{total} requests through {n} sidecars during the faults, none failed; {} config stream connections refused while no leader was up",
        service.refused.load(Ordering::Relaxed)
    );
    drop(back);
    Ok(())
}

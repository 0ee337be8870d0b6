#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End to end without a cluster: the test API server, real kubectl, the operator binary and
//! sidecar processes, with mock providers upstream.

use std::time::Duration;

use tokio::time::Instant;

use bulwark_tests::{
    client::Client,
    cluster::{Cluster, Proc, SidecarProc, bin, converged, eventually, free_port, weighted_route},
    mock::MockProvider,
};
use serde_json::{Value, json};

const NS: &str = "shop";

/// The two tests share the machine's two cores; run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pods(names: &[&str]) -> String {
    let mut out = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n");
    for name in names {
        let inject = if name.starts_with("bot") { ", bulwark.dev/inject: \"true\"" } else { "" };
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: bot{inject}}}\nspec:\n  serviceAccountName: default\n  containers: [{{name: app, image: example/app}}]\n"
        );
    }
    out
}

async fn has_route(s: &SidecarProc, route: &str) -> bool {
    s.config().await.is_some_and(|c| c["routes"].as_array().is_some_and(|r| r.iter().any(|r| r["route"] == route)))
}

fn route(a: &str, b: &str, weight_a: u32, weight_b: u32) -> String {
    weighted_route(NS, a, b, (weight_a, weight_b))
}

async fn chat(s: &SidecarProc) -> anyhow::Result<(u16, Option<String>)> {
    let client = Client::new(format!("http://127.0.0.1:{}", s.listen));
    let body = json!({"model": "small", "messages": [{"role": "user", "content": "hi"}]});
    let reply = client.post("/v1/chat/completions", &body, &[]).await?;
    Ok((reply.status.as_u16(), reply.header("x-bulwark-backend").map(str::to_owned)))
}

fn condition(c: &Cluster, what: &str, type_: &str) -> String {
    let path = format!(
        "{{.status.conditions[?(@.type==\"{type_}\")].status}}/{{.status.conditions[?(@.type==\"{type_}\")].reason}}"
    );
    c.get(NS, what, &path).unwrap_or_default()
}

/// Waits (up to 10 s) until a condition of `what` reads `status/reason`.
async fn await_condition(c: &Cluster, what: &str, type_: &str, expected: &str) -> anyhow::Result<()> {
    let description = format!("{type_}={expected} on {what}");
    eventually(Duration::from_secs(10), &description, || async {
        (condition(c, what, type_) == expected).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_programs_sidecars_and_they_survive_it() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(c) = Cluster::start("bulwark-operator-e2e").await? else { return Ok(()) };
    let a = MockProvider::start_with("a", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    let b = MockProvider::start_with("b", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    c.apply(&pods(&["bot-1", "bot-2", "bot-3", "bot-4", "intruder"]))?;
    let stream = free_port()?;
    let mut op = c.operator("op-1", stream, &[])?;
    let sidecars: Vec<SidecarProc> =
        ["bot-1", "bot-2", "bot-3"].iter().map(|p| c.sidecar(NS, p, op.stream, &[])).collect::<Result<_, _>>()?;
    // A pod without the sidecar label gets nothing, whatever token it holds.
    let intruder = c.sidecar(NS, "intruder", op.stream, &[])?;

    // A new route reaches every sidecar, and traffic follows it.
    c.apply(&route(&a.url(), &b.url(), 100, 0))?;
    eventually(Duration::from_secs(20), "the route in every sidecar", || async {
        for s in &sidecars {
            if !has_route(s, "shop/chat").await {
                return None;
            }
        }
        Some(())
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!("{e}\noperator log:\n{}\nsidecar log:\n{}", op.proc.output(), sidecars[0].proc.output())
    })?;
    let v1 = converged(&sidecars, "", Duration::from_secs(5)).await?;
    for s in &sidecars {
        assert_eq!(chat(s).await?, (200, Some("a".to_owned())));
    }

    // Status: accepted, refs resolved, and pending: bot-4's sidecar has not started yet.
    eventually(Duration::from_secs(10), "Ready=False/Pending with 3 of 4 sidecars", || async {
        let counts = c.get(NS, "llmroute/chat", "{.status.sidecars.total}/{.status.sidecars.upToDate}").ok()?;
        (condition(&c, "llmroute/chat", "Ready") == "False/Pending" && counts == "4/3").then_some(())
    })
    .await?;
    assert_eq!(condition(&c, "llmroute/chat", "Accepted"), "True/Accepted");
    assert_eq!(
        c.get(NS, "llmroute/chat", "{.status.observedGeneration}")?,
        c.get(NS, "llmroute/chat", "{.metadata.generation}")?
    );
    // A ConfigMap copy per workload (these bare pods are one each), named so that a pod spec can
    // mount it in advance, and owned by the route.
    let copies = c.kubectl(&[
        "get",
        "configmaps",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/managed-by=bulwark-operator",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    assert_eq!(copies, "bulwark-bot-1 bulwark-bot-2 bulwark-bot-3 bulwark-bot-4");
    let cm: Value =
        serde_json::from_str(&c.kubectl(&["get", "configmap", "bulwark-bot-1", "-n", NS, "-o", "json"])?)?;
    assert_eq!(cm["metadata"]["annotations"]["bulwark.dev/config-version"], v1.as_str());
    assert_eq!(cm["metadata"]["annotations"]["bulwark.dev/workload"], "bot-1");
    assert_eq!(cm["metadata"]["ownerReferences"][0]["kind"], "LLMRoute");
    assert!(cm["data"]["config.yaml"].as_str().unwrap().contains("shop/chat"));
    assert!(cm["data"]["ca.crt"].as_str().unwrap().contains("BEGIN CERTIFICATE"));

    // Shift the weights, back and forth: time until every sidecar runs each change (the
    // benchmark measures this properly; here it is only reported).
    let mut took = vec![];
    let mut current = v1.clone();
    for i in 0..7 {
        let started = Instant::now();
        let (wa, wb) = if i % 2 == 0 { (0, 100) } else { (100, 0) };
        c.apply(&route(&a.url(), &b.url(), wa, wb))?;
        current = converged(&sidecars, &current, Duration::from_secs(10)).await?;
        took.push(started.elapsed());
    }
    let v2 = current;
    took.sort();
    println!(
        "weight changes applied by all 3 sidecars after kubectl apply returned: median {:?}, max {:?}",
        took[3], took[6]
    );
    for s in &sidecars {
        assert_eq!(chat(s).await?, (200, Some("b".to_owned())));
    }

    // An invalid route is refused with its reason; the others keep serving.
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: broken, namespace: {NS}}}\nspec:\n  rules: [{{backends: [{{name: z, url: 'http://127.0.0.1:9/v1', weight: 0}}]}}]\n"
    ))?;
    await_condition(&c, "llmroute/broken", "Accepted", "False/Invalid").await?;
    let message = c.get(NS, "llmroute/broken", "{.status.conditions[?(@.type==\"Accepted\")].message}")?;
    assert!(message.contains("weights are 0"), "{message}");
    assert_eq!(sidecars[0].version().await.unwrap(), v2, "the broken route changed nothing");
    assert_eq!(chat(&sidecars[0]).await?.0, 200);
    let events = c.kubectl(&["get", "events.events.k8s.io", "-n", NS, "-o", "json"])?;
    assert!(events.contains("Invalid") && events.contains("broken"), "a Warning event names the problem: {events}");

    // A route whose key lives in a Secret that does not exist yet: ResolvedRefs says so until
    // the Secret is created (only its name is watched).
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: keyed, namespace: {NS}}}\nspec:\n  workloadSelector: {{matchLabels: {{app: nobody}}}}\n  rules: [{{backends: [{{name: openai, url: 'https://api.openai.com/v1', provider: openai, credentials: {{secretKeyRef: {{name: openai, key: api-key}}}}}}]}}]\n"
    ))?;
    await_condition(&c, "llmroute/keyed", "ResolvedRefs", "False/SecretNotFound").await?;
    c.kubectl(&["create", "secret", "generic", "openai", "-n", NS, "--from-literal=api-key=sk-test"])?;
    await_condition(&c, "llmroute/keyed", "ResolvedRefs", "True/ResolvedRefs").await?;

    // The intruder's sidecar was refused and serves nothing.
    assert!(intruder.config().await.unwrap()["routes"].as_array().unwrap().is_empty());
    eventually(Duration::from_secs(10), "the intruder to be refused", || async {
        intruder.proc.output().contains("403 Forbidden").then_some(())
    })
    .await?;
    assert!(intruder.proc.output().contains("is not known as a sidecar pod"), "{}", intruder.proc.output());

    // The operator dies: sidecars notice, and keep serving their last config.
    let copy = c.get(NS, "configmap/bulwark-bot-4", "{.data.config\\.yaml}")?;
    op.proc.kill();
    eventually(Duration::from_secs(10), "the sidecars to notice", || async {
        sidecars
            .iter()
            .all(|s| {
                let log = s.proc.output();
                log.contains("; reconnecting") || log.contains("; retrying")
            })
            .then_some(())
    })
    .await?;
    for s in &sidecars {
        assert_eq!(chat(s).await?, (200, Some("b".to_owned())));
    }
    // A sidecar (re)started meanwhile serves the copy its pod mounts, `bulwark-<workload>`.
    let file = c.dir.join("bot-4-config.yaml");
    std::fs::write(&file, &copy)?;
    let late = c.sidecar(NS, "bot-4", stream, &[&format!("--config={}", file.display())])?;
    eventually(Duration::from_secs(10), "the late sidecar to serve the copy", || async {
        (late.version().await? == v2).then_some(())
    })
    .await?;
    assert_eq!(chat(&late).await?, (200, Some("b".to_owned())));
    // It comes back (same address, as behind its Service): the sidecars reconnect, and the next
    // change reaches them once the dead replica's lease has run out.
    let op = c.operator("op-2", stream, &[])?;
    let metrics = Client::new(format!("http://127.0.0.1:{}", op.metrics));
    eventually(Duration::from_secs(15), "4 sidecars connected to the new operator", || async {
        let text = metrics.get("/metrics").await.ok()?.text();
        text.contains("bulwark_operator_connected_sidecars 4").then_some(())
    })
    .await?;
    c.apply(&route(&a.url(), &b.url(), 50, 50))?;
    let v3 = converged(&sidecars, &v2, Duration::from_secs(10)).await?;
    // All four sidecars run it, and the new leader says so.
    eventually(Duration::from_secs(10), "Ready=True/Programmed with 4 of 4 sidecars", || async {
        let counts = c.get(NS, "llmroute/chat", "{.status.sidecars.total}/{.status.sidecars.upToDate}").ok()?;
        (condition(&c, "llmroute/chat", "Ready") == "True/Programmed" && counts == "4/4").then_some(())
    })
    .await?;
    assert_eq!(late.version().await.unwrap(), v3);

    // Deleting the route removes it from every config and its ConfigMap goes.
    c.kubectl(&["delete", "llmroute", "chat", "-n", NS])?;
    converged(&sidecars, &v3, Duration::from_secs(10)).await?;
    assert!(sidecars[0].config().await.unwrap()["routes"].as_array().unwrap().is_empty());
    assert_eq!(chat(&sidecars[0]).await?.0, 404, "no route takes the request any more");
    // Once the new operator holds the lease (the dead one's runs out after 2 s), it deletes the
    // copies of groups that no longer exist.
    eventually(Duration::from_secs(15), "the route's ConfigMap copies to go", || async {
        let out = c.kubectl(&["get", "configmaps", "-n", NS, "-o", "json"]).ok()?;
        (out.contains("bulwark-operator") && !out.contains("shop/chat")).then_some(())
    })
    .await?;
    let _ = v3;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_operator_takes_over_within_the_lease_duration() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(c) = Cluster::start("bulwark-leader-e2e").await? else { return Ok(()) };
    let mut ops = [c.operator("op-a", free_port()?, &[])?, c.operator("op-b", free_port()?, &[])?];
    let lease = || c.get("bulwark-system", "lease/bulwark-operator", "{.spec.holderIdentity}").unwrap_or_default();
    let holder = eventually(Duration::from_secs(10), "a lease holder", || async {
        let h = lease();
        (!h.is_empty()).then_some(h)
    })
    .await?;
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: r, namespace: {NS}}}\nspec:\n  rules: [{{backends: [{{name: x, url: 'http://127.0.0.1:9/v1'}}]}}]\n"
    ))?;
    await_condition(&c, "llmroute/r", "Accepted", "True/Accepted").await?;
    let leader = ops.iter().position(|o| o.proc.name == holder).unwrap();
    let standby = Client::new(format!("http://127.0.0.1:{}", ops[1 - leader].metrics));
    let text = standby.get("/metrics").await?.text();
    assert!(!text.contains("bulwark_operator_writes_total{"), "the standby wrote nothing: {text}");
    assert!(text.contains("bulwark_operator_leader 0"));
    ops[leader].proc.kill();
    let killed = Instant::now();
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: r, namespace: {NS}}}\nspec:\n  rules: [{{backends: [{{name: x, url: 'http://127.0.0.1:9/v1', weight: 0}}]}}]\n"
    ))?;
    await_condition(&c, "llmroute/r", "Accepted", "False/Invalid").await?;
    println!("standby wrote status {:?} after the leader died (lease 2 s)", killed.elapsed());
    assert_ne!(lease(), holder);
    Ok(())
}

/// The webhook as a cluster would call it: the test API server runs it on each pod create.
fn webhook_configuration(c: &Cluster, port: u16) -> anyhow::Result<String> {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&c.tls.ca)?);
    Ok(format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: bulwark-sidecar-injector}}
webhooks:
  - name: inject.bulwark.dev
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Fail
    clientConfig: {{url: "https://localhost:{port}/inject", caBundle: {ca}}}
    rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}}]
    objectSelector: {{matchLabels: {{bulwark.dev/inject: "true"}}}}
"#
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_pods_get_a_sidecar_that_works_as_injected() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(c) = Cluster::start("bulwark-inject-e2e").await? else { return Ok(()) };
    let a = MockProvider::start_with("a", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    c.apply(&pods(&[]))?;
    let (stream, webhook) = (free_port()?, free_port()?);
    let op = c.operator(
        "op-1",
        stream,
        &[
            &format!("--webhook-listen=127.0.0.1:{webhook}"),
            "--sidecar-image=bulwark-sidecar:test",
            &format!("--stream-url=https://localhost:{stream}"),
        ],
    )?;
    // A route whose backend key comes from a Secret: injected pods get it mounted.
    let route = route(&a.url(), &a.url(), 100, 0)
        .replace("weight: 100}", "weight: 100, credentials: {secretKeyRef: {name: provider, key: api-key}}}");
    c.apply(&route)?;
    await_condition(&c, "llmroute/chat", "Accepted", "True/Accepted").await?;
    c.apply(&webhook_configuration(&c, webhook)?)?;
    // bot-1 carries the injection label, plain does not.
    c.apply(&pods(&["bot-1", "plain"]))?;

    // What the API server stored is the injected pod.
    let pod: Value = serde_json::from_str(&c.kubectl(&["get", "pod", "bot-1", "-n", NS, "-o", "json"])?)?;
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "bulwark-sidecar", "{pod:#}");
    assert_eq!(
        (sidecar["image"].as_str(), sidecar["restartPolicy"].as_str()),
        (Some("bulwark-sidecar:test"), Some("Always"))
    );
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let copy = volumes.iter().find(|v| v["name"] == "bulwark-copy").unwrap();
    assert_eq!(copy["configMap"]["name"], "bulwark-bot-1");
    let keys = &volumes.iter().find(|v| v["name"] == "bulwark-keys").unwrap()["projected"]["sources"];
    assert_eq!(keys[0]["secret"]["items"][0]["path"], "provider/api-key");
    let app_env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(app_env.iter().any(|e| e["name"] == "OPENAI_BASE_URL" && e["value"] == "http://127.0.0.1:15080/v1"));
    // A pod without the label is not even sent to the webhook: one review in all.
    let plain = c.get(NS, "pod/plain", "{.spec.initContainers}")?;
    assert!(plain.is_empty(), "{plain}");
    let metrics = Client::new(format!("http://127.0.0.1:{}", op.metrics)).get("/metrics").await?.text();
    let reviews: Vec<&str> = metrics.lines().filter(|l| l.starts_with("bulwark_operator_admissions_total")).collect();
    assert_eq!(reviews, [r#"bulwark_operator_admissions_total{result="injected"} 1"#], "{metrics}");

    // The injected container runs as written: its arguments (local paths and ports for the pod's
    // mounts and the ones it binds) and its environment, which carries the operator's CA.
    let token = c.token(NS, "default", "bot-1")?;
    let (listen, admin) = (free_port()?, free_port()?);
    let args: Vec<String> = sidecar["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            match a.split_once('=').map(|(flag, _)| flag) {
                Some("--token-file") => format!("--token-file={}", token.display()),
                Some("--config") => format!("--config={}", c.dir.join("no-copy-yet.yaml").display()),
                Some("--listen") => format!("--listen=127.0.0.1:{listen}"),
                Some("--admin") => format!("--admin=127.0.0.1:{admin}"),
                _ => a.to_owned(),
            }
        })
        .collect();
    let ca = sidecar["env"].as_array().unwrap().iter().find(|e| e["name"] == "BULWARK_OPERATOR_CA_PEM").unwrap();
    let proc = Proc::spawn(
        &c.dir,
        "injected-sidecar",
        &bin("bulwark-sidecar")?,
        &args,
        &[("BULWARK_OPERATOR_CA_PEM", ca["value"].as_str().unwrap())],
    )?;
    let s = SidecarProc { proc, listen, admin };
    eventually(Duration::from_secs(20), "the injected sidecar to get its route", || async {
        has_route(&s, "shop/chat").await.then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nsidecar log:\n{}", s.proc.output()))?;
    // The key the config reads is the file the injected volume mounts.
    let mount = sidecar["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "bulwark-keys").unwrap();
    let key = format!("{}/provider/api-key", mount["mountPath"].as_str().unwrap());
    assert!(s.config().await.unwrap().to_string().contains(&key), "{key} not in the config");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_pods_get_the_capture_rules_and_the_namespaces_interception_ca() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(c) = Cluster::start("bulwark-inject-transparent").await? else { return Ok(()) };
    c.apply(&pods(&[]))?;
    let (stream, webhook) = (free_port()?, free_port()?);
    let _op = c.operator(
        "op-1",
        stream,
        &[
            &format!("--webhook-listen=127.0.0.1:{webhook}"),
            "--sidecar-image=bulwark-sidecar:test",
            &format!("--stream-url=https://localhost:{stream}"),
            "--tls-interception",
        ],
    )?;
    c.apply(&webhook_configuration(&c, webhook)?)?;
    let pod = |name: &str, annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: bot, bulwark.dev/inject: \"true\"}}\n  annotations: {{{annotations}}}\nspec:\n  containers: [{{name: app, image: example/app}}]\n"
        )
    };
    c.apply(&pod("bot-t", r#"bulwark.dev/proxy-mode: transparent, bulwark.dev/intercept-tls: "true""#))?;

    let stored: Value = serde_json::from_str(&c.kubectl(&["get", "pod", "bot-t", "-n", NS, "-o", "json"])?)?;
    let init = stored["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(
        (init[0]["name"].as_str(), init[1]["name"].as_str()),
        (Some("bulwark-redirect"), Some("bulwark-sidecar"))
    );
    assert_eq!(init[0]["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    let args = init[1]["args"].as_array().unwrap();
    assert!(
        args.contains(&json!("--transparent=15081")) && args.contains(&json!("--intercept-ca=/etc/bulwark/intercept"))
    );
    let env = stored["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e["name"] == "SSL_CERT_FILE" && e["value"] == "/etc/bulwark/trust/ca-bundle.crt"));

    // The namespace's CA, and the bundle that trusts it, were there before the pod.
    let secret: Value =
        serde_json::from_str(&c.kubectl(&["get", "secret", "bulwark-intercept-ca", "-n", NS, "-o", "json"])?)?;
    assert_eq!(secret["type"], "kubernetes.io/tls");
    use base64::Engine as _;
    let decode = |k: &str| {
        let b = base64::engine::general_purpose::STANDARD.decode(secret["data"][k].as_str().unwrap()).unwrap();
        String::from_utf8(b).unwrap()
    };
    let (cert, key) = (decode("tls.crt"), decode("tls.key"));
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----") && key.contains("PRIVATE KEY"));
    let bundle: Value =
        serde_json::from_str(&c.kubectl(&["get", "configmap", "bulwark-trust-bundle", "-n", NS, "-o", "json"])?)?;
    assert_eq!(bundle["data"]["ca.crt"], cert.as_str());
    assert!(bundle["data"]["ca-bundle.crt"].as_str().unwrap().ends_with(&cert));
    // The sidecar mints with it: a certificate for a routed host, signed by that CA.
    let minter = bulwark_sidecar::intercept::Minter::from_pem(&cert, &key)?;
    assert_eq!(minter.certificate("api.openai.com")?.cert.len(), 2, "the leaf and the CA");

    // A second pod reuses the CA; an explicit pod gets neither rules nor CA.
    c.apply(&pod("bot-u", r#"bulwark.dev/proxy-mode: transparent, bulwark.dev/intercept-tls: "true""#))?;
    c.apply(&pod("bot-e", "note: explicit"))?;
    let again: Value =
        serde_json::from_str(&c.kubectl(&["get", "secret", "bulwark-intercept-ca", "-n", NS, "-o", "json"])?)?;
    assert_eq!(again["data"]["tls.crt"], secret["data"]["tls.crt"], "one CA per namespace");
    let explicit = c.get(NS, "pod/bot-e", "{.spec.initContainers[*].name}")?;
    assert_eq!(explicit, "bulwark-sidecar");

    // A namespace default: its pods are transparent unless they say otherwise.
    c.kubectl(&["annotate", "namespace", NS, "bulwark.dev/proxy-mode=transparent"])?;
    c.apply(&pod("bot-n", "note: inherits"))?;
    c.apply(&pod("bot-x", "bulwark.dev/proxy-mode: explicit"))?;
    assert_eq!(c.get(NS, "pod/bot-n", "{.spec.initContainers[*].name}")?, "bulwark-redirect bulwark-sidecar");
    assert_eq!(c.get(NS, "pod/bot-x", "{.spec.initContainers[*].name}")?, "bulwark-sidecar");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_agree_on_one_interception_ca() -> anyhow::Result<()> {
    let Some(c) = Cluster::start("bulwark-ca-race").await? else { return Ok(()) };
    c.kubectl(&["create", "namespace", "race"])?;
    let client = kube::Client::try_from(kube::Config::new(c.api.url().parse()?))?;
    // Eight admissions of intercepting pods at once, as replicas of the webhook would make them.
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { bulwark_operator::trust::ensure(&client, "race", "").await })
        })
        .collect();
    for w in writers {
        w.await??;
    }
    let secret: Value =
        serde_json::from_str(&c.kubectl(&["get", "secret", "bulwark-intercept-ca", "-n", "race", "-o", "json"])?)?;
    use base64::Engine as _;
    let cert = base64::engine::general_purpose::STANDARD.decode(secret["data"]["tls.crt"].as_str().unwrap())?;
    let bundle = c.get("race", "configmap/bulwark-trust-bundle", "{.data.ca\\.crt}")?;
    assert_eq!(
        bundle.trim_end(),
        String::from_utf8(cert)?.trim_end(),
        "the bundle trusts the CA the sidecars mint with"
    );
    assert!(secret["data"]["previous.crt"].is_null(), "one CA was kept, none replaced");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_secret_watch_routes_are_programmed_and_no_secret_is_listed() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(c) = Cluster::start("bulwark-no-secret-watch").await? else { return Ok(()) };
    c.apply(&pods(&[]))?;
    let _op = c.operator("op-1", free_port()?, &["--watch-secrets=false"])?;
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: keyed, namespace: {NS}}}\nspec:\n  rules: [{{backends: [{{name: openai, url: 'https://api.openai.com/v1', provider: openai, credentials: {{secretKeyRef: {{name: openai, key: api-key}}}}}}]}}]\n"
    ))?;
    // Synced without the Secret watch, so the route is compiled and its status written; with
    // no Secret names known, a missing one is not reported.
    await_condition(&c, "llmroute/keyed", "Accepted", "True/Accepted").await?;
    await_condition(&c, "llmroute/keyed", "ResolvedRefs", "True/ResolvedRefs").await?;
    // Listing or watching is a GET of the collection (`.../secrets`, `...?watch=true`).
    let secrets: Vec<_> = c.api.audit().into_iter().filter(|(_, uri)| uri.contains("/secrets")).collect();
    assert!(
        !secrets.iter().any(|(verb, uri)| verb == "GET" && !uri.split('?').next().unwrap().contains("/secrets/")),
        "Secrets were listed or watched: {secrets:?}"
    );
    assert!(c.api.audit().iter().any(|(_, uri)| uri.contains("/llmroutes")), "the audit log records requests");
    Ok(())
}

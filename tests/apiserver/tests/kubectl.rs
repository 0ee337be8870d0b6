#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The real kubectl against the API server. kubectl is taken from `$KUBECTL`, or else from
//! `.tools/bin/kubectl` (installed by `scripts/tools.sh`); without one the tests are skipped,
//! unless `BULWARK_REQUIRE_KUBECTL=1` makes that a failure.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bulwark_test_apiserver::{ApiServer, Options};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The kubectl to use, or `None` (after saying so) when the test should be skipped.
fn find_kubectl(test: &str) -> Option<PathBuf> {
    let candidate = match std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => repo().join(".tools/bin/kubectl"),
    };
    if candidate.is_file() {
        return Some(candidate);
    }
    let message = format!("{test}: no kubectl at {} (set KUBECTL or run scripts/tools.sh)", candidate.display());
    assert!(std::env::var("BULWARK_REQUIRE_KUBECTL").as_deref() != Ok("1"), "{message}");
    eprintln!("skipped {message}");
    None
}

/// A running server, a kubeconfig for it, and kubectl with its own cache and home.
struct Cluster {
    kubectl: PathBuf,
    dir: PathBuf,
    runtime: tokio::runtime::Runtime,
    server: Option<ApiServer>,
}

impl Cluster {
    fn start(kubectl: PathBuf, test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bulwark-kubectl-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let options = Options { listen: "127.0.0.1:0".parse().unwrap(), crd_dirs: vec![repo().join("crds/yaml")] };
        let server = runtime.block_on(ApiServer::start(options)).unwrap();
        server.write_kubeconfig(&dir.join("kubeconfig")).unwrap();
        Self { kubectl, dir, runtime, server: Some(server) }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.kubectl);
        command
            .args(args)
            .current_dir(repo())
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("KUBECACHEDIR", self.dir.join("cache"))
            .env("HOME", &self.dir);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs kubectl, expecting success, and returns its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "kubectl {}\nstdout: {stdout}\nstderr: {stderr}", args.join(" "));
        stdout.into_owned()
    }

    /// Runs kubectl, expecting failure, and returns its standard error.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            !output.status.success(),
            "kubectl {} should fail: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_string_lossy().into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every line of a `kubectl apply` output ends with `verb`.
fn assert_all(output: &str, verb: &str) {
    assert!(!output.trim().is_empty());
    for line in output.lines() {
        assert!(line.ends_with(verb), "expected every object {verb}:\n{output}");
    }
}

const ROUTE: &str = "\
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata:
  name: chat
  namespace: team-a
spec:
  rules:
    - match: {paths: [/v1/chat/completions]}
      backends:
        - {name: local, provider: openai-compatible, url: 'http://127.0.0.1:18080/v1', weight: 1}
      rateLimit: {requestsPerMinute: 600}
---
apiVersion: bulwark.dev/v1alpha1
kind: ScannerPolicy
metadata:
  name: guard
  namespace: team-a
spec:
  input:
    - {type: secrets, action: redact}
";

const POD: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: bot
  namespace: team-a
  labels: {app: bot}
spec:
  serviceAccountName: default
  containers: [{name: app, image: example/app}]
";

/// The shipped examples apply with kubectl's default (strict) validation, and applying them again
/// changes nothing.
#[test]
fn kubectl_applies_the_examples() {
    let Some(kubectl) = find_kubectl("kubectl_applies_the_examples") else { return };
    let cluster = Cluster::start(kubectl, "examples");
    let apply = ["apply", "-f", "examples/quickstart/routes.yaml", "-f", "examples/reference/"];
    let first = cluster.ok(&apply);
    assert_all(&first, "created");
    assert_all(&cluster.ok(&apply), "unchanged");
    let listed = cluster.ok(&["get", "llmroutes", "-A"]);
    assert!(listed.contains("quickstart") && listed.contains("support-chat"), "{listed}");
    let deleted = cluster.ok(&["delete", "-f", "examples/quickstart/routes.yaml", "-f", "examples/reference/"]);
    assert!(deleted.lines().all(|line| line.contains("deleted")), "{deleted}");
}

/// CRDs, client-side and server-side apply, reads, validation errors, watch, wait, the typed
/// `create` subcommands (protobuf bodies), bound tokens and delete.
#[test]
fn kubectl_workflow() {
    let Some(kubectl) = find_kubectl("kubectl_workflow") else { return };
    let cluster = Cluster::start(kubectl, "workflow");
    let version = cluster.ok(&["version"]);
    assert!(version.contains("Server Version: v1."), "{version}");

    assert_all(&cluster.ok(&["apply", "-f", "crds/yaml/"]), "configured");
    assert_all(&cluster.ok(&["apply", "-f", "crds/yaml/"]), "unchanged");
    let established = cluster.ok(&[
        "get",
        "crd",
        "llmroutes.bulwark.dev",
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
    ]);
    assert_eq!(established, "True");

    let route = cluster.write("route.yaml", ROUTE);
    assert_all(&cluster.ok(&["apply", "-f", &route]), "created");
    assert_all(&cluster.ok(&["apply", "-f", &route]), "unchanged");
    let generation = ["get", "llmroute", "chat", "-n", "team-a", "-o", "jsonpath={.metadata.generation}"];
    assert_eq!(cluster.ok(&generation), "1");
    let edited = cluster.write("route.yaml", &ROUTE.replace("requestsPerMinute: 600", "requestsPerMinute: 700"));
    let configured = cluster.ok(&["apply", "-f", &edited]);
    assert!(configured.contains("llmroute.bulwark.dev/chat configured"), "{configured}");
    assert!(configured.contains("scannerpolicy.bulwark.dev/guard unchanged"), "{configured}");
    assert_eq!(cluster.ok(&generation), "2");
    assert_all(&cluster.ok(&["apply", "--server-side", "-f", &edited]), "serverside-applied");
    assert_eq!(cluster.ok(&generation), "2");

    let listed = cluster.ok(&["get", "llmroutes", "-A"]);
    assert!(listed.contains("team-a") && listed.contains("chat"), "{listed}");
    let yaml = cluster.ok(&["get", "llmr", "chat", "-n", "team-a", "-o", "yaml"]);
    assert!(yaml.contains("kind: LLMRoute") && yaml.contains("requestsPerMinute: 700"), "{yaml}");
    let name =
        cluster.ok(&["wait", "--for=jsonpath={.metadata.name}=chat", "llmroute/chat", "-n", "team-a", "--timeout=10s"]);
    assert!(name.contains("condition met"), "{name}");

    let unknown = cluster.write("unknown.yaml", &ROUTE.replace("  rules:\n", "  foo: 1\n  rules:\n"));
    let strict = cluster.fails(&["apply", "-f", &unknown]);
    assert!(strict.contains(r#"strict decoding error: unknown field "spec.foo""#), "{strict}");
    let mistyped = cluster.write("mistyped.yaml", &ROUTE.replace("weight: 1", "weight: heavy"));
    let invalid = cluster.fails(&["apply", "-f", &mistyped]);
    assert!(invalid.contains(r#"The LLMRoute "chat" is invalid"#), "{invalid}");
    assert!(invalid.contains("spec.rules[0].backends[0].weight in body must be of type integer"), "{invalid}");

    let mut watch = cluster
        .command(&["get", "llmroutes", "-n", "team-a", "--watch", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The watch's lines as they come: the label goes on once the watch has listed the route.
    let (lines, events) = std::sync::mpsc::channel();
    let stdout = BufReader::new(watch.stdout.take().unwrap());
    std::thread::spawn(move || stdout.lines().map_while(Result::ok).try_for_each(|l| lines.send(l)));
    let next = |what: &str| loop {
        let line = events.recv_timeout(Duration::from_secs(20));
        let line = line.unwrap_or_else(|e| panic!("no {what} event from kubectl --watch: {e}"));
        if !line.starts_with("EVENT") {
            break line;
        }
    };
    let added = next("ADDED");
    assert!(added.contains("ADDED") && added.contains("chat"), "{added}");
    cluster.ok(&["label", "llmroute", "chat", "-n", "team-a", "seen=yes"]);
    let modified = next("MODIFIED");
    assert!(modified.contains("MODIFIED") && modified.contains("chat"), "{modified}");
    watch.kill().unwrap();
    let _ = watch.wait();

    assert!(cluster.ok(&["create", "configmap", "settings", "--from-literal=mode=strict"]).contains("created"));
    assert_eq!(cluster.ok(&["get", "configmap", "settings", "-o", "jsonpath={.data.mode}"]), "strict");
    let pods = cluster.run(&["get", "pods"]);
    assert!(pods.status.success());
    assert!(String::from_utf8_lossy(&pods.stderr).contains("No resources found"));
    let pod = cluster.write("pod.yaml", POD);
    assert!(cluster.ok(&["apply", "-f", &pod]).contains("pod/bot created"));
    assert!(cluster.ok(&["get", "pods", "-n", "team-a"]).contains("bot"));
    let token = cluster.ok(&[
        "create",
        "token",
        "default",
        "-n",
        "team-a",
        "--audience=bulwark",
        "--bound-object-kind=Pod",
        "--bound-object-name=bot",
    ]);
    assert!(token.trim().len() > 20, "{token}");
    cluster.ok(&["create", "serviceaccount", "robot"]);
    assert!(!cluster.ok(&["create", "token", "robot"]).trim().is_empty());

    let deleted = cluster.ok(&["delete", "-f", &edited]);
    assert!(deleted.contains(r#"llmroute.bulwark.dev "chat" deleted"#), "{deleted}");
    let gone = cluster.run(&["get", "llmroutes", "-A"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("No resources found"));
}

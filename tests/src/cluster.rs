//! A cluster for end-to-end tests without a cluster: the project's test API server, the real
//! `kubectl`, the `bulwark-operator` and `bulwark-sidecar` binaries as processes, and a CA for
//! the config stream's TLS.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use bulwark_test_apiserver::{ApiServer, Options as ApiOptions};

/// Root of the repository.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A built binary of the workspace: `BULWARK_BIN/<name>`, else next to the test executable.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("BULWARK_BIN") {
        Some(d) => PathBuf::from(d),
        // target/debug/deps/<test> → target/debug
        None => {
            std::env::current_exe()?.parent().and_then(Path::parent).map(Path::to_path_buf).context("no target dir")?
        }
    };
    let path = dir.join(name);
    anyhow::ensure!(path.exists(), "{} is not built; run `cargo build --workspace --bins` first", path.display());
    Ok(path)
}

/// `KUBECTL`, else `.tools/bin/kubectl` (from `scripts/tools.sh`). `None` skips the test unless
/// `BULWARK_REQUIRE_KUBECTL=1`, which makes a missing kubectl an error.
pub fn kubectl_binary() -> anyhow::Result<Option<PathBuf>> {
    let path = std::env::var_os("KUBECTL").map_or_else(|| repo().join(".tools/bin/kubectl"), PathBuf::from);
    if path.exists() {
        return Ok(Some(path));
    }
    if std::env::var("BULWARK_REQUIRE_KUBECTL").is_ok_and(|v| v == "1") {
        anyhow::bail!("{} not found; run scripts/tools.sh", path.display());
    }
    eprintln!("skipped: no kubectl at {} (run scripts/tools.sh)", path.display());
    Ok(None)
}

/// A loopback port free right now, and never handed out before in this process: a port picked
/// here is bound later by a child, and until then the kernel may offer it again.
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: parking_lot::Mutex<std::collections::BTreeSet<u16>> =
        parking_lot::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if GIVEN.lock().insert(port) {
            return Ok(port);
        }
    }
}

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, as PEM files in `dir`.
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn tls(dir: &Path) -> anyhow::Result<Tls> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?.signed_by(&key, &ca)?;
    let out = Tls { ca: dir.join("ca.crt"), cert: dir.join("tls.crt"), key: dir.join("tls.key") };
    std::fs::write(&out.ca, ca.pem())?;
    std::fs::write(&out.cert, cert.pem())?;
    std::fs::write(&out.key, key.serialize_pem())?;
    Ok(out)
}

/// A child process, killed when dropped; its output goes to `<dir>/<name>.log`.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(
        dir: &Path,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", program.display()))?;
        Ok(Self { name: name.to_owned(), log, child: Some(child) })
    }

    /// SIGKILL: no goodbye, like a crashed or evicted pod.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit, like a rolling update.
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            Command::new("kill").arg("-TERM").arg(c.id().to_string()).status()?;
            for _ in 0..200 {
                if c.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            anyhow::bail!("{} did not exit within 10 s of SIGTERM", self.name);
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test API server, a kubeconfig for it, and kubectl.
pub struct Cluster {
    pub api: ApiServer,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub tls: Tls,
}

impl Cluster {
    /// `None` when kubectl is missing and not required.
    pub async fn start(prefix: &str) -> anyhow::Result<Option<Self>> {
        let Some(kubectl) = kubectl_binary()? else { return Ok(None) };
        let dir = crate::harness::temp_dir(prefix)?;
        let api = ApiServer::start(ApiOptions {
            listen: ([127, 0, 0, 1], 0).into(),
            crd_dirs: vec![repo().join("crds/yaml")],
        })
        .await?;
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let tls = tls(&dir)?;
        Ok(Some(Self { api, dir, kubeconfig, kubectl, tls }))
    }

    /// Runs kubectl; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        use std::io::Write as _;
        // The workspace's binaries come first on PATH, so `kubectl bulwark` finds the plugin.
        let plugins = bin("kubectl-bulwark").ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(plugins).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )?;
        let mut child = Command::new(&self.kubectl)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", path)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        anyhow::ensure!(out.status.success(), "kubectl {}: {}{}", args.join(" "), stderr.trim(), stdout.trim());
        Ok(stdout)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
    }

    /// A field of an object by JSONPath (`kubectl get -o jsonpath`).
    pub fn get(&self, ns: &str, what: &str, path: &str) -> anyhow::Result<String> {
        self.kubectl(&["get", "-n", ns, what, "-o", &format!("jsonpath={path}")])
    }

    /// A pod-bound token for audience `bulwark`, as a sidecar's projected token would be.
    pub fn token(&self, ns: &str, sa: &str, pod: &str) -> anyhow::Result<PathBuf> {
        let token = self.kubectl(&[
            "create",
            "token",
            sa,
            "-n",
            ns,
            "--audience",
            "bulwark",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod,
        ])?;
        let path = self.dir.join(format!("token-{ns}-{pod}"));
        std::fs::write(&path, token.trim())?;
        Ok(path)
    }

    /// Starts `bulwark-operator` against this cluster, its config stream on `stream` (a port
    /// from [`free_port`]; a restarted operator keeps its Service address, so reuse it then).
    pub fn operator(&self, identity: &str, stream: u16, extra: &[&str]) -> anyhow::Result<OperatorProc> {
        let metrics = free_port()?;
        let mut args: Vec<String> = vec![
            format!("--stream-listen=127.0.0.1:{stream}"),
            format!("--metrics-listen=127.0.0.1:{metrics}"),
            format!("--tls-cert={}", self.tls.cert.display()),
            format!("--tls-key={}", self.tls.key.display()),
            format!("--tls-ca={}", self.tls.ca.display()),
            format!("--identity={identity}"),
            "--lease-namespace=bulwark-system".into(),
            "--lease-duration=2s".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let kubeconfig = self.kubeconfig.display().to_string();
        let proc = Proc::spawn(
            &self.dir,
            identity,
            &bin("bulwark-operator")?,
            &args,
            &[("KUBECONFIG", &kubeconfig), ("BULWARK_LOG", "info,bulwark_operator=debug")],
        )?;
        Ok(OperatorProc { proc, stream, metrics })
    }

    /// Starts `bulwark-sidecar` for `pod`, connected to the operator on `stream_port`.
    pub fn sidecar(&self, ns: &str, pod: &str, stream_port: u16, extra: &[&str]) -> anyhow::Result<SidecarProc> {
        let token = self.token(ns, "default", pod)?;
        let (listen, admin) = (free_port()?, free_port()?);
        let mut args: Vec<String> = vec![
            format!("--operator=https://localhost:{stream_port}"),
            format!("--operator-ca={}", self.tls.ca.display()),
            format!("--token-file={}", token.display()),
            format!("--listen=127.0.0.1:{listen}"),
            format!("--admin=127.0.0.1:{admin}"),
            "--report-interval=1s".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let proc = Proc::spawn(&self.dir, &format!("sidecar-{pod}"), &bin("bulwark-sidecar")?, &args, &[])?;
        Ok(SidecarProc { proc, listen, admin })
    }
}

pub struct OperatorProc {
    pub proc: Proc,
    pub stream: u16,
    pub metrics: u16,
}

pub struct SidecarProc {
    pub proc: Proc,
    pub listen: u16,
    pub admin: u16,
}

impl SidecarProc {
    /// The config it serves (`GET /config` on the admin listener), if it answers.
    pub async fn config(&self) -> Option<serde_json::Value> {
        let reply = crate::client::Client::new(format!("http://127.0.0.1:{}", self.admin)).get("/config").await.ok()?;
        Some(reply.json())
    }

    /// The version of the config it serves.
    pub async fn version(&self) -> Option<String> {
        self.config().await.and_then(|c| c["version"].as_str().map(str::to_owned))
    }
}

/// An LLMRoute `chat` in `ns` for the pods labelled `app: bot`: one rule over backends `a` and
/// `b` (base URLs of mock providers) with these weights.
pub fn weighted_route(ns: &str, a: &str, b: &str, weights: (u32, u32)) -> String {
    format!(
        r#"apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {{name: chat, namespace: {ns}}}
spec:
  workloadSelector: {{matchLabels: {{app: bot}}}}
  rules:
    - backends:
        - {{name: a, provider: openai-compatible, url: "{a}/v1", weight: {}}}
        - {{name: b, provider: openai-compatible, url: "{b}/v1", weight: {}}}
"#,
        weights.0, weights.1
    )
}

/// Waits until every sidecar runs the same non-empty version other than `old`; returns it.
pub async fn converged(sidecars: &[SidecarProc], old: &str, limit: Duration) -> anyhow::Result<String> {
    eventually(limit, "every sidecar to apply the new config", || async {
        let first = sidecars.first()?.version().await?;
        if first.is_empty() || first == old {
            return None;
        }
        for s in &sidecars[1..] {
            if s.version().await? != first {
                return None;
            }
        }
        Some(first)
    })
    .await
}

/// Polls `check` every 5 ms until it returns `Some`, or fails after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

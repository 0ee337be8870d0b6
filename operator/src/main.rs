//! `bulwark-operator`: reconciles LLMRoute, ScannerPolicy and ModelRollout resources into sidecar
//! configs, streams them to sidecars on :15010 and serves /metrics /healthz /readyz on :8080.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use bulwark_api::{CompileOptions, Duration as Dur};
use bulwark_operator::{Operator, Settings, Webhook, leader};
use clap::{ArgAction, Parser};

#[derive(Parser, Debug)]
#[command(name = "bulwark-operator", version, about = "Reconciles Bulwark resources and programs the sidecars")]
struct Cli {
    /// Watch this namespace only (default: every namespace).
    #[arg(long, env = "BULWARK_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Compete for a Lease so that only one replica writes.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    leader_elect: bool,
    /// List and watch Secrets (metadata only) to report a route whose credentials name a
    /// missing Secret; `false` needs no Secret list/watch permission and reports none.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    watch_secrets: bool,
    #[arg(long, default_value = "bulwark-operator")]
    lease_name: String,
    /// Namespace of the Lease: the operator's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// A replica that sees the lease unrenewed this long takes over.
    #[arg(long, default_value = "15s")]
    lease_duration: Dur,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, default_value = "0.0.0.0:15010")]
    stream_listen: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Certificate (PEM) of the config stream; without it the stream is plain HTTP/2.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that signed --tls-cert; copied into each config ConfigMap for the sidecars.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Audience sidecar tokens must carry.
    #[arg(long, default_value = bulwark_api::control::TOKEN_AUDIENCE)]
    token_audience: String,
    /// Where sidecars find Secrets named by secretKeyRef: <dir>/<secret>/<key>.
    #[arg(long, default_value = "/var/run/secrets/bulwark")]
    secrets_dir: String,
    /// Let resources name the sidecars' own environment variables and files as credentials
    /// (`env`, `file`); off, only `secretKeyRef` is taken, and a resource naming others is Invalid.
    #[arg(long, default_value_t = false)]
    allow_local_credentials: bool,
    /// How often every status is rewritten even without a change.
    #[arg(long, default_value = "5m")]
    resync: Dur,
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Serve the sidecar injection webhook here (HTTPS: API servers call webhooks over TLS only), e.g. 0.0.0.0:9443.
    #[arg(long, requires_all = ["sidecar_image", "stream_url", "tls_cert"])]
    webhook_listen: Option<SocketAddr>,
    /// The sidecar image the webhook injects.
    #[arg(long)]
    sidecar_image: Option<String>,
    /// The config stream as injected sidecars reach it, e.g. https://bulwark-operator.bulwark-system.svc:15010.
    #[arg(long)]
    stream_url: Option<String>,
    /// Pods annotated bulwark.dev/intercept-tls may have TLS terminated by their sidecar: the
    /// operator keeps a CA per namespace (Secret bulwark-intercept-ca) and a trust bundle
    /// (ConfigMap bulwark-trust-bundle), and renews the CA.
    #[arg(long, requires = "webhook_listen")]
    tls_interception: bool,
    /// The ed25519 public key injected sidecars check model directories' signatures with: PEM
    /// text, or a file holding it.
    #[arg(long, env = "BULWARK_MODEL_PUBLIC_KEY", value_name = "PEM")]
    model_public_key: Option<String>,
    /// KEDA is installed: ModelServers with `autoscaling.engine: keda` get a ScaledObject.
    #[arg(long)]
    keda: bool,
    /// The Prometheus that KEDA's triggers query when a ModelServer names none.
    #[arg(long, value_name = "URL")]
    prometheus_address: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG").unwrap_or_else(|_| "info".into());
    if cli.log_format == "json" {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    // The key as PEM text, or a file holding it; the sidecars get the PEM.
    let model_public_key = cli.model_public_key.as_deref().filter(|k| !k.trim().is_empty()).map(|k| {
        let pem = std::fs::read_to_string(k).unwrap_or_else(|_| k.to_owned());
        bulwark_api::policy::model_key(&pem).map(|_| pem)
    });
    let model_public_key = match model_public_key.transpose() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("bulwark-operator: --model-public-key is {e}");
            return ExitCode::from(2);
        }
    };
    let identity = cli.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let settings = Settings {
        namespace: cli.namespace.filter(|n| !n.is_empty()),
        watch_secrets: cli.watch_secrets,
        stream_listen: cli.stream_listen,
        metrics_listen: cli.metrics_listen,
        tls: cli.tls_cert.zip(cli.tls_key),
        tls_ca: cli.tls_ca,
        token_audience: cli.token_audience,
        compile: CompileOptions { secrets_dir: cli.secrets_dir, local_credentials: cli.allow_local_credentials },
        leader: cli.leader_elect.then(|| leader::Settings {
            namespace: cli.lease_namespace,
            name: cli.lease_name,
            identity: identity.clone(),
            duration: cli.lease_duration.as_std().max(Duration::from_secs(1)),
            pod: std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()),
        }),
        identity,
        resync: cli.resync.as_std().max(Duration::from_secs(10)),
        servers: bulwark_operator::servers::Settings { keda: cli.keda, prometheus_address: cli.prometheus_address },
        webhook: cli.webhook_listen.map(|listen| Webhook {
            listen,
            image: cli.sidecar_image.unwrap_or_default(),
            stream_url: cli.stream_url.unwrap_or_default(),
            tls_interception: cli.tls_interception,
            model_public_key,
        }),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwark-operator: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bulwark-operator: no Kubernetes API access (in-cluster or KUBECONFIG): {e}");
                return ExitCode::FAILURE;
            }
        };
        let op = match Operator::start(client, settings).await {
            Ok(op) => op,
            Err(e) => {
                eprintln!("bulwark-operator: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        shutdown_signal().await;
        tracing::info!("shutting down");
        op.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or_default(),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

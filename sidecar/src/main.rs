//! `bulwark-sidecar`: runs the proxy standalone on a directory of resources (`--manifests`,
//! where it also drives the rollouts), on a compiled config (`--config`), or on the operator's
//! stream (`--operator`); `bulwark-sidecar redirect` installs the nat rules of transparent
//! capture (the init container). These flag spellings are stable.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use bulwark_api::{CompileOptions, Duration as Dur, Workload};
use bulwark_sidecar::{
    Options, Sidecar, Source,
    capture::{self, Backend, Capture, Cidr},
    control::OperatorLink,
    upstream::Ca,
};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bulwark-sidecar",
    version,
    about = "LLM API proxy: routing, fallbacks, rate limits, caching, metrics",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Directory of LLMRoute / ScannerPolicy / ModelRollout YAML (standalone mode).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "operator"], required_unless_present_any = ["config", "operator"])]
    manifests: Option<PathBuf>,
    /// A compiled sidecar config file (the operator's ConfigMap copy; with --operator, the
    /// fallback while the operator is unreachable).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The operator's config stream, e.g. https://bulwark-operator.bulwark-system.svc:15010.
    #[arg(long, env = "BULWARK_OPERATOR", value_name = "URL")]
    operator: Option<String>,
    /// CA certificate (PEM) of the operator's config stream.
    #[arg(long, env = "BULWARK_OPERATOR_CA", value_name = "FILE")]
    operator_ca: Option<PathBuf>,
    /// The same CA as PEM text (the injection webhook sets BULWARK_OPERATOR_CA_PEM).
    #[arg(
        long,
        env = "BULWARK_OPERATOR_CA_PEM",
        value_name = "PEM",
        conflicts_with = "operator_ca",
        hide_env_values = true
    )]
    operator_ca_pem: Option<String>,
    /// Projected service-account token (audience `bulwark`) that proves this pod to the operator.
    #[arg(long, value_name = "FILE", default_value = "/var/run/secrets/bulwark/token")]
    token_file: PathBuf,
    /// How often outcome counters are reported to the operator.
    #[arg(long, default_value = "5s")]
    report_interval: Dur,
    /// Address (or port on 127.0.0.1) of the LLM API listener.
    #[arg(long, value_name = "ADDR", default_value = bulwark_sidecar::DEFAULT_LISTEN, value_parser = addr)]
    listen: SocketAddr,
    /// Address (or port on 127.0.0.1) of the admin listener: /metrics /ready /live /config /rollouts.
    #[arg(long, value_name = "ADDR", default_value = bulwark_sidecar::DEFAULT_ADMIN, value_parser = addr)]
    admin: SocketAddr,
    /// With --manifests: compile for this namespace only (default: every namespace).
    #[arg(long, env = "BULWARK_NAMESPACE")]
    namespace: Option<String>,
    /// With --namespace: this pod's labels, `k=v,k2=v2`, for routes' workloadSelector.
    #[arg(long, env = "BULWARK_POD_LABELS", value_name = "LABELS", default_value = "")]
    labels: String,
    /// Where Secrets named by secretKeyRef are mounted: <dir>/<secret>/<key>.
    #[arg(long, default_value = "/var/run/secrets/bulwark")]
    secrets_dir: String,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Time a client has to send a request's headers (slowloris), on every listener.
    #[arg(long, default_value = "30s")]
    header_timeout: Dur,
    /// Time a client has to send a request's whole body.
    #[arg(long, default_value = "30s")]
    body_timeout: Dur,
    /// With --manifests: where the rollouts this sidecar drives keep their state, so that a
    /// restart resumes them (in the same step) instead of starting over.
    #[arg(long, value_name = "DIR", requires = "manifests")]
    state_dir: Option<PathBuf>,
    /// How often the config source is checked for changes.
    #[arg(long, default_value = "1s")]
    reload_interval: Dur,
    /// Extra CA certificate (PEM) trusted for upstream TLS, besides the system roots.
    #[arg(long, env = "BULWARK_UPSTREAM_CA", value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// Directory of the default models (`minilm/`), as `make models` builds them.
    #[arg(long, env = "BULWARK_MODELS_DIR", value_name = "DIR")]
    models_dir: Option<PathBuf>,
    /// ONNX Runtime library (libonnxruntime.so, 1.31 or newer); else ORT_DYLIB_PATH.
    #[arg(long, value_name = "FILE")]
    onnxruntime: Option<PathBuf>,
    /// Inference threads per loaded model.
    #[arg(long, default_value_t = 1)]
    model_threads: usize,
    /// The ed25519 key model directories must be signed with (their `manifest.sig`), unless a
    /// policy names its own: a PEM `PUBLIC KEY`, the raw key in base64, or a file of either.
    #[arg(long, env = "BULWARK_MODEL_PUBLIC_KEY", value_name = "KEY")]
    model_public_key: Option<String>,
    /// Port of the listener for captured connections (on 127.0.0.1 and ::1), where the rules of
    /// `redirect` send the pod's outbound traffic.
    #[arg(long, value_name = "PORT")]
    transparent: Option<u16>,
    /// With --transparent: terminate TLS to hosts a route names with certificates minted by this
    /// CA (DIR/tls.crt, DIR/tls.key), which the apps trust; other TLS passes through.
    #[arg(long, value_name = "DIR", requires = "transparent")]
    intercept_ca: Option<PathBuf>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Installs the nat OUTPUT rules that send this network namespace's outbound TCP to the
    /// sidecar's --transparent port (chains BULWARK_OUTPUT and BULWARK_REDIRECT); idempotent.
    Redirect(RedirectArgs),
}

#[derive(clap::Args, Debug)]
struct RedirectArgs {
    /// The uid the sidecar runs as: its own connections are not captured.
    #[arg(long, value_name = "UID", required_unless_present = "remove")]
    proxy_uid: Option<u32>,
    /// The sidecar's --transparent port.
    #[arg(long, value_name = "PORT", required_unless_present = "remove")]
    redirect_port: Option<u16>,
    /// Destination ports captured.
    #[arg(long, value_delimiter = ',', default_value = "80,443")]
    ports: Vec<u16>,
    /// Destination ports never captured.
    #[arg(long, value_delimiter = ',', value_name = "P,..")]
    exclude_ports: Vec<u16>,
    /// Destinations never captured (10.0.0.0/8, 2001:db8::/32).
    #[arg(long, value_delimiter = ',', value_name = "C,..")]
    exclude_cidrs: Vec<Cidr>,
    /// Only these destinations are captured.
    #[arg(long, value_delimiter = ',', value_name = "C,..")]
    include_cidrs: Vec<Cidr>,
    /// The iptables backend: the one the node uses (auto), nft or legacy.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Prints the rules instead of installing them.
    #[arg(long)]
    dry_run: bool,
    /// Deletes the rules.
    #[arg(long, conflicts_with = "dry_run")]
    remove: bool,
}

fn redirect(a: RedirectArgs) -> ExitCode {
    let backend = || Backend::parse(&a.backend).map_err(anyhow::Error::msg);
    let result = if a.remove {
        backend().and_then(capture::remove)
    } else {
        let capture = Capture {
            proxy_uid: a.proxy_uid.unwrap_or_default(),
            redirect_port: a.redirect_port.unwrap_or_default(),
            ports: a.ports,
            exclude_ports: a.exclude_ports,
            exclude_cidrs: a.exclude_cidrs,
            include_cidrs: a.include_cidrs,
        };
        if capture.ports.is_empty() {
            eprintln!("bulwark-sidecar redirect: --ports: name at least one port");
            return ExitCode::from(2);
        }
        if a.dry_run {
            print!("{}", capture::dry_run(&capture));
            return ExitCode::SUCCESS;
        }
        backend().and_then(|b| capture::install(&capture, b))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark-sidecar redirect: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(([127, 0, 0, 1], port).into());
    }
    s.parse().map_err(|_| format!("{s:?} is not an address like 127.0.0.1:15080 or a port"))
}

fn labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| format!("label {p:?} is not k=v"))
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Redirect(args)) = cli.command {
        return redirect(args);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULWARK_LOG").unwrap_or_else(|_| "info".into());
    if cli.log_format == "json" {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let source = match (&cli.manifests, &cli.config) {
        (Some(dir), _) => {
            let workload = match (&cli.namespace, labels(&cli.labels)) {
                (_, Err(e)) => {
                    eprintln!("bulwark-sidecar: --labels: {e}");
                    return ExitCode::from(2);
                }
                (Some(ns), Ok(l)) => Some(Workload { namespace: ns.clone(), labels: l }),
                (None, Ok(_)) => None,
            };
            Source::Manifests {
                dir: dir.clone(),
                workload,
                options: CompileOptions { secrets_dir: cli.secrets_dir.clone(), local_credentials: true },
            }
        }
        (None, Some(file)) => Source::File(file.clone()),
        (None, None) if cli.operator.is_some() => Source::None,
        (None, None) => {
            eprintln!("bulwark-sidecar: give --manifests DIR, --config FILE or --operator URL");
            return ExitCode::from(2);
        }
    };
    let mut opts = Options::new(source);
    opts.listen = cli.listen;
    opts.admin = cli.admin;
    opts.limits.max_body_bytes = cli.max_body_bytes;
    opts.limits.header_timeout = cli.header_timeout.as_std().max(Duration::from_millis(100));
    opts.limits.body_timeout = cli.body_timeout.as_std().max(Duration::from_millis(100));
    opts.reload_interval = cli.reload_interval.as_std().max(Duration::from_millis(50));
    opts.upstream_ca = cli.upstream_ca;
    opts.state_dir = cli.state_dir;
    opts.transparent = cli.transparent;
    opts.intercept_ca = cli.intercept_ca;
    opts.models.models_dir = cli.models_dir;
    opts.models.onnxruntime = cli.onnxruntime;
    opts.models.threads = cli.model_threads.max(1);
    match cli.model_public_key.as_deref().map(bulwark_sidecar::scan::model::ModelKey::from_arg).transpose() {
        Ok(key) => opts.models.public_key = key,
        Err(e) => {
            eprintln!("bulwark-sidecar: --model-public-key: {e}");
            return ExitCode::from(2);
        }
    }
    opts.operator = cli.operator.map(|url| OperatorLink {
        url,
        ca: cli.operator_ca.map(Ca::File).or(cli.operator_ca_pem.map(Ca::Pem)),
        token_file: cli.token_file,
        report_interval: cli.report_interval.as_std().max(Duration::from_millis(100)),
    });
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwark-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let sidecar = match Sidecar::start(opts).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bulwark-sidecar: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        sidecar.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

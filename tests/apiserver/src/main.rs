//! `bulwark-test-apiserver`: runs the in-memory Kubernetes API server until interrupted.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use bulwark_test_apiserver::{ApiServer, Options};
use clap::Parser;

/// A stateful in-memory Kubernetes API server for tests (plain HTTP, no authentication).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// CRD manifests to install at startup: a YAML file or a directory of them (repeatable).
    #[arg(long = "crds")]
    crds: Vec<PathBuf>,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let server = ApiServer::start(Options { listen: args.listen, crd_dirs: args.crds }).await?;
    if let Some(path) = &args.kubeconfig {
        server.write_kubeconfig(path)?;
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", server.url())?;
    stdout.flush()?;
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}

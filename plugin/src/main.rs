//! `kubectl-bulwark`, the kubectl plugin: `kubectl bulwark rollout status|promote|pause|resume|
//! abort|retry NAME [-n NS]`. The controls patch the rollout's status subresource (never its
//! spec, which Git owns); the operator's rollout driver acts on them within a second.

mod control;
mod render;

use std::{io::IsTerminal as _, process::ExitCode, time::Duration};

use bulwark_api::{ModelRollout, rollout::RolloutPhase};
use clap::{Parser, Subcommand};
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams},
};

use bulwark_api::rollout::control::Action;

/// The field manager of the plugin's status patches.
const FIELD_MANAGER: &str = "kubectl-bulwark";

#[derive(Parser, Debug)]
#[command(name = "kubectl-bulwark", bin_name = "kubectl bulwark", version, about = "Bulwark from kubectl")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Watch and steer ModelRollouts.
    Rollout {
        #[command(subcommand)]
        action: RolloutCommand,
    },
}

#[derive(clap::Args, Debug)]
struct Target {
    /// The ModelRollout.
    name: String,
    /// Its namespace (default: the kubeconfig context's).
    #[arg(short, long)]
    namespace: Option<String>,
}

#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// The step, the weights, and each signal of the last analysis against its threshold.
    Status {
        #[command(flatten)]
        target: Target,
        /// Follow it live until it ends (exit 1 if it rolls back, aborts or fails).
        #[arg(short, long)]
        watch: bool,
    },
    /// Go on to the next step (or with --full to the last).
    Promote {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        full: bool,
    },
    /// Hold the current step; analysis goes on, and a failing canary is still rolled back.
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Undo a pause.
    Resume {
        #[command(flatten)]
        target: Target,
    },
    /// Send the canary no traffic until a retry or a new spec.
    Abort {
        #[command(flatten)]
        target: Target,
    },
    /// Start a rolled back, aborted or failed rollout over from its first step.
    Retry {
        #[command(flatten)]
        target: Target,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn api(target: &Target) -> anyhow::Result<(Api<ModelRollout>, String)> {
    let config = Config::infer()
        .await
        .map_err(|e| anyhow::anyhow!("no Kubernetes API access (KUBECONFIG or in-cluster): {e}"))?;
    let ns = target.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)?;
    Ok((Api::namespaced(client, &ns), ns))
}

async fn get(api: &Api<ModelRollout>, ns: &str, name: &str) -> anyhow::Result<ModelRollout> {
    match api.get(name).await {
        Ok(r) => Ok(r),
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!("no ModelRollout {name:?} in namespace {ns:?}"),
        Err(e) => Err(e.into()),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Command::Rollout { action } = cli.command;
    let (target, action) = match action {
        RolloutCommand::Status { target, watch } => return status(&target, watch).await,
        RolloutCommand::Promote { target, full } => (target, Action::Promote { full }),
        RolloutCommand::Pause { target } => (target, Action::Pause),
        RolloutCommand::Resume { target } => (target, Action::Resume),
        RolloutCommand::Abort { target } => (target, Action::Abort),
        RolloutCommand::Retry { target } => (target, Action::Retry),
    };
    let (api, ns) = api(&target).await?;
    let r = get(&api, &ns, &target.name).await?;
    let patch = control::patch(&r, action).map_err(anyhow::Error::msg)?;
    let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
    api.patch_status(&target.name, &pp, &Patch::Merge(&patch)).await?;
    println!("modelrollout.bulwark.dev/{} {} requested", target.name, action.name());
    Ok(ExitCode::SUCCESS)
}

async fn status(target: &Target, watch: bool) -> anyhow::Result<ExitCode> {
    let (api, ns) = api(target).await?;
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let r = get(&api, &ns, &target.name).await?;
        let text = render::status(&r, Timestamp::now());
        if !watch {
            print!("{text}");
            return Ok(ExitCode::SUCCESS);
        }
        if tty {
            print!("\x1b[2J\x1b[H{text}");
        } else if strip_clock(&text) != strip_clock(&last) {
            println!("{text}");
        }
        last = text;
        let phase = r.status.as_ref().and_then(|s| s.phase);
        match phase {
            Some(RolloutPhase::Succeeded) => return Ok(ExitCode::SUCCESS),
            Some(RolloutPhase::RolledBack | RolloutPhase::Aborted | RolloutPhase::Failed) => {
                return Ok(ExitCode::FAILURE);
            }
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// The view without the lines that change with the clock alone, so that a log shows changes.
fn strip_clock(text: &str) -> String {
    text.lines().filter(|l| !l.starts_with("Step:") && !l.starts_with("Analysis:")).collect::<Vec<_>>().join("\n")
}

//! Where the config comes from: a compiled `SidecarConfig` file, or a directory of resource
//! YAML compiled in-process (standalone). Both are polled; a changed source is loaded, built
//! and swapped in atomically; a bad one is refused and the last good config keeps serving.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bulwark_api::{CompileOptions, SidecarConfig, Workload, compile, manifest};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::{
    metrics::Metrics,
    rollouts::{Prepared, Rollouts},
    runtime::{Runtime, Shared},
};

#[derive(Clone, Debug)]
pub enum Source {
    /// A compiled config (YAML or JSON), as the operator writes it into a ConfigMap.
    File(PathBuf),
    /// A directory of LLMRoute / ScannerPolicy / ModelRollout YAML files.
    Manifests { dir: PathBuf, workload: Option<Workload>, options: CompileOptions },
    /// No local copy: the config comes from the operator alone.
    None,
}

impl Source {
    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        match self {
            Self::File(p) => Ok(vec![p.clone()]),
            Self::None => Ok(vec![]),
            Self::Manifests { dir, .. } => {
                let mut out = vec![];
                collect_yaml(dir, &mut out)?;
                out.sort();
                Ok(out)
            }
        }
    }

    /// Reads every file of the source once.
    pub fn read(&self) -> Result<Snapshot, String> {
        let files = self.files().map_err(|e| self.io_error(&e))?;
        let files = files
            .into_iter()
            .map(|f| std::fs::read(&f).map(|bytes| (f.clone(), bytes)).map_err(|e| format!("{}: {e}", f.display())))
            .collect::<Result<_, _>>()?;
        Ok(Snapshot { files })
    }

    fn io_error(&self, e: &std::io::Error) -> String {
        match self {
            Self::File(p) => format!("{}: {e}", p.display()),
            Self::Manifests { dir, .. } => format!("{}: {e}", dir.display()),
            Self::None => e.to_string(),
        }
    }

    /// Compiles what was read. Any invalid document or resource fails the whole load, so a
    /// typo never silently removes a route that was serving. With a rollout driver, rollouts
    /// are compiled with the driver's status; what the driver will hold once the load is
    /// accepted comes back with the config.
    pub fn load(
        &self,
        snapshot: &Snapshot,
        rollouts: Option<&Rollouts>,
    ) -> Result<(SidecarConfig, Option<Prepared>), String> {
        let text = |(path, bytes): &(PathBuf, Vec<u8>)| {
            std::str::from_utf8(bytes).map_err(|e| format!("{}: {e}", path.display())).map(str::to_owned)
        };
        match self {
            Self::None => Ok((SidecarConfig::default(), None)),
            Self::File(path) => {
                let text = snapshot.files.first().map(text).transpose()?.unwrap_or_default();
                let mut config: SidecarConfig = serde_yaml::from_str(&text)
                    .map_err(|e| format!("{}: not a valid sidecar config: {e}", path.display()))?;
                config.version = bulwark_api::compile::version_of(&config);
                Ok((config, None))
            }
            Self::Manifests { dir, workload, options } => {
                let mut resources = manifest::Resources::default();
                let mut problems = vec![];
                for file in &snapshot.files {
                    let (res, errors) = manifest::parse(&text(file)?, "default");
                    problems.extend(errors.iter().map(|e| format!("{}: {e}", file.0.display())));
                    resources.extend(res);
                }
                problems.extend(resources.duplicates().into_iter().map(|d| format!("{d} is defined more than once")));
                if resources.is_empty() && problems.is_empty() {
                    return Err(format!("{}: no LLMRoute, ScannerPolicy or ModelRollout found", dir.display()));
                }
                let prepared =
                    rollouts.map(|r| r.prepare(&mut resources, k8s_openapi::jiff::Timestamp::now())).transpose()?;
                let compiled = compile(&resources, workload.as_ref(), options);
                problems.extend(compiled.rejected.iter().map(ToString::to_string));
                if problems.is_empty() { Ok((compiled.config, prepared)) } else { Err(problems.join("\n")) }
            }
        }
    }
}

/// The files of a source as read at one moment, so the change check and the load agree.
pub struct Snapshot {
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl Snapshot {
    /// A hash of the content; equal hashes need no reload.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for (path, bytes) in &self.files {
            h.update(path.as_os_str().as_encoded_bytes());
            h.update(bytes);
        }
        h.finalize().into()
    }
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        // Kubernetes ConfigMap volumes keep old copies in `..<timestamp>` directories.
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.push(path);
        }
    }
    Ok(())
}

/// Builds a runtime from what was read, or says exactly why not.
pub fn build(
    source: &Source,
    snapshot: &Snapshot,
    shared: &Shared,
    rollouts: Option<&Rollouts>,
) -> Result<(Runtime, Option<Prepared>), String> {
    let (config, prepared) = source.load(snapshot, rollouts)?;
    Ok((Runtime::build(config, shared)?, prepared))
}

/// Keeps the served config current with its source: polls it, swaps in each new good config,
/// and with a rollout driver compiles again whenever a rollout moves traffic.
pub struct Reloader {
    pub source: Source,
    pub shared: Arc<Shared>,
    pub tx: watch::Sender<Arc<Runtime>>,
    pub metrics: Arc<Metrics>,
    /// While true (the operator stream is open and newer than any file), changes are noted but
    /// not applied.
    pub stand_aside: Option<Arc<AtomicBool>>,
    pub rollouts: Option<Arc<Rollouts>>,
}

impl Reloader {
    fn aside(&self) -> bool {
        self.stand_aside.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// Runs until `shutdown` fires. `loaded` is the fingerprint of what the current config was
    /// built from.
    pub async fn run(self, loaded: Option<[u8; 32]>, every: Duration, mut shutdown: watch::Receiver<bool>) {
        if matches!(self.source, Source::None) {
            return;
        }
        let mut last = loaded;
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let moved = async {
                match &self.rollouts {
                    Some(r) => r.changed.notified().await,
                    None => std::future::pending().await,
                }
            };
            let force = tokio::select! {
                _ = interval.tick() => false,
                _ = moved => true,
                _ = shutdown.changed() => return,
            };
            let snapshot = match self.source.read() {
                Ok(s) => s,
                Err(e) => {
                    if last.is_some() {
                        let version = self.tx.borrow().config.version.clone();
                        tracing::error!("config source unreadable, keeping version {version}: {e}");
                        self.metrics.reload(false);
                        last = None;
                    }
                    continue;
                }
            };
            let fp = snapshot.fingerprint();
            if last == Some(fp) && !force {
                continue;
            }
            last = Some(fp);
            if self.aside() {
                continue;
            }
            match build(&self.source, &snapshot, &self.shared, self.rollouts.as_deref()) {
                Ok((rt, prepared)) => self.swap(rt, prepared, force),
                Err(e) => {
                    self.metrics.reload(false);
                    let version = self.tx.borrow().config.version.clone();
                    tracing::error!("new config rejected, still serving version {version}:\n{e}");
                }
            }
        }
    }

    /// Swaps in a new runtime (when its version differs) and commits what the driver prepared.
    fn swap(&self, rt: Runtime, prepared: Option<Prepared>, rollout_moved: bool) {
        let version = rt.config.version.clone();
        let old = self.tx.borrow().config.version.clone();
        // Checked again at the swap: the stream may have opened while this built.
        let mut aside = false;
        let swapped = self.tx.send_if_modified(|current| {
            aside = self.aside();
            if aside || current.config.version == version {
                return false;
            }
            *current = Arc::new(rt);
            true
        });
        if aside {
            return;
        }
        if let (Some(r), Some(p)) = (&self.rollouts, prepared) {
            r.commit(p);
        }
        if swapped {
            self.metrics.set_version(&version);
            if rollout_moved {
                tracing::info!(version = %version, previous = %old, "config compiled again: a rollout moved traffic");
            } else {
                tracing::info!(version = %version, previous = %old, "config reloaded");
            }
        }
        if !rollout_moved {
            self.metrics.reload(true);
        }
    }
}

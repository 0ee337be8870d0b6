//! Where the config comes from: a compiled `SidecarConfig` file, or a directory of resource
//! YAML compiled in-process (standalone). Both are polled; a changed source is loaded, built
//! and swapped in atomically; a bad one is refused and the last good config keeps serving.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bulwark_api::{CompileOptions, SidecarConfig, Workload, compile, manifest};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::{
    metrics::{Metrics, ReloadLabels},
    runtime::{Runtime, Shared},
};

#[derive(Clone, Debug)]
pub enum Source {
    /// A compiled config (YAML or JSON), as the operator writes it into a ConfigMap.
    File(PathBuf),
    /// A directory of LLMRoute / ScannerPolicy / ModelRollout YAML files.
    Manifests { dir: PathBuf, workload: Option<Workload>, options: CompileOptions },
}

impl Source {
    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        match self {
            Self::File(p) => Ok(vec![p.clone()]),
            Self::Manifests { dir, .. } => {
                let mut out = vec![];
                collect_yaml(dir, &mut out)?;
                out.sort();
                Ok(out)
            }
        }
    }

    /// A hash of the source's content; equal hashes need no reload.
    pub fn fingerprint(&self) -> Result<[u8; 32], String> {
        let mut h = Sha256::new();
        for f in self.files().map_err(|e| self.io_error(&e))? {
            h.update(f.as_os_str().as_encoded_bytes());
            h.update(std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?);
        }
        Ok(h.finalize().into())
    }

    fn io_error(&self, e: &std::io::Error) -> String {
        match self {
            Self::File(p) => format!("{}: {e}", p.display()),
            Self::Manifests { dir, .. } => format!("{}: {e}", dir.display()),
        }
    }

    /// Reads and compiles the source. Any invalid document or resource fails the whole load,
    /// so a typo never silently removes a route that was serving.
    pub fn load(&self) -> Result<SidecarConfig, String> {
        match self {
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut config: SidecarConfig = serde_yaml::from_str(&text)
                    .map_err(|e| format!("{}: not a valid sidecar config: {e}", path.display()))?;
                config.version = bulwark_api::compile::version_of(&config);
                Ok(config)
            }
            Self::Manifests { dir, workload, options } => {
                let mut resources = manifest::Resources::default();
                let mut problems = vec![];
                for f in self.files().map_err(|e| self.io_error(&e))? {
                    let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
                    let (res, errors) = manifest::parse(&text, "default");
                    problems.extend(errors.iter().map(|e| format!("{}: {e}", f.display())));
                    resources.extend(res);
                }
                if resources.is_empty() && problems.is_empty() {
                    return Err(format!("{}: no LLMRoute, ScannerPolicy or ModelRollout found", dir.display()));
                }
                let compiled = compile(&resources, workload.as_ref(), options);
                problems.extend(compiled.rejected.iter().map(ToString::to_string));
                if problems.is_empty() { Ok(compiled.config) } else { Err(problems.join("\n")) }
            }
        }
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

/// Loads the source into a runtime, or says exactly why not.
pub fn build(source: &Source, shared: &Shared) -> Result<Runtime, String> {
    Runtime::build(source.load()?, shared)
}

/// Polls the source and swaps in each new good config until `shutdown` fires. `loaded` is
/// the fingerprint of what the current config was built from.
pub async fn watch(
    source: Source,
    loaded: Option<[u8; 32]>,
    every: Duration,
    shared: Arc<Shared>,
    tx: watch::Sender<Arc<Runtime>>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = loaded;
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        let fp = match source.fingerprint() {
            Ok(fp) => fp,
            Err(e) => {
                if last.is_some() {
                    tracing::error!("config source unreadable, keeping version {}: {e}", tx.borrow().config.version);
                    metrics.reloads.get_or_create(&ReloadLabels { result: "error" }).inc();
                    last = None;
                }
                continue;
            }
        };
        if last == Some(fp) {
            continue;
        }
        last = Some(fp);
        match build(&source, &shared) {
            Ok(rt) => {
                let version = rt.config.version.clone();
                let old = tx.borrow().config.version.clone();
                if version != old {
                    metrics.set_version(&version);
                    tx.send_replace(Arc::new(rt));
                    tracing::info!(version = %version, previous = %old, "config reloaded");
                }
                metrics.reloads.get_or_create(&ReloadLabels { result: "success" }).inc();
            }
            Err(e) => {
                metrics.reloads.get_or_create(&ReloadLabels { result: "error" }).inc();
                tracing::error!("new config rejected, still serving version {}:\n{e}", tx.borrow().config.version);
            }
        }
    }
}

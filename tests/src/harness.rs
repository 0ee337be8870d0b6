//! A sidecar in-process for scenario tests: a fresh directory holding the given YAML, ephemeral
//! ports, and clients for the LLM API and the admin listener.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bulwark_sidecar::{Options, Sidecar, Source};

use crate::client::Client;

/// The file the harness writes its YAML to.
const FILE: &str = "routes.yaml";

pub struct Harness {
    pub sidecar: Sidecar,
    pub client: Client,
    pub admin: Client,
    pub dir: PathBuf,
}

/// A new directory, unique to this process and moment, under the system temp dir.
pub fn temp_dir(prefix: &str) -> std::io::Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Standalone options on `dir`, with both listeners on ephemeral loopback ports.
pub fn options(dir: &Path) -> Options {
    let mut opts =
        Options::new(Source::Manifests { dir: dir.to_path_buf(), workload: None, options: Default::default() });
    opts.listen = ([127, 0, 0, 1], 0).into();
    opts.admin = ([127, 0, 0, 1], 0).into();
    opts
}

impl Harness {
    /// Writes `yaml` into a new directory and starts a sidecar on it; `configure` adjusts the
    /// options first.
    pub async fn start(prefix: &str, yaml: &str, configure: impl FnOnce(&mut Options)) -> anyhow::Result<Self> {
        let dir = temp_dir(prefix)?;
        std::fs::write(dir.join(FILE), yaml)?;
        let mut opts = options(&dir);
        configure(&mut opts);
        let sidecar = Sidecar::start(opts).await?;
        let client = Client::new(format!("http://{}", sidecar.proxy_addr));
        let admin = Client::new(format!("http://{}", sidecar.admin_addr));
        Ok(Self { sidecar, client, admin, dir })
    }

    /// The admin listener's metrics text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self.admin.get("/metrics").await?.text())
    }

    /// Rewrites the YAML and waits (up to 2 s) until the sidecar serves another version.
    pub async fn reload(&self, yaml: &str) -> anyhow::Result<bool> {
        let before = self.sidecar.runtime.borrow().config.version.clone();
        std::fs::write(self.dir.join(FILE), yaml)?;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.sidecar.runtime.borrow().config.version != before {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

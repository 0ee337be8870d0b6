//! Provider keys, read from a mounted file or an environment variable at request time and
//! re-read periodically so a rotated Secret takes effect. Values never leave this module
//! except into the upstream request header; they are never logged or shown.

use std::time::Duration;

use bulwark_api::config::CredentialSource;
use parking_lot::RwLock;
use tokio::time::Instant;

const REFRESH: Duration = Duration::from_secs(10);

pub struct Credential {
    source: CredentialSource,
    cached: RwLock<Option<(Instant, Result<http::HeaderValue, String>)>>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("source", &self.source).finish_non_exhaustive()
    }
}

impl Credential {
    pub fn new(source: CredentialSource) -> Self {
        Self { source, cached: RwLock::new(None) }
    }

    pub fn source(&self) -> &CredentialSource {
        &self.source
    }

    /// The key as a sensitive header value, or why it cannot be had (without the value).
    pub fn get(&self, now: Instant) -> Result<http::HeaderValue, String> {
        if let Some((at, v)) = &*self.cached.read()
            && now.saturating_duration_since(*at) < REFRESH
        {
            return v.clone();
        }
        let v = self.load();
        *self.cached.write() = Some((now, v.clone()));
        v
    }

    fn load(&self) -> Result<http::HeaderValue, String> {
        let raw = match &self.source {
            CredentialSource::Env { name } => {
                std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?
            }
            CredentialSource::File { path } => {
                std::fs::read_to_string(path).map_err(|e| format!("cannot read key file {path}: {e}"))?
            }
        };
        let key = raw.trim();
        if key.is_empty() {
            return Err(match &self.source {
                CredentialSource::Env { name } => format!("environment variable {name} is empty"),
                CredentialSource::File { path } => format!("key file {path} is empty"),
            });
        }
        let mut v =
            http::HeaderValue::from_str(key).map_err(|_| "the key has characters a header cannot carry".to_string())?;
        v.set_sensitive(true);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn file_keys_are_trimmed_and_rotated() {
        let dir = std::env::temp_dir().join(format!("bulwark-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api-key");
        std::fs::write(&path, "sk-one\n").unwrap();
        let c = Credential::new(CredentialSource::File { path: path.display().to_string() });
        assert_eq!(c.get(Instant::now()).unwrap(), "sk-one");
        std::fs::write(&path, "sk-two").unwrap();
        assert_eq!(c.get(Instant::now()).unwrap(), "sk-one", "cached");
        tokio::time::advance(REFRESH).await;
        assert_eq!(c.get(Instant::now()).unwrap(), "sk-two", "rotated");
        assert!(c.get(Instant::now()).unwrap().is_sensitive());
        std::fs::write(&path, "  ").unwrap();
        tokio::time::advance(REFRESH).await;
        assert_eq!(c.get(Instant::now()).unwrap_err(), format!("key file {} is empty", path.display()));
        let missing = Credential::new(CredentialSource::Env { name: "BULWARK_TEST_SURELY_UNSET".into() });
        assert_eq!(
            missing.get(Instant::now()).unwrap_err(),
            "environment variable BULWARK_TEST_SURELY_UNSET is not set"
        );
        assert!(!format!("{c:?}").contains("sk-"));
    }
}

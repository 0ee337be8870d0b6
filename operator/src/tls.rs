//! The config stream's TLS settings. The certificate and key are read again when their files
//! change (a renewed Secret reaches the pod through the kubelet's symlink swap), so rotating
//! them needs no restart; a renewal that fails to load leaves the current pair serving.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use parking_lot::RwLock;
use rustls::{
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::time::Instant;

/// How often a handshake may read the files again to see whether they changed.
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Server settings (HTTP/2 and HTTP/1.1 by ALPN) that serve the pair in `cert` and `key`.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    with_resolver(Reloading::new(cert.to_owned(), key.to_owned(), provider, CHECK_EVERY)?)
}

fn with_resolver(resolver: Reloading) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(resolver.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A certificate and key that follow their files.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    every: Duration,
    loaded: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    pair: Arc<CertifiedKey>,
    /// The two files' contents when `pair` was read (compared whole: modification times can be
    /// too coarse to tell two quick writes apart).
    files: Files,
    checked: Instant,
}

type Files = (Vec<u8>, Vec<u8>);

impl Reloading {
    fn new(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>, every: Duration) -> anyhow::Result<Self> {
        let files = read(&cert, &key)?;
        let pair = Arc::new(load(&files, &cert, &key, &provider)?);
        Ok(Self { cert, key, provider, every, loaded: RwLock::new(Loaded { pair, files, checked: Instant::now() }) })
    }

    /// The pair to serve, read again first if the files changed since the last look.
    fn current(&self) -> Arc<CertifiedKey> {
        {
            let loaded = self.loaded.read();
            if loaded.checked.elapsed() < self.every {
                return loaded.pair.clone();
            }
        }
        let mut loaded = self.loaded.write();
        if loaded.checked.elapsed() >= self.every {
            loaded.checked = Instant::now();
            // The files may be caught mid-update; the next look tries again.
            match read(&self.cert, &self.key) {
                Ok(files) if files != loaded.files => match load(&files, &self.cert, &self.key, &self.provider) {
                    Ok(pair) => {
                        tracing::info!(cert = %self.cert.display(), "serving the renewed certificate");
                        loaded.pair = Arc::new(pair);
                        loaded.files = files;
                    }
                    Err(e) => tracing::warn!("keeping the current certificate: {e:#}"),
                },
                Ok(_) => {}
                Err(e) => tracing::warn!("keeping the current certificate: {e:#}"),
            }
        }
        loaded.pair.clone()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn read(cert: &Path, key: &Path) -> anyhow::Result<Files> {
    let read = |p: &Path| std::fs::read(p).with_context(|| p.display().to_string());
    Ok((read(cert)?, read(key)?))
}

/// Parses a PEM chain and its private key, and checks that they belong together.
fn load((chain, private): &Files, cert: &Path, key: &Path, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let chain = rustls_pemfile::certs(&mut chain.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let private = rustls_pemfile::private_key(&mut private.as_slice())
        .with_context(|| format!("parsing {}", key.display()))?
        .with_context(|| format!("{} holds no private key", key.display()))?;
    CertifiedKey::from_der(chain, private, provider)
        .with_context(|| format!("{} and {} do not form a pair", cert.display(), key.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    struct Pair {
        cert: String,
        key: String,
    }

    fn pair(name: &str) -> Pair {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        Pair { cert: c.cert.pem(), key: c.signing_key.serialize_pem() }
    }

    fn write(dir: &Path, p: &Pair) {
        // Written beside and renamed into place, as the kubelet swaps a Secret volume.
        for (file, text) in [("tls.crt", &p.cert), ("tls.key", &p.key)] {
            std::fs::write(dir.join(format!(".{file}")), text).unwrap();
            std::fs::rename(dir.join(format!(".{file}")), dir.join(file)).unwrap();
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bulwark-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn resolver(d: &Path) -> Reloading {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Reloading::new(d.join("tls.crt"), d.join("tls.key"), provider, Duration::ZERO).unwrap()
    }

    fn der(pem: &str) -> Vec<u8> {
        rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap().to_vec()
    }

    /// A TLS handshake over an in-memory pipe, with a client that trusts only `trusted`.
    async fn handshake(server: Arc<rustls::ServerConfig>, trusted: &Pair, name: &str) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&trusted.cert).into()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        // The client's verdict first: it says why it refused.
        c.map_err(|e| e.to_string())?;
        s.map_err(|e| e.to_string())?;
        Ok(())
    }

    #[tokio::test]
    async fn a_renewed_certificate_is_served_without_a_restart() {
        let d = dir("renew");
        let (old, new) = (pair("bulwark-operator"), pair("bulwark-operator"));
        write(&d, &old);
        let config = with_resolver(resolver(&d)).unwrap();
        handshake(config.clone(), &old, "bulwark-operator").await.unwrap();

        write(&d, &new);
        handshake(config.clone(), &new, "bulwark-operator").await.unwrap();
        let refused = handshake(config, &old, "bulwark-operator").await.unwrap_err();
        assert!(refused.contains("certificate"), "{refused}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_broken_renewal_keeps_the_current_pair() {
        let d = dir("broken");
        let (good, other) = (pair("a"), pair("b"));
        write(&d, &good);
        let r = resolver(&d);
        // A key that doesn't match the certificate, as when the files are caught mid-update.
        write(&d, &Pair { cert: good.cert.clone(), key: other.key.clone() });
        assert_eq!(r.current().cert[0].as_ref(), der(&good.cert).as_slice());
        // Once both files are consistent again, the new pair is taken.
        write(&d, &other);
        assert_eq!(r.current().cert[0].as_ref(), der(&other.cert).as_slice());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn missing_or_mismatched_files_are_refused_at_start() {
        let d = dir("start");
        let e = server_config(&d.join("tls.crt"), &d.join("tls.key")).unwrap_err();
        assert!(format!("{e:#}").contains("tls.crt"), "{e:#}");
        let (a, b) = (pair("a"), pair("b"));
        write(&d, &Pair { cert: a.cert, key: b.key });
        let e = server_config(&d.join("tls.crt"), &d.join("tls.key")).unwrap_err();
        assert!(format!("{e:#}").contains("do not form a pair"), "{e:#}");
        let _ = std::fs::remove_dir_all(&d);
    }
}

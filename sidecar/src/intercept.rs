//! TLS interception of captured connections: the SNI read from a ClientHello without consuming
//! it, and certificates minted for routed hosts by the pod's CA (`--intercept-ca DIR`, holding
//! `tls.crt` and `tls.key` as a Kubernetes TLS Secret does), which the apps trust through the
//! injected bundle. The directory is read again every `RELOAD` (a mounted Secret changes in
//! place when the operator renews the CA): a new CA is used for every certificate from then on.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use parking_lot::Mutex;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// How many hosts' certificates are kept; past that the cache starts over.
const MAX_HOSTS: usize = 1024;
/// How many days a minted certificate is valid; it is minted again when older than half that.
const VALIDITY_DAYS: i64 = 7;
/// How often the CA's directory is read again.
pub const RELOAD: std::time::Duration = std::time::Duration::from_secs(30);

/// The first handshake message of a TLS connection's first bytes, put together from as many
/// records as it spans (a ClientHello may be cut into several, to slip past a reader of the
/// first one).
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// The whole ClientHello (its handshake header included).
    Complete(Vec<u8>),
    /// The bytes so far are the start of one.
    Partial,
    /// Not a ClientHello.
    Not,
}

pub fn client_hello(bytes: &[u8]) -> Hello {
    let mut r = Reader(bytes);
    let mut message = Vec::new();
    loop {
        let Some(header) = r.take(5) else { return Hello::Partial };
        if header[0] != 0x16 {
            return Hello::Not;
        }
        let Some(fragment) = r.take(usize::from(u16::from_be_bytes([header[3], header[4]]))) else {
            return Hello::Partial;
        };
        message.extend_from_slice(fragment);
        if message.first().is_some_and(|kind| *kind != 1) {
            return Hello::Not;
        }
        if let [_, a, b, c, ..] = message[..] {
            let len = 4 + ((usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c));
            if message.len() >= len {
                message.truncate(len);
                return Hello::Complete(message);
            }
        }
    }
}

/// The host name a whole ClientHello message asks for; `None` when it names none.
pub fn server_name(message: &[u8]) -> Option<String> {
    let mut hello = Reader(message.get(4..)?);
    hello.take(2 + 32)?; // version, random
    let session = hello.u8()? as usize;
    hello.take(session)?;
    let suites = hello.u16()? as usize;
    hello.take(suites)?;
    let compression = hello.u8()? as usize;
    hello.take(compression)?;
    let ext_len = hello.u16()? as usize;
    let mut exts = Reader(hello.take(ext_len)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()? as usize;
        let mut data = Reader(exts.take(len)?);
        if kind != 0 {
            continue;
        }
        let list = data.u16()? as usize;
        let mut names = Reader(data.take(list)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let n = names.u16()? as usize;
            let name = names.take(n)?;
            if name_type == 0 {
                // An empty name (or only a dot) names no host.
                let name = std::str::from_utf8(name).ok().map(|s| s.trim_end_matches('.').to_ascii_lowercase());
                return name.filter(|n| !n.is_empty());
            }
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// The CA certificates are signed with.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    /// The PEM it was read from, to tell a changed file.
    pem: String,
}

impl Signer {
    fn from_pem(cert: &str, key: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key).context("the interception CA's key")?;
        let ca_der = rustls_pemfile::certs(&mut cert.as_bytes())
            .next()
            .context("no certificate in the interception CA's tls.crt")?
            .context("the interception CA's certificate")?;
        let issuer = Issuer::from_ca_cert_pem(cert, key).context("the interception CA's certificate")?;
        Ok(Self { issuer, ca_der, pem: cert.to_owned() })
    }
}

/// Mints, and keeps, a certificate per host, signed by the pod's CA.
pub struct Minter {
    dir: Option<PathBuf>,
    signer: Mutex<Arc<Signer>>,
    minted: Mutex<HashMap<String, (Arc<CertifiedKey>, time::OffsetDateTime)>>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter").field("hosts", &self.minted.lock().len()).finish()
    }
}

/// Reads `dir/tls.crt` and `dir/tls.key` as one pair: the certificate is read again after the
/// key, so a Secret volume swapped in between is not read half old, half new.
fn read_pair(dir: &Path) -> anyhow::Result<(String, String)> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| format!("reading {}/{name}", dir.display()))
    };
    for _ in 0..3 {
        let (cert, key) = (read("tls.crt")?, read("tls.key")?);
        if read("tls.crt")? == cert {
            return Ok((cert, key));
        }
    }
    anyhow::bail!("{} keeps changing while it is read", dir.display())
}

impl Minter {
    /// Reads the CA from `dir/tls.crt` and `dir/tls.key`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let (cert, key) = read_pair(dir)?;
        Ok(Self { dir: Some(dir.to_owned()), ..Self::from_pem(&cert, &key)? })
    }

    pub fn from_pem(cert: &str, key: &str) -> anyhow::Result<Self> {
        let signer = Signer::from_pem(cert, key)?;
        Ok(Self { dir: None, signer: Mutex::new(Arc::new(signer)), minted: Mutex::new(HashMap::new()) })
    }

    /// The CA's certificate (DER).
    pub fn ca(&self) -> CertificateDer<'static> {
        self.signer.lock().ca_der.clone()
    }

    /// Reads the directory again: `true` when it holds a new CA, which then signs every
    /// certificate (those minted by the old one are dropped). A directory that cannot be read,
    /// or holds no valid CA, changes nothing.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let Some(dir) = &self.dir else { return Ok(false) };
        let (cert, key) = read_pair(dir)?;
        if self.signer.lock().pem == cert {
            return Ok(false);
        }
        let signer = Arc::new(Signer::from_pem(&cert, &key)?);
        *self.signer.lock() = signer;
        self.minted.lock().clear();
        Ok(true)
    }

    /// Reads the directory again every `RELOAD` until `shutdown`.
    pub async fn watch(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut every = tokio::time::interval(RELOAD);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.changed() => return,
            }
            match self.reload() {
                Ok(true) => tracing::info!("interception CA reloaded: new certificates are signed by the new CA"),
                Ok(false) => {}
                Err(e) => tracing::warn!("reading the interception CA again: {e:#}; the current one stays"),
            }
        }
    }

    /// The certificate for `host`, minted on first use.
    pub fn certificate(&self, host: &str) -> anyhow::Result<Arc<CertifiedKey>> {
        let now = time::OffsetDateTime::now_utc();
        let half = time::Duration::days(VALIDITY_DAYS) / 2;
        if let Some((c, at)) = self.minted.lock().get(host)
            && now - *at < half
        {
            return Ok(c.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(VALIDITY_DAYS);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let signer = self.signer.lock().clone();
        let cert = params.signed_by(&key, &signer.issuer)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).context("the minted key")?;
        let chain = vec![cert.der().clone(), signer.ca_der.clone()];
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        let mut minted = self.minted.lock();
        if minted.len() >= MAX_HOSTS {
            minted.clear();
        }
        minted.insert(host.to_owned(), (certified.clone(), now));
        Ok(certified)
    }

    /// Server settings that present the minted certificate for the ClientHello's name, for
    /// HTTP/1.1 (the route's host is read from `Host`).
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config =
            match rustls::ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
                Ok(b) => b.with_no_client_auth().with_cert_resolver(Arc::new(Resolver(self.clone()))),
                Err(_) => rustls::ServerConfig::builder()
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(Resolver(self.clone()))),
            };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

#[derive(Debug)]
struct Resolver(Arc<Minter>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = hello.server_name()?;
        match self.0.certificate(&host.to_ascii_lowercase()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(host, "minting a certificate: {e:#}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rcgen::{BasicConstraints, IsCa};

    use super::*;

    fn client(roots: rustls::RootCertStore, host: &str) -> rustls::ClientConnection {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        rustls::ClientConnection::new(Arc::new(config), host.to_owned().try_into().unwrap()).unwrap()
    }

    /// The server name a connection's first bytes ask for.
    fn sni(bytes: &[u8]) -> Option<String> {
        let Hello::Complete(message) = client_hello(bytes) else { return None };
        server_name(&message)
    }

    fn hello(host: &str) -> Vec<u8> {
        let mut out = vec![];
        client(rustls::RootCertStore::empty(), host).write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn the_server_name_is_read_from_a_real_client_hello() {
        let bytes = hello("API.OpenAI.com");
        assert!(matches!(client_hello(&bytes), Hello::Complete(m) if m.len() == bytes.len() - 5));
        assert_eq!(sni(&bytes).as_deref(), Some("api.openai.com"));
        assert_eq!(sni(&bytes[..bytes.len() - 1]), None, "a cut record");
        assert_eq!(client_hello(&bytes[..bytes.len() - 1]), Hello::Partial);
        assert_eq!(sni(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Hello::Not);
    }

    #[test]
    fn a_client_hello_cut_into_several_records_is_put_together() {
        let bytes = hello("api.openai.com");
        let message = &bytes[5..];
        for size in [1, 7, 100] {
            let mut records = vec![];
            for fragment in message.chunks(size) {
                records.extend_from_slice(&[0x16, 0x03, 0x01]);
                records.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
                records.extend_from_slice(fragment);
            }
            assert_eq!(sni(&records).as_deref(), Some("api.openai.com"), "records of {size} bytes");
            assert_eq!(client_hello(&records[..records.len() - 1]), Hello::Partial, "records of {size} bytes");
        }
        // An alert record after the first fragment is no ClientHello.
        let mut broken = bytes[..5].to_vec();
        broken[3..5].copy_from_slice(&10u16.to_be_bytes());
        broken.extend_from_slice(&message[..10]);
        broken.extend_from_slice(&[0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x28]);
        assert_eq!(client_hello(&broken), Hello::Not);
    }

    fn ca() -> (String, String) {
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "bulwark interception CA team-a");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn a_client_trusting_only_the_ca_accepts_the_minted_certificate() {
        let (cert, key) = ca();
        let minter = Arc::new(Minter::from_pem(&cert, &key).unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(minter.ca()).unwrap();
        let mut client = client(roots, "api.llm.test");
        let mut server = rustls::ServerConnection::new(minter.server_config()).unwrap();
        for _ in 0..10 {
            let mut buf = vec![];
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut buf = vec![];
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(!client.is_handshaking() && !server.is_handshaking(), "the handshake completes");
        assert_eq!(server.server_name(), Some("api.llm.test"));
        let first = minter.certificate("api.llm.test").unwrap();
        assert!(Arc::ptr_eq(&first, &minter.certificate("api.llm.test").unwrap()), "minted once");
        assert!(Minter::from_pem(&cert, "not a key").is_err());
    }

    #[test]
    fn a_renewed_ca_signs_from_the_next_reload_and_a_bad_one_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("bulwark-intercept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |(cert, key): &(String, String)| {
            std::fs::write(dir.join("tls.crt"), cert).unwrap();
            std::fs::write(dir.join("tls.key"), key).unwrap();
        };
        let (first, second) = (ca(), ca());
        write(&first);
        let minter = Minter::load(&dir).unwrap();
        let chain_ca = |m: &Minter| m.certificate("api.llm.test").unwrap().cert[1].clone();
        let old = chain_ca(&minter);
        assert!(!minter.reload().unwrap(), "nothing changed");
        write(&second);
        assert!(minter.reload().unwrap());
        assert_ne!(chain_ca(&minter), old, "minted again, by the new CA");
        assert_eq!(chain_ca(&minter), minter.ca());
        std::fs::write(dir.join("tls.crt"), "garbage").unwrap();
        assert!(minter.reload().is_err());
        assert_eq!(chain_ca(&minter), minter.ca(), "the current CA stays");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

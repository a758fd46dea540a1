//! TLS material: server certificates chosen by SNI (exact, `*.suffix`, first as default) with a
//! protocol floor, and upstream TLS (CA, client certificate) for pools.
//!
//! pingora's rustls `TlsSettings::build()` panics on bad files and always enables TLS 1.2 and 1.3,
//! so every file is loaded and checked here first, and the server side is a rustls config of
//! our own (`acceptor`): with `min_version = "1.3"` it speaks TLS 1.3 only, and a client that
//! does not offer it gets a `protocol_version` alert from rustls.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use pingora::utils::tls::{CertKey, WrappedX509};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsVersion;

pub type ServerCert = Arc<CertifiedKey>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Every certificate in a PEM file, checked to be well-formed X.509.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let mut certs = Vec::new();
    for item in rustls_pemfile::certs(&mut pem.as_slice()) {
        let der = item.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("{}: not a valid X.509 certificate: {e}", path.display()))?;
        certs.push(der);
    }
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no PEM private key found", path.display()))
}

/// A server certificate chain and its key, checked to belong together.
pub fn load_server_cert(cert: &Path, key: &Path) -> Result<ServerCert, String> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let ck = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| {
        format!(
            "certificate {} and key {} do not form a usable pair: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(ck))
}

/// What a pool needs to speak TLS to its backends.
#[derive(Clone)]
pub struct UpstreamTlsMaterial {
    /// Name to send and verify; `None` means the backend's IP address is verified instead.
    pub sni: Option<String>,
    pub ca: Option<Arc<[WrappedX509]>>,
    pub client: Option<Arc<CertKey>>,
    /// For health probes: presents the client certificate, does not judge the server's (a
    /// probe asks "are you up", traffic does the verifying).
    pub probe: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for UpstreamTlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTlsMaterial")
            .field("sni", &self.sni)
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field("client_cert", &self.client.is_some())
            .finish()
    }
}

pub fn load_upstream_material(
    sni: Option<String>,
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<UpstreamTlsMaterial, String> {
    let ca = match ca {
        Some(p) => {
            let certs = load_certs(p)?;
            let wrapped: Vec<WrappedX509> = certs
                .into_iter()
                .map(|c| WrappedX509::new(c.to_vec(), pingora::utils::tls::parse_x509))
                .collect();
            Some(Arc::from(wrapped.into_boxed_slice()))
        }
        None => None,
    };
    let mut probe_auth = None;
    let client = match client {
        Some((cert, key)) => {
            // Checked the way pingora will use them on connect, where a bad key would panic.
            let ck = load_server_cert(cert, key)?;
            probe_auth = Some((ck.cert.clone(), load_key(key)?));
            let key_der = load_key(key)?;
            let raw_key = key_der.secret_der().to_vec();
            PrivateKeyDer::try_from(raw_key.clone())
                .map_err(|e| format!("{}: unusable private key: {e}", key.display()))?;
            let chain = ck.cert.iter().map(|c| c.to_vec()).collect();
            Some(Arc::new(CertKey::new(chain, raw_key)))
        }
        None => None,
    };
    if let Some(name) = &sni {
        rustls::pki_types::ServerName::try_from(name.as_str())
            .map_err(|_| format!("sni \"{name}\" is not a valid DNS name or IP address"))?;
    }
    let probe = probe_config(probe_auth).map_err(|e| format!("client certificate: {e}"))?;
    Ok(UpstreamTlsMaterial {
        sni,
        ca,
        client,
        probe,
    })
}

/// The certificates of one snapshot, indexed for SNI.
#[derive(Clone, Default)]
pub struct CertSet {
    exact: HashMap<String, ServerCert>,
    /// `*.example.com` stored as `example.com`: matches exactly one more label.
    wildcard: HashMap<String, ServerCert>,
    default: Option<ServerCert>,
    min_tls13: bool,
}

impl fmt::Debug for CertSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSet")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl CertSet {
    pub fn new(entries: &[(Vec<String>, ServerCert)], min: TlsVersion) -> Self {
        let mut set = CertSet {
            min_tls13: min == TlsVersion::V13,
            ..Default::default()
        };
        for (hosts, cert) in entries {
            if set.default.is_none() {
                set.default = Some(cert.clone());
            }
            for h in hosts {
                if let Some(suffix) = h.strip_prefix("*.") {
                    set.wildcard
                        .entry(suffix.to_string())
                        .or_insert(cert.clone());
                } else if h != "*" {
                    set.exact.entry(h.clone()).or_insert(cert.clone());
                }
            }
        }
        set
    }

    /// The certificate for a server name: exact, then wildcard, then the first listed.
    pub fn select(&self, server_name: Option<&str>) -> Option<ServerCert> {
        if let Some(name) = server_name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(c) = self.exact.get(&name) {
                return Some(c.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(c) = self.wildcard.get(parent) {
                    return Some(c.clone());
                }
            }
        }
        self.default.clone()
    }

    /// Whether clients must offer TLS 1.3.
    pub fn requires_tls13(&self) -> bool {
        self.min_tls13
    }
}

/// A TLS acceptor for downstream connections: certificates from `current` (the snapshot's, so a
/// reload applies to the next handshake), ALPN h2 + http/1.1 or http/1.1 alone, TLS 1.3 alone or
/// 1.2 and 1.3.
pub fn acceptor<F>(
    h2: bool,
    tls13_only: bool,
    current: F,
) -> Result<pingora::listeners::tls::Acceptor, String>
where
    F: Fn() -> Arc<CertSet> + Send + Sync + 'static,
{
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver::new(current)));
    cfg.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(pingora::listeners::tls::Acceptor::from_server_config(
        Arc::new(cfg),
    ))
}

/// Resolves certificates from whatever `CertSet` the current snapshot holds, so a reload that
/// swaps the snapshot swaps the certificates for the next handshake.
pub struct SniResolver<F> {
    current: F,
}

impl<F> SniResolver<F>
where
    F: Fn() -> Arc<CertSet> + Send + Sync,
{
    pub fn new(current: F) -> Self {
        SniResolver { current }
    }
}

impl<F> fmt::Debug for SniResolver<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SniResolver")
    }
}

impl<F> ResolvesServerCert for SniResolver<F>
where
    F: Fn() -> Arc<CertSet> + Send + Sync,
{
    fn resolve(&self, hello: ClientHello<'_>) -> Option<ServerCert> {
        (self.current)().select(hello.server_name())
    }
}

/// A self-signed certificate for development (`make run`) and tests.
pub fn generate_self_signed(hosts: &[String]) -> Result<(String, String), String> {
    let ck = rcgen::generate_simple_self_signed(hosts.to_vec()).map_err(|e| e.to_string())?;
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem()))
}

/// A client config for probing our own TLS listeners: it completes a handshake without judging
/// the certificate. Never used for anything but readiness probes on local sockets.
pub fn probe_client_config() -> Arc<rustls::ClientConfig> {
    match probe_config(None) {
        Ok(c) => c,
        // without a client certificate building cannot fail
        Err(_) => Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    }
}

/// A probe config that does not verify the server, optionally presenting a client certificate.
fn probe_config(
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let p = provider();
    let b = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(p)));
    let cfg = match client {
        Some((chain, key)) => b.with_client_auth_cert(chain, key)?,
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(hosts: &[&str]) -> ServerCert {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = generate_self_signed(&hosts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("generate");
        let (cp, kp) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cp, c).expect("write");
        std::fs::write(&kp, k).expect("write");
        load_server_cert(&cp, &kp).expect("load")
    }

    #[test]
    fn sni_selection_exact_wildcard_default() {
        let a = cert(&["a.test"]);
        let w = cert(&["x.wild.test"]);
        let set = CertSet::new(
            &[
                (vec!["a.test".into()], a.clone()),
                (vec!["*.wild.test".into()], w.clone()),
            ],
            TlsVersion::V13,
        );
        let pick = |n: Option<&str>| set.select(n).map(|c| c.cert[0].clone());
        assert_eq!(pick(Some("a.test")), Some(a.cert[0].clone()));
        assert_eq!(pick(Some("A.TEST.")), Some(a.cert[0].clone()));
        assert_eq!(pick(Some("x.wild.test")), Some(w.cert[0].clone()));
        // wildcards cover one label only; otherwise the first cert is the default
        assert_eq!(pick(Some("a.b.wild.test")), Some(a.cert[0].clone()));
        assert_eq!(pick(None), Some(a.cert[0].clone()));
    }

    #[test]
    fn mismatched_pair_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c1, _) = generate_self_signed(&["a.test".into()]).expect("gen");
        let (_, k2) = generate_self_signed(&["b.test".into()]).expect("gen");
        let (cp, kp) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cp, c1).expect("write");
        std::fs::write(&kp, k2).expect("write");
        let err = load_server_cert(&cp, &kp).expect_err("must fail");
        assert!(err.contains("do not form a usable pair"), "{err}");
        std::fs::write(&cp, "garbage").expect("write");
        assert!(load_server_cert(&cp, &kp).is_err());
    }
}

//! TLS origination with rustls: client configs built from a cluster's `tls:`,
//! and the handshake on a connected socket.
//!
//! Loading reads the PEM files (CA bundle, client chain and key), checks that
//! the key matches the certificate, and builds one `rustls::ClientConfig` with
//! an explicit crypto provider (aws-lc-rs), so crate feature unification can
//! never leave rustls without one. It runs with the config load, under the
//! same all-or-nothing rule: a reload whose files do not load is rejected and
//! the clusters keep the material they have. A loaded [`TlsClient`] is
//! immutable; rotation builds a new one (and with it a new cluster), so open
//! connections keep the material they started with.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{Config, ConfigError, Diagnostic, TlsConfig, TlsVersion};

/// A cluster's TLS client: what to offer, what to verify, and the material.
pub struct TlsClient {
    connector: TlsConnector,
    sni: Option<ServerName<'static>>,
    pub verify: bool,
    /// Postgres direct TLS: no SSLRequest first, ALPN `postgresql`.
    pub direct: bool,
    /// Hash of the settings and of every file's content: equal fingerprints
    /// mean interchangeable clients (a reload keeps the cluster), a rotated
    /// file means a new one.
    fingerprint: u64,
    /// When the client certificate expires (Unix seconds), for mTLS.
    pub cert_expiry: Option<i64>,
    /// ALPN offers `h2`: an HTTP cluster may speak HTTP/2 without `http2: true`.
    pub offers_h2: bool,
}

/// Why a TLS client could not be built: a message naming the file.
type LoadError = String;

// === impl TlsClient ===

impl TlsClient {
    /// Builds the client for `config`, reading its files now.
    pub fn load(config: &TlsConfig) -> Result<TlsClient, LoadError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let versions: &[&'static rustls::SupportedProtocolVersion] = match config.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let mut fingerprint = DefaultHasher::new();
        config.hash(&mut fingerprint);

        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| format!("TLS versions: {e}"))?;
        let builder = if config.verify {
            let roots = match &config.ca {
                Some(path) => {
                    let pem = read(path)?;
                    pem.hash(&mut fingerprint);
                    roots_from_pem(path, &pem)?
                }
                None => system_roots(),
            };
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider.clone())))
        };

        let mut cert_expiry = None;
        let mut client = match (&config.cert, &config.key) {
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read(cert_path)?;
                let key_pem = read(key_path)?;
                cert_pem.hash(&mut fingerprint);
                key_pem.hash(&mut fingerprint);
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| {
                        format!("{}: not a PEM certificate chain: {e}", cert_path.display())
                    })?;
                if chain.is_empty() {
                    return Err(format!(
                        "{}: no certificate in the file",
                        cert_path.display()
                    ));
                }
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    format!(
                        "{}: not a PEM private key (PKCS#8, SEC1 or RSA): {e}",
                        key_path.display()
                    )
                })?;
                // A half-rotated pair (new cert, old key) must not replace a working one.
                rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
                    .map_err(|e| {
                        format!(
                            "{} and {}: the key does not match the certificate ({e})",
                            cert_path.display(),
                            key_path.display()
                        )
                    })?;
                cert_expiry = not_after(&chain[0]);
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{}: {e}", cert_path.display()))?
            }
            _ => builder.with_no_client_auth(),
        };
        client.alpn_protocols = if config.direct {
            // PostgreSQL 17 requires it on a direct TLS connection.
            vec![b"postgresql".to_vec()]
        } else {
            config.alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
        };

        let sni = match &config.sni {
            Some(name) => Some(
                ServerName::try_from(name.clone()).map_err(|e| format!("sni \"{name}\": {e}"))?,
            ),
            None => None,
        };
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(client)),
            sni,
            verify: config.verify,
            fingerprint: fingerprint.finish(),
            cert_expiry,
            offers_h2: config.alpn.iter().any(|p| p == "h2"),
            direct: config.direct,
        })
    }

    /// The TLS handshake on a connected socket. `host` is the endpoint's DNS
    /// name (the default server name), `ip` its address (the name of last
    /// resort, only reachable with `verify: false`).
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        host: Option<&str>,
        ip: IpAddr,
    ) -> io::Result<TlsStream<TcpStream>> {
        let name = match (&self.sni, host) {
            (Some(sni), _) => sni.clone(),
            (None, Some(host)) => ServerName::try_from(host.trim_end_matches('.').to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            (None, None) => ServerName::IpAddress(ip.into()),
        };
        self.connector.connect(name, tcp).await
    }
}

impl TlsClient {
    /// What `/config` shows. The fingerprint covers the settings and every
    /// file's content, so two descriptions differ exactly when a reload would
    /// build a new client (a rotated certificate included).
    pub fn describe(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "verify": self.verify,
            "fingerprint": format!("{:016x}", self.fingerprint),
        });
        if let Some(sni) = &self.sni {
            v["sni"] = serde_json::json!(sni.to_str());
        }
        if self.direct {
            v["direct"] = serde_json::json!(true);
        }
        if let Some(expiry) = self.cert_expiry {
            v["client_cert_expiry"] = serde_json::json!(expiry);
        }
        v
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl Eq for TlsClient {}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// Loads the TLS client of every cluster that has `tls:`, by cluster name.
/// Every failure is reported against the cluster's `tls:` line.
pub fn load_all(config: &Config) -> Result<HashMap<String, Arc<TlsClient>>, ConfigError> {
    let mut clients = HashMap::new();
    let mut diagnostics = Vec::new();
    for (cluster, file) in config.clusters.iter().zip(&config.cluster_files) {
        let Some(tls) = &cluster.tls else { continue };
        match TlsClient::load(&tls.value) {
            Ok(client) => {
                if !client.verify {
                    tracing::warn!(cluster = %cluster.name.value,
                        "tls verify: false: the server's certificate is NOT checked; anyone on the path can impersonate it");
                }
                clients.insert(cluster.name.value.clone(), Arc::new(client));
            }
            Err(e) => diagnostics.push(Diagnostic::at(
                file,
                &tls.referenced,
                format!("cluster \"{}\": tls: {e}", cluster.name.value),
            )),
        }
    }
    if diagnostics.is_empty() {
        Ok(clients)
    } else {
        Err(ConfigError { diagnostics })
    }
}

/// Every file named in a `tls:` section: the reloader watches their
/// directories and hashes their content, so a rotation is a reload.
pub fn files(config: &Config) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for c in &config.clusters {
        if let Some(tls) = &c.tls {
            for p in [&tls.value.ca, &tls.value.cert, &tls.value.key]
                .into_iter()
                .flatten()
            {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
        }
    }
    out
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<RootCertStore, LoadError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("{}: not a PEM CA bundle: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: bad CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate in the file", path.display()));
    }
    Ok(roots)
}

/// The system's trust store, or the bundled Mozilla roots when it has none
/// (distroless and scratch images).
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}

/// The certificate's notAfter as Unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// `verify: false`: accepts any certificate, but still checks the handshake
/// signatures, so the connection is at least encrypted to whoever answered.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

//! TLS for the coordinator's gRPC and HTTP sides: the certificate it
//! serves and the CA its clients and workers pin.
//!
//! Either the operator's (`--tls-cert`/`--tls-key`, with `--tls-ca` or the
//! last certificate of the chain as what clients trust), or one this
//! coordinator makes: a CA kept in `STATE_DIR/tls/` (its key 0600, made at
//! first start, the same across restarts so that clients keep trusting it)
//! and, at every start, a fresh server certificate it signs for this
//! machine's names and the listening addresses. The server's key never
//! touches the disk. Plain text is served on loopback only.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// What a TLS coordinator serves, and the CA that vouches for it.
#[derive(Clone)]
pub struct ServerTls {
    /// The certificate chain, PEM, leaf first.
    pub cert_pem: String,
    /// The leaf's private key, PEM.
    pub key_pem: String,
    /// What clients and workers trust (pin), PEM.
    pub ca_pem: String,
    /// Where the CA is on disk, for clients on this machine.
    pub ca_path: PathBuf,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("ca_path", &self.ca_path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Pem { path: PathBuf, why: String },
    #[error("making the coordinator's certificate: {0}")]
    Make(String),
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The PEM blocks of `text` labelled `label`, in order.
fn blocks<'a>(text: &'a str, label: &str) -> Vec<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find(&begin) {
        let Some(e) = rest[b..].find(&end) else { break };
        out.push(&rest[b..b + e + end.len()]);
        rest = &rest[b + e + end.len()..];
    }
    out
}

/// The operator's certificate chain and key; clients trust `ca` (a PEM
/// file), else the chain's last certificate.
pub fn from_files(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<ServerTls, TlsError> {
    let cert_pem = read(cert)?;
    let chain = blocks(&cert_pem, "CERTIFICATE");
    let Some(last) = chain.last() else {
        return Err(TlsError::Pem {
            path: cert.to_path_buf(),
            why: "holds no PEM certificate".into(),
        });
    };
    let key_pem = read(key)?;
    if !key_pem.contains("PRIVATE KEY-----") {
        return Err(TlsError::Pem {
            path: key.to_path_buf(),
            why: "holds no PEM private key".into(),
        });
    }
    let (ca_pem, ca_path) = match ca {
        Some(p) => {
            let text = read(p)?;
            if blocks(&text, "CERTIFICATE").is_empty() {
                return Err(TlsError::Pem {
                    path: p.to_path_buf(),
                    why: "holds no PEM certificate".into(),
                });
            }
            (text, p.to_path_buf())
        }
        None => (format!("{last}\n"), cert.to_path_buf()),
    };
    let tls = ServerTls {
        cert_pem,
        key_pem,
        ca_pem,
        ca_path,
    };
    // A key that does not match, or a file rustls cannot read, is found
    // now, naming the files, not at the first handshake.
    tls.rustls_config().map_err(|why| TlsError::Pem {
        path: cert.to_path_buf(),
        why: format!("with key {}: {why}", key.display()),
    })?;
    Ok(tls)
}

/// The CA's subject: the same at every start on a state folder, so that a
/// certificate signed at this start chains to the CA made at the first,
/// and its own for every CA (named after its key): a client pinning one
/// coordinator's CA sees another's certificate as signed by a stranger.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let id = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    dn.push(
        DnType::CommonName,
        format!(
            "strata coordinator CA {}",
            crate::job::to_hex(&id.as_ref()[..8])
        ),
    );
    dn.push(DnType::OrganizationName, "strata");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// The names a certificate for this coordinator covers: loopback, this
/// machine's name, the addresses it listens on, and the advertised URL's
/// host.
pub fn names(listen: &[SocketAddr], host: &str, advertise_url: Option<&str>) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let mut add = |n: String| {
        if !n.is_empty() && !names.contains(&n) {
            names.push(n);
        }
    };
    add(host.to_string());
    for a in listen {
        if !a.ip().is_unspecified() {
            add(a.ip().to_string());
        }
    }
    if let Some(h) = advertise_url
        .and_then(|u| u.parse::<axum::http::Uri>().ok())
        .and_then(|u| u.host().map(str::to_string))
    {
        add(h.trim_start_matches('[').trim_end_matches(']').to_string());
    }
    names
}

/// This coordinator's own CA (made at first start in `state_dir/tls`) and
/// a server certificate it signs now for `names`.
pub fn self_signed(state_dir: &Path, names: &[String]) -> Result<ServerTls, TlsError> {
    let dir = state_dir.join("tls");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    crate::startup::private_dir(&dir).map_err(io(&dir))?;
    let ca_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca-key.pem");
    let make = |e: rcgen::Error| TlsError::Make(e.to_string());
    let ca_key = if ca_key_path.exists() && ca_path.exists() {
        let text = read(&ca_key_path)?;
        KeyPair::from_pem(&text).map_err(|e| TlsError::Pem {
            path: ca_key_path.clone(),
            why: e.to_string(),
        })?
    } else {
        let key = KeyPair::generate().map_err(make)?;
        let cert = ca_params(&key).self_signed(&key).map_err(make)?;
        crate::startup::write_private(&ca_key_path, key.serialize_pem().as_bytes())
            .map_err(io(&ca_key_path))?;
        // Public: anyone may pin it.
        std::fs::write(&ca_path, cert.pem()).map_err(io(&ca_path))?;
        tracing::info!(path = %ca_path.display(), "made this coordinator's CA");
        key
    };
    let ca_pem = read(&ca_path)?;
    let issuer = Issuer::new(ca_params(&ca_key), &ca_key);
    let mut leaf = CertificateParams::new(names.to_vec()).map_err(make)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "strata coordinator");
    leaf.distinguished_name = dn;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().map_err(make)?;
    let cert = leaf.signed_by(&key, &issuer).map_err(make)?;
    Ok(ServerTls {
        cert_pem: format!("{}{}", cert.pem(), ca_pem),
        key_pem: key.serialize_pem(),
        ca_pem,
        ca_path,
    })
}

impl ServerTls {
    /// rustls's server configuration (ring), HTTP/1.1 and HTTP/2 offered.
    pub fn rustls_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| format!("key: {e}"))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Whether `ip` may be served in plain text: loopback only.
pub fn plain_allowed(ip: IpAddr) -> bool {
    ip.is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_survives_restarts_and_signs_each_starts_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let n = names(
            &[
                "0.0.0.0:7070".parse().unwrap(),
                "10.1.2.3:80".parse().unwrap(),
            ],
            "node7",
            Some("https://head.example:7070"),
        );
        assert_eq!(
            n,
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "node7",
                "10.1.2.3",
                "head.example"
            ]
        );
        let a = self_signed(dir.path(), &n).unwrap();
        let b = self_signed(dir.path(), &n).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem, "one CA per state folder");
        assert_ne!(a.key_pem, b.key_pem, "a fresh server key each start");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("tls/ca-key.pem")), 0o600);
        assert_eq!(mode(&dir.path().join("tls")), 0o700);
        assert!(
            !std::fs::read_dir(dir.path().join("tls"))
                .unwrap()
                .any(|e| e.unwrap().file_name() == "server-key.pem")
        );
        a.rustls_config().unwrap();
    }

    #[test]
    fn operator_files_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let made = self_signed(dir.path(), &names(&[], "h", None)).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, &made.cert_pem).unwrap();
        std::fs::write(&key, &made.key_pem).unwrap();
        let t = from_files(&cert, &key, None).unwrap();
        assert_eq!(t.ca_pem.trim(), made.ca_pem.trim(), "the chain's last");
        // Another key: named at start.
        let other = self_signed(dir.path(), &names(&[], "h", None)).unwrap();
        std::fs::write(&key, &other.key_pem).unwrap();
        let e = from_files(&cert, &key, None).unwrap_err().to_string();
        assert!(e.starts_with(&cert.display().to_string()), "{e}");
        std::fs::write(&cert, "nothing").unwrap();
        let e = from_files(&cert, &key, None).unwrap_err().to_string();
        assert!(e.ends_with("holds no PEM certificate"), "{e}");
    }
}

//! Mutual TLS between agents and brokers: certificates and rustls configurations.
//!
//! Both sides present a certificate signed by the fleet's CA and check the other's against it.
//! [`DevCa`] makes a development CA and issues certificates with rcgen (`framecast-broker certs
//! init`, tests); production deployments bring their own PEM files. QUIC needs TLS 1.3 and an
//! ALPN protocol, [`ALPN`].

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// The ALPN protocol of the agent↔broker link.
pub const ALPN: &[u8] = b"framecast/1";

/// Why certificates could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
    /// A PEM text holds no usable certificate or key.
    #[error("{what}: {detail}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key. Never log it.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Which side a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The broker: a TLS server.
    Broker,
    /// A node agent: a TLS client.
    Agent,
}

/// A development certificate authority.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, to give both sides.
    pub cert: IssuedCert,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new CA named `name`.
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = distinguished_name(name);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let issued = IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert: issued,
        })
    }

    /// A certificate for `name` (a node id or the broker's host name) valid for the DNS names
    /// and IP addresses in `names`, usable by `role`.
    pub fn issue(&self, name: &str, names: &[&str], role: Role) -> Result<IssuedCert, TlsError> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name = distinguished_name(name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match role {
            Role::Broker => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Agent => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn distinguished_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Framecast");
    dn.push(DnType::CommonName, cn);
    dn
}

/// The PEM texts a [`TlsConfig`] names: (CA certificate, own certificate, own key).
pub fn read_files(tls: &TlsConfig) -> Result<(String, String, String), TlsError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|error| TlsError::Read {
            path: p.display().to_string(),
            error,
        })
    };
    Ok((read(&tls.ca_cert)?, read(&tls.cert)?, read(&tls.key)?))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            detail: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "private key",
        detail: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs("CA certificate", ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The broker's TLS configuration: TLS 1.3, its certificate, and client certificates required
/// and checked against the CA.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ServerConfig, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs("certificate", cert_pem)?, key(key_pem)?)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// An agent's TLS configuration: TLS 1.3, the broker checked against the CA, and the agent's
/// own certificate presented.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs("certificate", cert_pem)?, key(key_pem)?)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dev_ca_issues_certificates_rustls_accepts() {
        let ca = DevCa::generate("Framecast test CA").unwrap();
        let broker = ca
            .issue("broker", &["localhost", "127.0.0.1"], Role::Broker)
            .unwrap();
        let agent = ca
            .issue("gpu-host-1", &["gpu-host-1"], Role::Agent)
            .unwrap();
        server_config(&ca.cert.cert_pem, &broker.cert_pem, &broker.key_pem).unwrap();
        client_config(&ca.cert.cert_pem, &agent.cert_pem, &agent.key_pem).unwrap();
        assert!(
            !format!("{agent:?}").contains("PRIVATE KEY"),
            "keys are never printed"
        );
    }

    #[test]
    fn bad_pem_is_an_error_naming_the_input() {
        let err = client_config("not pem", "not pem", "not pem")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("CA certificate: no certificate found"),
            "{err}"
        );
    }
}

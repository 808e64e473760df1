//! Mutual TLS between agents and brokers: certificates and rustls configurations.
//!
//! Both sides present a certificate signed by the fleet's CA and check the other's against it.
//! [`DevCa`] makes a development CA and issues certificates with rcgen (`framecast-broker certs
//! init`, tests), and [`init_dir`] writes a whole development PKI to a directory; production
//! deployments bring their own PEM files. QUIC needs TLS 1.3 and an ALPN protocol, [`ALPN`].

use std::io;
use std::path::{Path, PathBuf};
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
use crate::ids::NodeId;
use crate::token::{PRIVATE_KEY_MODE, TokenError, TokenSigner, write_file};

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
    /// [`init_dir`] would overwrite a file, and was not told to.
    #[error("{path} already exists; refusing to overwrite it without force")]
    Exists {
        /// The first such file.
        path: String,
    },
    /// A file could not be written.
    #[error("{path}: {error}")]
    Write {
        /// The file.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
    /// A name given to [`init_dir`] cannot name a certificate.
    #[error("{what} {name:?}: {reason}")]
    Name {
        /// What the name was for.
        what: &'static str,
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The session-token signing key could not be made.
    #[error(transparent)]
    Token(#[from] TokenError),
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

/// The names the broker's certificate is valid for when [`init_dir`] is given none.
pub const DEFAULT_BROKER_NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// The mode of the certificate files [`init_dir`] writes (less the umask); its private keys
/// are 0600.
const CERT_MODE: u32 = 0o644;

/// What [`init_dir`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The files, in the order they were written.
    pub files: Vec<PathBuf>,
}

/// Writes a development PKI into `dir` (made if absent), the library side of
/// `framecast-broker certs init`:
///
/// - `ca.pem`, `ca.key`: a new CA;
/// - `broker.pem`, `broker.key`: the broker's certificate, valid for `broker_names`
///   ([`DEFAULT_BROKER_NAMES`] when empty; DNS names or IP addresses);
/// - `agent-<name>.pem`, `agent-<name>.key` for each name in `agents` (a [`NodeId`], the
///   certificate's common name);
/// - `token.key`: the Ed25519 key that signs session tokens ([`TokenSigner`]).
///
/// Private keys get mode 0600. An existing file is never overwritten unless `force`: without
/// it the call writes nothing and returns [`TlsError::Exists`] naming the first existing file.
/// A CA cannot be reloaded to issue more certificates later (that needs rcgen's
/// `x509-parser` feature), so adding an agent means running this again with `force` and every
/// agent's name, and handing out all the new files: the new CA no longer trusts the old
/// certificates, and the new token key no longer verifies tokens signed with the old one.
///
/// Everything is generated before anything is written; an I/O error part way (a full disk)
/// can still leave some files written, which a run with `force` replaces.
pub fn init_dir(
    dir: &Path,
    broker_names: &[&str],
    agents: &[&str],
    force: bool,
) -> Result<InitReport, TlsError> {
    let broker_names = if broker_names.is_empty() {
        DEFAULT_BROKER_NAMES
    } else {
        broker_names
    };
    let mut agent_ids: Vec<NodeId> = Vec::with_capacity(agents.len());
    for name in agents {
        let id = NodeId::new(*name).map_err(|e| TlsError::Name {
            what: "agent name",
            name: (*name).to_owned(),
            reason: e.to_string(),
        })?;
        if agent_ids.contains(&id) {
            return Err(TlsError::Name {
                what: "agent name",
                name: (*name).to_owned(),
                reason: "given twice".into(),
            });
        }
        // The broker checks that an agent's certificate names its node id, which only works
        // for ids a certificate can carry.
        if rustls::pki_types::ServerName::try_from(*name).is_err() {
            return Err(TlsError::Name {
                what: "agent name",
                name: (*name).to_owned(),
                reason: "must be a DNS name or an IP address, which its certificate can carry"
                    .into(),
            });
        }
        agent_ids.push(id);
    }

    let ca = DevCa::generate("Framecast development CA")?;
    let broker = ca.issue("framecast-broker", broker_names, Role::Broker)?;
    let mut files: Vec<(String, String, u32)> = vec![
        ("ca.pem".into(), ca.cert.cert_pem.clone(), CERT_MODE),
        ("ca.key".into(), ca.cert.key_pem.clone(), PRIVATE_KEY_MODE),
        ("broker.pem".into(), broker.cert_pem, CERT_MODE),
        ("broker.key".into(), broker.key_pem, PRIVATE_KEY_MODE),
    ];
    for id in &agent_ids {
        let agent = ca.issue(id.as_str(), &[id.as_str()], Role::Agent)?;
        files.push((format!("agent-{id}.pem"), agent.cert_pem, CERT_MODE));
        files.push((format!("agent-{id}.key"), agent.key_pem, PRIVATE_KEY_MODE));
    }
    let token = TokenSigner::generate()?;
    files.push(("token.key".into(), token.to_pkcs8_pem(), PRIVATE_KEY_MODE));

    let write_error = |path: &Path, error: io::Error| TlsError::Write {
        path: path.display().to_string(),
        error,
    };
    if !force {
        for (name, _, _) in &files {
            let path = dir.join(name);
            // symlink_metadata, so that a dangling link counts as a file too.
            match std::fs::symlink_metadata(&path) {
                Ok(_) => {
                    return Err(TlsError::Exists {
                        path: path.display().to_string(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(write_error(&path, e)),
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| write_error(dir, e))?;
    let mut report = InitReport {
        files: Vec::with_capacity(files.len()),
    };
    for (name, contents, mode) in files {
        let path = dir.join(name);
        // Checked above, but a file made since is still refused rather than overwritten.
        write_file(&path, contents.as_bytes(), mode, force).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                TlsError::Exists {
                    path: path.display().to_string(),
                }
            } else {
                write_error(&path, e)
            }
        })?;
        report.files.push(path);
    }
    Ok(report)
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

    /// Runs a TLS handshake in memory between `client` and `server`, connecting to `name`.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut server = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                assert_eq!(server.alpn_protocol(), Some(ALPN));
                assert!(server.peer_certificates().is_some_and(|c| !c.is_empty()));
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    fn mode(dir: &Path, name: &str) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn init_dir_writes_a_working_pki_with_private_keys_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let report = init_dir(&dir, &[], &["gpu-host-1", "gpu-host-2"], false).unwrap();
        let names: Vec<_> = report
            .files
            .iter()
            .map(|p| {
                assert_eq!(p.parent(), Some(dir.as_path()));
                p.file_name().unwrap().to_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca.key",
                "broker.pem",
                "broker.key",
                "agent-gpu-host-1.pem",
                "agent-gpu-host-1.key",
                "agent-gpu-host-2.pem",
                "agent-gpu-host-2.key",
                "token.key",
            ]
        );
        for name in &names {
            let expected = if name.ends_with(".key") { 0o600 } else { 0o644 };
            // The umask may take bits off a certificate, never add any.
            assert_eq!(
                mode(&dir, name) & !expected,
                0,
                "{name}: {:o}",
                mode(&dir, name)
            );
            if name.ends_with(".key") {
                assert_eq!(mode(&dir, name), 0o600, "{name}");
            }
        }

        let ca = read(&dir, "ca.pem");
        let server = || server_config(&ca, &read(&dir, "broker.pem"), &read(&dir, "broker.key"));
        for agent in ["gpu-host-1", "gpu-host-2"] {
            let client = client_config(
                &ca,
                &read(&dir, &format!("agent-{agent}.pem")),
                &read(&dir, &format!("agent-{agent}.key")),
            )
            .unwrap();
            for name in DEFAULT_BROKER_NAMES {
                handshake(client.clone(), server().unwrap(), name).unwrap();
            }
        }
        let signer = crate::token::TokenSigner::load_or_create(&dir.join("token.key")).unwrap();
        assert_eq!(
            signer.to_pkcs8_pem(),
            read(&dir, "token.key"),
            "token.key is read, not replaced"
        );
    }

    #[test]
    fn init_dir_certificates_carry_the_given_names_and_roles() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init_dir(dir, &["broker.example", "10.0.0.5"], &["gpu-host-1"], false).unwrap();
        let ca = read(dir, "ca.pem");
        let server = || server_config(&ca, &read(dir, "broker.pem"), &read(dir, "broker.key"));
        let agent = || {
            client_config(
                &ca,
                &read(dir, "agent-gpu-host-1.pem"),
                &read(dir, "agent-gpu-host-1.key"),
            )
        };
        handshake(agent().unwrap(), server().unwrap(), "broker.example").unwrap();
        handshake(agent().unwrap(), server().unwrap(), "10.0.0.5").unwrap();
        // Not a name it was given.
        assert!(handshake(agent().unwrap(), server().unwrap(), "localhost").is_err());
        // An agent's certificate cannot serve as the broker's.
        let impostor = server_config(
            &ca,
            &read(dir, "agent-gpu-host-1.pem"),
            &read(dir, "agent-gpu-host-1.key"),
        )
        .unwrap();
        assert!(handshake(agent().unwrap(), impostor, "gpu-host-1").is_err());

        // Another directory's CA trusts none of these.
        let other = tempfile::tempdir().unwrap();
        init_dir(other.path(), &["broker.example"], &["gpu-host-1"], false).unwrap();
        let stranger = client_config(
            &ca,
            &read(other.path(), "agent-gpu-host-1.pem"),
            &read(other.path(), "agent-gpu-host-1.key"),
        )
        .unwrap();
        assert!(handshake(stranger, server().unwrap(), "broker.example").is_err());
    }

    #[test]
    fn init_dir_never_overwrites_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init_dir(dir, &[], &["gpu-host-1"], false).unwrap();
        let ca = read(dir, "ca.pem");

        let err = init_dir(dir, &[], &["gpu-host-1"], false).unwrap_err();
        assert!(
            matches!(&err, TlsError::Exists { path } if path == &dir.join("ca.pem").display().to_string()),
            "{err}"
        );
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert_eq!(read(dir, "ca.pem"), ca);

        // One existing file anywhere in the set stops the whole run before it writes.
        let fresh = tempfile::tempdir().unwrap();
        std::fs::write(fresh.path().join("agent-gpu-host-2.key"), "mine").unwrap();
        let err = init_dir(fresh.path(), &[], &["gpu-host-2"], false).unwrap_err();
        assert!(err.to_string().contains("agent-gpu-host-2.key"), "{err}");
        assert_eq!(read(fresh.path(), "agent-gpu-host-2.key"), "mine");
        assert!(!fresh.path().join("ca.pem").exists());

        // With force, everything is replaced, and a replaced key file is 0600 again.
        std::fs::set_permissions(
            dir.join("broker.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        init_dir(dir, &[], &["gpu-host-1"], true).unwrap();
        assert_ne!(read(dir, "ca.pem"), ca);
        assert_eq!(mode(dir, "broker.key"), 0o600);
    }

    #[test]
    fn init_dir_refuses_bad_and_repeated_agent_names() {
        let tmp = tempfile::tempdir().unwrap();
        for agents in [
            &["../etc"][..],
            &["a/b"],
            &[""],
            &["gpu-1", "gpu-1"],
            // A node id its certificate could not carry (the broker checks it does).
            &["gpu:1"],
        ] {
            let err = init_dir(tmp.path(), &[], agents, false).unwrap_err();
            assert!(matches!(err, TlsError::Name { .. }), "{agents:?}: {err}");
        }
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}

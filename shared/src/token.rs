//! Session tokens: what lets a player's browser into the one session the broker placed.
//!
//! The broker signs a token for each session it places; the player's browser sends it to the
//! node agent's WHEP endpoint as `Authorization: Bearer <token>`; the agent checks it offline
//! with the broker's Ed25519 public key, which the broker sends in every `Welcome`
//! ([`crate::protocol::Welcome::token_public_key`]). No call to the broker is needed, so a
//! broker outage does not stop players who already hold a token.
//!
//! # Format
//!
//! ```text
//! fc1.<base64url(payload)>.<base64url(signature)>
//! ```
//!
//! - `fc1` names the envelope: Ed25519 over base64url without padding (RFC 4648 §5). Every
//!   character of a token is URL- and header-safe, and a token is at most [`MAX_TOKEN_LEN`]
//!   bytes.
//! - The payload is a CBOR array `[version, session_id, node_id, issued_at, expires_at]`:
//!   `version` is [`CLAIMS_VERSION`]; `session_id` the session's UUIDv7 as a 16-byte byte
//!   string; `node_id` a text string; the times unsigned Unix milliseconds. A later layout
//!   gets a new `version`, and an agent refuses a version it does not know (a claim it cannot
//!   read might be one that restricts the token), so brokers must keep issuing the old
//!   version until every agent understands the new one.
//! - The signature is Ed25519 over the ASCII text before the last `.` (`fc1.<payload>`), so
//!   the envelope name is signed too.
//!
//! A token is accepted by [`TokenVerifier::verify`] when it is well formed, its signature is
//! the broker's, it names the verifying node, and it has not expired. Tokens are bearer
//! credentials: never log them.
//!
//! ```
//! use framecast_shared::ids::{NodeId, SessionId};
//! use framecast_shared::time::Timestamp;
//! use framecast_shared::token::{Claims, TokenSigner, TokenVerifier};
//!
//! let signer = TokenSigner::generate()?;
//! let node = NodeId::new("gpu-host-01")?;
//! let now = Timestamp::from_millis(1_700_000_000_000);
//! let claims = Claims {
//!     session_id: SessionId::new(now, 7),
//!     node_id: node.clone(),
//!     issued_at: now,
//!     expires_at: Timestamp::from_millis(1_700_000_060_000),
//! };
//! let token = signer.sign(&claims);
//!
//! let verifier = TokenVerifier::new(&signer.public_key())?;
//! assert_eq!(verifier.verify(&token, &node, now)?, claims);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ciborium::Value;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;

use crate::ids::{NodeId, SessionId};
use crate::time::Timestamp;

/// The envelope name every token starts with, with its separator.
pub const TOKEN_PREFIX: &str = "fc1.";

/// The claims layout [`TokenSigner::sign`] writes and [`TokenVerifier::verify`] reads.
pub const CLAIMS_VERSION: u64 = 1;

/// The longest token accepted, in bytes. A token with the longest node id (128 bytes) is
/// about 320 bytes; anything much longer is refused before it is decoded.
pub const MAX_TOKEN_LEN: usize = 1024;

/// Bytes in an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Bytes in an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// The mode of a private key file: the owner may read and write it, nobody else anything.
pub const PRIVATE_KEY_MODE: u32 = 0o600;

/// What a session token grants: one session, on one node, until a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The session the token lets its bearer join.
    pub session_id: SessionId,
    /// The node the session is placed on; other nodes refuse the token.
    pub node_id: NodeId,
    /// The first instant at which the token is no longer accepted.
    pub expires_at: Timestamp,
    /// When the broker signed the token; for logs and audit, not checked (the clocks of broker
    /// and agent may disagree a little).
    pub issued_at: Timestamp,
}

/// Why a token or a token key was refused.
///
/// [`TokenVerifier::verify`] returns only [`Malformed`](Self::Malformed),
/// [`BadSignature`](Self::BadSignature), [`WrongNode`](Self::WrongNode) and
/// [`Expired`](Self::Expired), each an HTTP 401 for the agent with [`TokenError::reason`];
/// the others come from loading keys.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The text is not a token: wrong prefix, missing parts, bad base64 or CBOR, an unknown
    /// claims version, or too long.
    #[error("malformed session token: {0}")]
    Malformed(&'static str),
    /// The signature is not the broker's: the token was altered or another key signed it.
    #[error("session token signature does not verify")]
    BadSignature,
    /// The token is for a session on another node.
    #[error("session token is for node {found}, not this node ({expected})")]
    WrongNode {
        /// The node that verified the token.
        expected: NodeId,
        /// The node the token names.
        found: NodeId,
    },
    /// The token's time is up.
    #[error("session token expired at {at}")]
    Expired {
        /// When it expired.
        at: Timestamp,
    },
    /// A key is not a usable Ed25519 key.
    #[error("session token key: {0}")]
    Key(String),
    /// A key file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        error: io::Error,
    },
}

impl TokenError {
    /// A short, stable reason code for an HTTP 401 response or a metric label; it reveals
    /// nothing about keys or other nodes.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
            Self::WrongNode { .. } => "wrong_node",
            Self::Expired { .. } => "expired",
            Self::Key(_) => "key",
            Self::Io { .. } => "io",
        }
    }
}

/// The broker's side: an Ed25519 key pair that signs session tokens.
pub struct TokenSigner {
    key_pair: Ed25519KeyPair,
    /// The PKCS#8 document the key pair came from, to write it back out.
    pkcs8: Vec<u8>,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("public_key", &URL_SAFE_NO_PAD.encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// A new random key pair.
    pub fn generate() -> Result<Self, TokenError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| TokenError::Key("the system random source failed".into()))?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    /// The key pair in a PKCS#8 DER document: v2 (with the public key, as
    /// [`TokenSigner::to_pkcs8_pem`] writes) or v1 (as `openssl genpkey -algorithm ED25519`
    /// writes).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, TokenError> {
        let key_pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| TokenError::Key(format!("not an Ed25519 PKCS#8 private key: {e}")))?;
        Ok(Self {
            key_pair,
            pkcs8: der.to_vec(),
        })
    }

    /// The key pair in a PEM text holding a PKCS#8 `PRIVATE KEY` block.
    pub fn from_pem(pem: &str) -> Result<Self, TokenError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| TokenError::Key(format!("no PKCS#8 private key in the PEM text: {e}")))?;
        Self::from_pkcs8(der.secret_pkcs8_der())
    }

    /// The key pair as a PKCS#8 PEM text (`-----BEGIN PRIVATE KEY-----`). It is the private
    /// key: write it only to a file of mode 0600, never to a log.
    pub fn to_pkcs8_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.pkcs8)
    }

    /// The key pair in the PEM file at `path`, made and written there first (mode 0600) if
    /// there is no file. An existing file that does not hold a key is an error, never
    /// replaced.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenError> {
        let io_error = |error| TokenError::Io {
            path: path.to_owned(),
            error,
        };
        match fs::read_to_string(path) {
            Ok(pem) => return Self::from_pem_file(path, &pem),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(e)),
        }
        let signer = Self::generate()?;
        match write_file(
            path,
            signer.to_pkcs8_pem().as_bytes(),
            PRIVATE_KEY_MODE,
            false,
        ) {
            Ok(()) => Ok(signer),
            // Another process made the key between our read and our write: use theirs, so
            // both sign with the same key.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let pem = fs::read_to_string(path).map_err(io_error)?;
                Self::from_pem_file(path, &pem)
            }
            Err(e) => Err(io_error(e)),
        }
    }

    /// The public key, for agents to verify tokens with.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        let mut key = [0; PUBLIC_KEY_LEN];
        // An Ed25519 public key is 32 bytes; should ring ever say otherwise, the key stays
        // zeros and no token verifies against it.
        if let Ok(bytes) = <[u8; PUBLIC_KEY_LEN]>::try_from(self.key_pair.public_key().as_ref()) {
            key = bytes;
        }
        key
    }

    /// A token carrying `claims`, in the format the [module documentation](self) describes.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = encode_claims(claims);
        let mut token = String::with_capacity(TOKEN_PREFIX.len() + payload.len() * 2 + 90);
        token.push_str(TOKEN_PREFIX);
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let signature = self.key_pair.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
        token
    }

    fn from_pem_file(path: &Path, pem: &str) -> Result<Self, TokenError> {
        Self::from_pem(pem).map_err(|e| match e {
            TokenError::Key(detail) => TokenError::Key(format!("{}: {detail}", path.display())),
            other => other,
        })
    }
}

/// The agent's side: checks session tokens with the broker's public key, offline.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    key: [u8; PUBLIC_KEY_LEN],
}

impl TokenVerifier {
    /// A verifier for tokens signed by the key whose public half is `public_key` (32 bytes,
    /// as [`TokenSigner::public_key`] gives and `Welcome` carries).
    pub fn new(public_key: &[u8]) -> Result<Self, TokenError> {
        let key = <[u8; PUBLIC_KEY_LEN]>::try_from(public_key).map_err(|_| {
            TokenError::Key(format!(
                "an Ed25519 public key is {PUBLIC_KEY_LEN} bytes, not {}",
                public_key.len()
            ))
        })?;
        Ok(Self { key })
    }

    /// The public key this verifier checks signatures with.
    pub fn public_key(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.key
    }

    /// The claims of `token` if it is well formed, signed with this verifier's key, for
    /// `node`, and not expired at `now` (a token whose `expires_at` is `now` is expired).
    ///
    /// Checks run in that order, so a token that fails several reports the first.
    pub fn verify(&self, token: &str, node: &NodeId, now: Timestamp) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than any token"));
        }
        let (signed, signature) = token
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("no signature"))?;
        let payload = signed
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Malformed("does not start with \"fc1.\""))?;
        if payload.contains('.') {
            return Err(TokenError::Malformed("more than three parts"));
        }
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        if signature.len() != SIGNATURE_LEN {
            return Err(TokenError::Malformed("signature is not 64 bytes"));
        }
        UnparsedPublicKey::new(&ED25519, &self.key)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims = decode_claims(&payload)?;
        if claims.node_id != *node {
            return Err(TokenError::WrongNode {
                expected: node.clone(),
                found: claims.node_id,
            });
        }
        if claims.expires_at <= now {
            return Err(TokenError::Expired {
                at: claims.expires_at,
            });
        }
        Ok(claims)
    }
}

/// The claims as the CBOR array `[version, session_id, node_id, issued_at, expires_at]`.
fn encode_claims(claims: &Claims) -> Vec<u8> {
    let value = Value::Array(vec![
        Value::Integer(CLAIMS_VERSION.into()),
        Value::Bytes(claims.session_id.as_uuid().as_bytes().to_vec()),
        Value::Text(claims.node_id.as_str().to_owned()),
        Value::Integer(claims.issued_at.as_millis().into()),
        Value::Integer(claims.expires_at.as_millis().into()),
    ]);
    let mut out = Vec::with_capacity(64);
    // Invariant: writing to a Vec cannot fail, and a Value made only of integers, byte and
    // text strings and an array always encodes.
    #[allow(clippy::expect_used)]
    ciborium::into_writer(&value, &mut out).expect("claims always encode to CBOR");
    out
}

/// The claims in `bytes`, which only the broker's key has signed, but which are still parsed
/// as if anyone could have written them.
fn decode_claims(bytes: &[u8]) -> Result<Claims, TokenError> {
    let mut reader = bytes;
    // The claims are one flat array: anything nested deeper is not a token.
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut reader, 4)
        .map_err(|_| TokenError::Malformed("payload is not CBOR"))?;
    if !reader.is_empty() {
        return Err(TokenError::Malformed("bytes after the claims"));
    }
    let Value::Array(items) = value else {
        return Err(TokenError::Malformed("claims are not an array"));
    };
    match items.first().and_then(as_u64) {
        Some(CLAIMS_VERSION) => {}
        Some(_) => return Err(TokenError::Malformed("unknown claims version")),
        None => return Err(TokenError::Malformed("claims have no version")),
    }
    let [
        _,
        Value::Bytes(session_id),
        Value::Text(node_id),
        issued_at,
        expires_at,
    ] = items.as_slice()
    else {
        return Err(TokenError::Malformed(
            "claims do not have the version's layout",
        ));
    };
    let session_id = <[u8; 16]>::try_from(session_id.as_slice())
        .ok()
        .and_then(|b| SessionId::from_str(&uuid::Uuid::from_bytes(b).to_string()).ok())
        .ok_or(TokenError::Malformed("session id is not a UUIDv7"))?;
    let node_id =
        NodeId::new(node_id.as_str()).map_err(|_| TokenError::Malformed("node id is not valid"))?;
    let time = |v: &Value| {
        as_u64(v)
            .map(Timestamp::from_millis)
            .ok_or(TokenError::Malformed("time is not an unsigned integer"))
    };
    Ok(Claims {
        session_id,
        node_id,
        issued_at: time(issued_at)?,
        expires_at: time(expires_at)?,
    })
}

fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

/// `der` as a PEM block labelled `label`, in 64-character lines (RFC 7468).
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    // Base64 text is ASCII, so every 64-byte chunk is a whole string.
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// Writes `contents` to a new file at `path` with `mode` (less the umask). An existing file
/// is an `AlreadyExists` error unless `replace`, when it (or a link at `path`) is removed
/// first, so the new file never inherits an old one's mode. A file whose write failed is
/// removed.
pub fn write_file(path: &Path, contents: &[u8], mode: u32, replace: bool) -> io::Result<()> {
    if replace {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if written.is_err() {
        // The write's error is the one to report; a file we cannot remove is left behind.
        let _ = fs::remove_file(path);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use proptest::prelude::*;

    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn claims() -> Claims {
        Claims {
            session_id: SessionId::new(NOW, 42),
            node_id: node("gpu-host-01"),
            issued_at: NOW,
            expires_at: NOW.saturating_add(std::time::Duration::from_secs(60)),
        }
    }

    fn signer() -> TokenSigner {
        TokenSigner::generate().unwrap()
    }

    fn verifier(signer: &TokenSigner) -> TokenVerifier {
        TokenVerifier::new(&signer.public_key()).unwrap()
    }

    /// The token's three parts, with the payload and signature decoded.
    fn parts(token: &str) -> (Vec<u8>, Vec<u8>) {
        let mut it = token.split('.');
        assert_eq!(it.next(), Some("fc1"));
        let payload = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
        let signature = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
        assert_eq!(it.next(), None);
        (payload, signature)
    }

    fn assemble(payload: &[u8], signature: &[u8]) -> String {
        format!(
            "fc1.{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// A token whose payload is `payload`, correctly signed by `signer`.
    fn signed_token(signer: &TokenSigner, payload: &[u8]) -> String {
        let signed = format!("fc1.{}", URL_SAFE_NO_PAD.encode(payload));
        let signature = signer.key_pair.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }

    fn malformed(result: Result<Claims, TokenError>) -> &'static str {
        match result {
            Err(TokenError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn a_signed_token_verifies_and_carries_its_claims() {
        let signer = signer();
        let token = signer.sign(&claims());
        assert!(token.starts_with("fc1."));
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            "{token}"
        );
        assert!(token.len() < 200, "compact: {} bytes", token.len());
        let got = verifier(&signer)
            .verify(&token, &node("gpu-host-01"), NOW)
            .unwrap();
        assert_eq!(got, claims());
    }

    #[test]
    fn an_altered_payload_or_signature_is_a_bad_signature() {
        let signer = signer();
        let verifier = verifier(&signer);
        let (payload, signature) = parts(&signer.sign(&claims()));

        // Move the expiry a little later: still a valid payload, but not the signed one.
        let mut later = claims();
        later.expires_at = later
            .expires_at
            .saturating_add(std::time::Duration::from_secs(3600));
        let forged = assemble(&encode_claims(&later), &signature);
        assert!(matches!(
            verifier.verify(&forged, &node("gpu-host-01"), NOW),
            Err(TokenError::BadSignature)
        ));

        for i in [0, payload.len() / 2, payload.len() - 1] {
            let mut p = payload.clone();
            p[i] ^= 0x01;
            let err = verifier
                .verify(&assemble(&p, &signature), &node("gpu-host-01"), NOW)
                .unwrap_err();
            assert!(matches!(err, TokenError::BadSignature), "byte {i}: {err}");
        }
        for i in [0, 31, 32, 63] {
            let mut s = signature.clone();
            s[i] ^= 0x80;
            let err = verifier
                .verify(&assemble(&payload, &s), &node("gpu-host-01"), NOW)
                .unwrap_err();
            assert!(matches!(err, TokenError::BadSignature), "byte {i}: {err}");
        }
    }

    #[test]
    fn another_signers_token_is_a_bad_signature() {
        let ours = signer();
        let theirs = signer();
        assert_ne!(ours.public_key(), theirs.public_key());
        let err = verifier(&ours)
            .verify(&theirs.sign(&claims()), &node("gpu-host-01"), NOW)
            .unwrap_err();
        assert!(matches!(err, TokenError::BadSignature), "{err}");
        assert_eq!(err.reason(), "bad_signature");
    }

    #[test]
    fn a_token_for_another_node_is_refused() {
        let signer = signer();
        let err = verifier(&signer)
            .verify(&signer.sign(&claims()), &node("gpu-host-02"), NOW)
            .unwrap_err();
        match &err {
            TokenError::WrongNode { expected, found } => {
                assert_eq!(expected.as_str(), "gpu-host-02");
                assert_eq!(found.as_str(), "gpu-host-01");
            }
            other => panic!("expected WrongNode, got {other:?}"),
        }
        assert_eq!(err.reason(), "wrong_node");
    }

    #[test]
    fn a_token_expires_at_its_expiry_not_a_millisecond_later() {
        let signer = signer();
        let verifier = verifier(&signer);
        let token = signer.sign(&claims());
        let expiry = claims().expires_at;
        let just_before = Timestamp::from_millis(expiry.as_millis() - 1);
        verifier
            .verify(&token, &node("gpu-host-01"), just_before)
            .unwrap();
        for now in [expiry, Timestamp::from_millis(u64::MAX)] {
            let err = verifier
                .verify(&token, &node("gpu-host-01"), now)
                .unwrap_err();
            assert!(
                matches!(err, TokenError::Expired { at } if at == expiry),
                "{err}"
            );
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let signer = signer();
        let verifier = verifier(&signer);
        let n = node("gpu-host-01");
        let good = signer.sign(&claims());
        let (payload, signature) = parts(&good);
        let payload_b64 = URL_SAFE_NO_PAD.encode(&payload);
        let cases = [
            String::new(),
            ".".into(),
            "..".into(),
            "fc1".into(),
            "fc1.".into(),
            "fc1..".into(),
            "Bearer fc1.a.b".into(),
            good.replacen("fc1.", "fc2.", 1),
            good.replacen("fc1.", "FC1.", 1),
            good.replace('.', ""),
            format!("{good}.extra"),
            format!("fc1.{payload_b64}"),
            format!("fc1.{payload_b64}=.{}", URL_SAFE_NO_PAD.encode(&signature)),
            format!("fc1.{payload_b64}.{}", STANDARD.encode(&signature)),
            format!(
                "fc1.{payload_b64}.{}",
                URL_SAFE_NO_PAD.encode(&signature[..63])
            ),
            format!(
                "fc1.{}.{}",
                "é".repeat(10),
                URL_SAFE_NO_PAD.encode(&signature)
            ),
            format!("fc1.{}", "A".repeat(10 << 20)),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ];
        for case in &cases {
            let err = verifier.verify(case, &n, NOW).unwrap_err();
            assert!(
                matches!(err, TokenError::Malformed(_)),
                "{:?}: {err}",
                case.get(..40)
            );
            assert_eq!(err.reason(), "malformed");
        }
    }

    #[test]
    fn signed_payloads_that_are_not_claims_are_malformed() {
        let signer = signer();
        let verifier = verifier(&signer);
        let n = node("gpu-host-01");
        let cbor = |v: Value| {
            let mut out = Vec::new();
            ciborium::into_writer(&v, &mut out).unwrap();
            out
        };
        let uuid = claims().session_id.as_uuid().as_bytes().to_vec();
        let v4 = uuid::Uuid::from_bytes([0x42; 16]).into_bytes().to_vec();
        let layout = |version: u64, sid: Vec<u8>, node: &str, exp: Value| {
            cbor(Value::Array(vec![
                Value::Integer(version.into()),
                Value::Bytes(sid),
                Value::Text(node.into()),
                Value::Integer(0.into()),
                exp,
            ]))
        };
        let far = || Value::Integer(u64::MAX.into());
        let mut trailing = encode_claims(&claims());
        trailing.push(0);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "payload is not CBOR"),
            (trailing, "bytes after the claims"),
            (cbor(Value::Text("hi".into())), "claims are not an array"),
            (cbor(Value::Array(vec![])), "claims have no version"),
            (
                layout(2, uuid.clone(), "gpu-host-01", far()),
                "unknown claims version",
            ),
            (
                cbor(Value::Array(vec![Value::Integer(1.into())])),
                "claims do not have the version's layout",
            ),
            (
                layout(1, uuid[..15].to_vec(), "gpu-host-01", far()),
                "session id is not a UUIDv7",
            ),
            (
                layout(1, v4, "gpu-host-01", far()),
                "session id is not a UUIDv7",
            ),
            (
                layout(1, uuid.clone(), "gpu host", far()),
                "node id is not valid",
            ),
            (
                layout(1, uuid.clone(), "gpu-host-01", Value::Integer((-1).into())),
                "time is not an unsigned integer",
            ),
            (
                cbor(Value::Array(vec![Value::Array(vec![Value::Array(vec![
                    Value::Array(vec![Value::Array(vec![])]),
                ])])])),
                "payload is not CBOR",
            ),
        ];
        for (payload, why) in cases {
            assert_eq!(
                malformed(verifier.verify(&signed_token(&signer, &payload), &n, NOW)),
                why
            );
        }
    }

    #[test]
    fn public_keys_must_be_32_bytes() {
        for len in [0, 31, 33, 64] {
            let err = TokenVerifier::new(&vec![7; len]).unwrap_err();
            assert!(err.to_string().contains(&format!("not {len}")), "{err}");
        }
        let signer = signer();
        assert_eq!(verifier(&signer).public_key(), &signer.public_key());
    }

    #[test]
    fn keys_round_trip_through_pem_and_never_print() {
        let signer = signer();
        let pem = signer.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        assert!(pem.ends_with("-----END PRIVATE KEY-----\n"), "{pem}");
        assert!(pem.lines().all(|l| l.len() <= 64));
        let again = TokenSigner::from_pem(&pem).unwrap();
        assert_eq!(again.public_key(), signer.public_key());
        verifier(&signer)
            .verify(&again.sign(&claims()), &node("gpu-host-01"), NOW)
            .unwrap();
        let printed = format!("{signer:?}");
        assert!(!printed.contains("PRIVATE"), "{printed}");
        assert!(printed.contains(&URL_SAFE_NO_PAD.encode(signer.public_key())));
    }

    #[test]
    fn openssl_style_pkcs8_v1_keys_are_accepted() {
        // `openssl genpkey -algorithm ED25519` writes this prefix and then the 32-byte seed.
        let seed = [9u8; 32];
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        let signer = TokenSigner::from_pem(&pem_encode("PRIVATE KEY", &der)).unwrap();
        let expected = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        assert_eq!(
            signer.public_key().as_slice(),
            expected.public_key().as_ref()
        );
    }

    #[test]
    fn keys_that_are_not_ed25519_pkcs8_are_refused() {
        let ecdsa = rcgen::KeyPair::generate().unwrap().serialize_pem();
        for pem in [String::new(), "not pem".into(), ecdsa] {
            let err = TokenSigner::from_pem(&pem).unwrap_err();
            assert!(matches!(err, TokenError::Key(_)), "{err}");
        }
        assert!(matches!(
            TokenSigner::from_pkcs8(&[0x30, 0x00]),
            Err(TokenError::Key(_))
        ));
    }

    #[test]
    fn load_or_create_makes_a_private_key_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let first = TokenSigner::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let contents = fs::read_to_string(&path).unwrap();
        let second = TokenSigner::load_or_create(&path).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            contents,
            "not rewritten"
        );
        verifier(&first)
            .verify(&second.sign(&claims()), &node("gpu-host-01"), NOW)
            .unwrap();
    }

    #[test]
    fn load_or_create_never_replaces_a_file_that_is_not_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        for contents in ["", "hello"] {
            fs::write(&path, contents).unwrap();
            let err = TokenSigner::load_or_create(&path).unwrap_err();
            assert!(matches!(err, TokenError::Key(_)), "{err}");
            assert!(err.to_string().contains("token.key"), "{err}");
            assert_eq!(fs::read_to_string(&path).unwrap(), contents);
        }
        let missing_dir = dir.path().join("nope").join("token.key");
        let err = TokenSigner::load_or_create(&missing_dir).unwrap_err();
        assert!(matches!(err, TokenError::Io { .. }), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
    }

    fn arbitrary_claims() -> impl Strategy<Value = Claims> {
        (
            any::<SessionId>(),
            any::<NodeId>(),
            any::<Timestamp>(),
            1..=u64::MAX,
        )
            .prop_map(|(session_id, node_id, issued_at, expires_at)| Claims {
                session_id,
                node_id,
                issued_at,
                expires_at: Timestamp::from_millis(expires_at),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_claims_round_trip(claims in arbitrary_claims(), before in any::<u64>()) {
            let signer = signer();
            let token = signer.sign(&claims);
            prop_assert!(token.len() <= MAX_TOKEN_LEN);
            let now = Timestamp::from_millis(before % claims.expires_at.as_millis());
            let got = verifier(&signer).verify(&token, &claims.node_id, now).unwrap();
            prop_assert_eq!(got, claims);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_is_refused_without_panicking(text in any::<String>()) {
            let signer = signer();
            let err = verifier(&signer).verify(&text, &node("n"), NOW).unwrap_err();
            prop_assert!(matches!(err, TokenError::Malformed(_)), "{}", err);
        }

        #[test]
        fn token_shaped_text_is_refused_without_panicking(
            text in "fc1\\.[A-Za-z0-9_=+/.-]{0,400}\\.[A-Za-z0-9_-]{0,100}"
        ) {
            let signer = signer();
            let err = verifier(&signer).verify(&text, &node("n"), NOW).unwrap_err();
            prop_assert!(
                matches!(err, TokenError::Malformed(_) | TokenError::BadSignature),
                "{}",
                err
            );
        }

        #[test]
        fn arbitrary_signed_payloads_are_malformed(
            payload in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            let signer = signer();
            let token = signed_token(&signer, &payload);
            let err = verifier(&signer).verify(&token, &node("n"), NOW).unwrap_err();
            prop_assert!(matches!(err, TokenError::Malformed(_)), "{}", err);
        }

        #[test]
        fn arbitrary_unsigned_payloads_are_bad_signatures(
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            signature in proptest::collection::vec(any::<u8>(), 64),
        ) {
            let signer = signer();
            let err = verifier(&signer)
                .verify(&assemble(&payload, &signature), &node("n"), NOW)
                .unwrap_err();
            prop_assert!(matches!(err, TokenError::BadSignature), "{}", err);
        }

        #[test]
        fn the_claims_decoder_refuses_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048)
        ) {
            let err = decode_claims(&bytes).unwrap_err();
            prop_assert!(matches!(err, TokenError::Malformed(_)), "{}", err);
        }
    }
}

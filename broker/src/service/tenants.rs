//! Tenants: who may call the API (bearer keys, stored as SHA-256 digests) and how fast.
//!
//! The rate limit is a token bucket per tenant, sans IO: the caller passes `now`.

use std::collections::BTreeMap;

use framecast_shared::config::broker::TenantConfig;
use framecast_shared::ids::TenantId;
use framecast_shared::time::Timestamp;

/// The tenants of a broker, by the digest of their key.
#[derive(Debug, Clone)]
pub struct Tenants {
    by_digest: BTreeMap<[u8; 32], TenantConfig>,
}

impl Tenants {
    /// The tenants in `configs` (digests that are not 64 hex digits are skipped; a loaded
    /// config was validated, so none are).
    pub fn new(configs: &[TenantConfig]) -> Self {
        Self {
            by_digest: configs
                .iter()
                .filter_map(|t| Some((parse_hex32(&t.api_key_sha256)?, t.clone())))
                .collect(),
        }
    }

    /// The tenant whose key is `key`.
    pub fn authenticate(&self, key: &str) -> Option<&TenantConfig> {
        self.by_digest.get(&sha256(key.as_bytes()))
    }

    /// Every tenant.
    pub fn all(&self) -> impl Iterator<Item = &TenantConfig> {
        self.by_digest.values()
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        *out.get_mut(i)? = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Token buckets per tenant: `requests_per_minute` tokens, refilled continuously.
#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: BTreeMap<TenantId, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Timestamp,
}

impl RateLimits {
    /// Takes one request from `tenant`'s bucket at `now`. `Err(seconds)` says how long until
    /// the next request would be allowed.
    pub fn take(&mut self, tenant: &TenantConfig, now: Timestamp) -> Result<(), u32> {
        let Some(per_minute) = tenant.requests_per_minute else {
            return Ok(());
        };
        let capacity = f64::from(per_minute.max(1));
        let per_ms = capacity / 60_000.0;
        let b = self.buckets.entry(tenant.id.clone()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = now.as_millis().saturating_sub(b.at.as_millis()) as f64;
        b.tokens = (b.tokens + elapsed * per_ms).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = (1.0 - b.tokens) / per_ms;
            // At most a minute (a whole bucket's refill), so the conversion cannot truncate.
            let secs = (wait_ms / 1000.0).ceil().clamp(1.0, 60.0);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Err(secs as u32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(rpm: Option<u32>) -> TenantConfig {
        TenantConfig {
            id: TenantId::new("acme").unwrap(),
            api_key_sha256: hex(&sha256(b"secret")),
            max_sessions: None,
            requests_per_minute: rpm,
            admin: false,
            max_session_s: None,
        }
    }

    #[test]
    fn keys_are_matched_by_their_digest() {
        let tenants = Tenants::new(&[tenant(None)]);
        assert_eq!(
            tenants.authenticate("secret").map(|t| t.id.as_str()),
            Some("acme")
        );
        assert!(tenants.authenticate("Secret").is_none());
        assert!(tenants.authenticate("").is_none());
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_bucket_refills_with_time_and_says_when_to_retry() {
        let mut limits = RateLimits::default();
        let t = tenant(Some(2));
        let t0 = Timestamp::from_millis(1_000_000);
        assert!(limits.take(&t, t0).is_ok());
        assert!(limits.take(&t, t0).is_ok());
        assert_eq!(limits.take(&t, t0), Err(30), "one token per 30 s");
        let later = Timestamp::from_millis(1_030_000);
        assert!(limits.take(&t, later).is_ok());
        assert!(
            limits.take(&tenant(None), t0).is_ok(),
            "no limit configured"
        );
    }
}

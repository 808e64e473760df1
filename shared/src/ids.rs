//! Identifiers as newtypes.
//!
//! Every id that crosses a process boundary is parsed once, where it enters (a config file, an
//! HTTP body, a protocol frame), and is a valid value of its type from then on. Names that
//! people choose (nodes, tenants, games, tiers, genres) are short ASCII tokens; session ids are
//! UUIDv7 so they sort by creation time.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::time::Timestamp;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string was empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// Which kind of id was being parsed.
        kind: &'static str,
    },
    /// The string was longer than the id allows.
    #[error("{kind} is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Which kind of id was being parsed.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The string held a character the id does not allow.
    #[error("{kind} may only hold {allowed}; found {found:?}")]
    BadChar {
        /// Which kind of id was being parsed.
        kind: &'static str,
        /// The allowed characters, in words.
        allowed: &'static str,
        /// The first character that is not allowed.
        found: char,
    },
    /// The string is not a UUID.
    #[error("{kind} must be a UUID: {reason}")]
    NotUuid {
        /// Which kind of id was being parsed.
        kind: &'static str,
        /// What the UUID parser said.
        reason: String,
    },
}

/// The characters a name-like id may hold, and how long it may be.
struct TokenRules {
    max_len: usize,
    allowed: &'static str,
    is_allowed: fn(char) -> bool,
}

/// Lowercase names chosen by operators: tenants, games, tiers, genres, regions.
const NAME_RULES: TokenRules = TokenRules {
    max_len: 64,
    allowed: "lowercase ASCII letters, digits, '-', '_' and '.'",
    is_allowed: |c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'),
};

/// Names that come from machines: host names, NVML UUIDs (`GPU-8f0c…`), PCI addresses.
const HOST_RULES: TokenRules = TokenRules {
    max_len: 128,
    allowed: "ASCII letters, digits, '-', '_', '.' and ':'",
    is_allowed: |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'),
};

fn check_token(kind: &'static str, s: &str, rules: &TokenRules) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > rules.max_len {
        return Err(IdError::TooLong {
            kind,
            len: s.len(),
            max: rules.max_len,
        });
    }
    match s.chars().find(|c| !(rules.is_allowed)(*c)) {
        Some(found) => Err(IdError::BadChar {
            kind,
            allowed: rules.allowed,
            found,
        }),
        None => Ok(()),
    }
}

/// Declares a string id newtype that can only hold a valid token.
macro_rules! token_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $rules:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses `s`, returning an error that says which rule it breaks.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_token($kind, &s, &$rules)?;
                Ok(Self(s))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

token_id!(
    /// A GPU host running `framecast-agent`, usually its host name.
    NodeId,
    "node id",
    HOST_RULES
);
token_id!(
    /// A physical GPU on a node: the NVML UUID (`GPU-…`) on real hardware, a chosen name
    /// (`sim-0`) on a simulated inventory. Unique within its node.
    GpuId,
    "gpu id",
    HOST_RULES
);
token_id!(
    /// A game platform that calls the broker; API keys, quotas and rate limits belong to it.
    TenantId,
    "tenant id",
    NAME_RULES
);
token_id!(
    /// A game in the catalogue, e.g. `arena-shooter`.
    GameId,
    "game id",
    NAME_RULES
);
token_id!(
    /// A region a broker serves, e.g. `eu-west`.
    RegionName,
    "region name",
    NAME_RULES
);
token_id!(
    /// A quality tier's name, e.g. `720p`, `1080p`, `4k`. Tiers are configuration, so the set
    /// of names is open; see [`crate::tier::TierPreset`].
    TierName,
    "tier name",
    NAME_RULES
);
token_id!(
    /// A genre's name, e.g. `fps`, `moba`, `rpg`. Genres are configuration, so the set of names
    /// is open; see [`crate::genre::GenreProfile`].
    GenreName,
    "genre name",
    NAME_RULES
);

/// One player session, from allocation to its end.
///
/// A UUIDv7: the first 48 bits are the creation time in Unix milliseconds, so ids sort by
/// creation time and an embedded store keeps recent sessions together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(Uuid);

impl SessionId {
    /// A new id for a session created at `now` (the caller's clock, so tests and the simulator
    /// stay deterministic), with `random` supplying the 74 random bits.
    pub fn new(now: Timestamp, random: u128) -> Self {
        // The builder puts the time in the top 48 bits and sets the version and variant bits.
        let uuid = uuid::Builder::from_unix_timestamp_millis(now.as_millis(), &rand_bytes(random));
        Self(uuid.into_uuid())
    }

    /// A new id from the system clock and a random source; for the service shells.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// The creation time encoded in the id.
    pub fn created_at(&self) -> Timestamp {
        let [a, b, c, d, e, f, ..] = *self.0.as_bytes();
        Timestamp::from_millis(u64::from_be_bytes([0, 0, a, b, c, d, e, f]))
    }

    /// The UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

/// The low 80 bits of `random`; the UUID builder keeps 74 of them.
fn rand_bytes(random: u128) -> [u8; 10] {
    let [_, _, _, _, _, _, low @ ..] = random.to_be_bytes();
    low
}

impl TryFrom<String> for SessionId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> String {
        id.to_string()
    }
}

impl FromStr for SessionId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let uuid = Uuid::parse_str(s).map_err(|e| IdError::NotUuid {
            kind: "session id",
            reason: e.to_string(),
        })?;
        if uuid.get_version_num() != 7 {
            return Err(IdError::NotUuid {
                kind: "session id",
                reason: format!(
                    "version {} UUID; session ids are UUIDv7",
                    uuid.get_version_num()
                ),
            });
        }
        Ok(Self(uuid))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_tokens_and_name_the_bad_rule() {
        assert_eq!(
            GameId::new("arena-shooter_2.0").unwrap().as_str(),
            "arena-shooter_2.0"
        );
        assert_eq!(GameId::new(""), Err(IdError::Empty { kind: "game id" }));
        let err = TenantId::new("Acme").unwrap_err();
        assert!(err.to_string().contains("found 'A'"), "{err}");
        let err = TierName::new("x".repeat(65)).unwrap_err();
        assert!(matches!(
            err,
            IdError::TooLong {
                len: 65,
                max: 64,
                ..
            }
        ));
    }

    #[test]
    fn gpu_ids_accept_nvml_uuids_and_pci_addresses() {
        GpuId::new("GPU-8f0c2a4e-1d2b-4c3d-9e8f-0a1b2c3d4e5f").unwrap();
        GpuId::new("0000:3b:00.0").unwrap();
        assert!(GpuId::new("gpu 0").is_err());
    }

    #[test]
    fn session_ids_are_time_ordered_and_carry_their_time() {
        let a = SessionId::new(Timestamp::from_millis(1_700_000_000_000), u128::MAX);
        let b = SessionId::new(Timestamp::from_millis(1_700_000_000_001), 0);
        assert!(a < b);
        assert_eq!(a.created_at(), Timestamp::from_millis(1_700_000_000_000));
        assert_eq!(a.as_uuid().get_version_num(), 7);
        let parsed: SessionId = a.to_string().parse().unwrap();
        assert_eq!(parsed, a);
    }

    #[test]
    fn session_ids_refuse_other_uuid_versions() {
        let v4 = "9b2d7c1e-3f4a-4b5c-8d6e-7f8091a2b3c4";
        assert!(
            v4.parse::<SessionId>()
                .unwrap_err()
                .to_string()
                .contains("UUIDv7")
        );
        assert!("not-a-uuid".parse::<SessionId>().is_err());
    }

    #[test]
    fn ids_deserialize_through_validation() {
        let ok: NodeId = serde_json_like("gpu-host-01");
        assert_eq!(ok.as_str(), "gpu-host-01");
    }

    fn serde_json_like<T: for<'de> Deserialize<'de>>(s: &str) -> T {
        let v = toml::Value::String(s.to_owned());
        T::deserialize(v).unwrap()
    }
}

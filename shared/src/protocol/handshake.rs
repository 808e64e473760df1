//! Protocol version negotiation in the `Hello`/`Welcome` handshake.
//!
//! Versions are single integers. Within one version, messages only grow (new optional
//! fields, new message types that old peers ignore), so peers of different builds interoperate
//! without a version bump. A version bump marks a change an old peer cannot follow; each build
//! speaks a contiguous range [`MIN_SUPPORTED_VERSION`]`..=`[`PROTOCOL_VERSION`] and the broker
//! picks the highest version both sides speak.

use super::messages::{Goodbye, GoodbyeReason, Hello};

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest protocol version this build still speaks.
pub const MIN_SUPPORTED_VERSION: u32 = 1;

/// The peers speak no common protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "incompatible protocol: the {peer_role} offers version {peer}, this {own_role} speaks \
     {min}..={max}; {advice}"
)]
pub struct VersionError {
    /// `agent` or `broker`: the side that offered `peer`.
    pub peer_role: &'static str,
    /// `broker` or `agent`: the side that refuses.
    pub own_role: &'static str,
    /// The version the peer offered.
    pub peer: u32,
    /// The oldest version this side speaks.
    pub min: u32,
    /// The newest version this side speaks.
    pub max: u32,
    /// What an operator should upgrade.
    pub advice: &'static str,
}

impl VersionError {
    /// The `Goodbye` that tells the peer why it is refused.
    pub fn goodbye(&self) -> Goodbye {
        Goodbye {
            reason: GoodbyeReason::IncompatibleVersion,
            message: self.to_string(),
        }
    }
}

/// The version to speak with an agent whose `Hello` offers `hello.protocol_version`, which is
/// the newest version the agent speaks. An agent speaks every version from its own minimum up,
/// so the broker answers with the lower of the two maxima if it still speaks it.
pub fn negotiate(hello: &Hello) -> Result<u32, VersionError> {
    negotiate_version(
        hello.protocol_version,
        MIN_SUPPORTED_VERSION,
        PROTOCOL_VERSION,
    )
}

/// [`negotiate`] for a broker that speaks `min..=max`; separate so tests can model other builds.
pub fn negotiate_version(peer: u32, min: u32, max: u32) -> Result<u32, VersionError> {
    let chosen = peer.min(max);
    if chosen < min {
        return Err(VersionError {
            peer_role: "agent",
            own_role: "broker",
            peer,
            min,
            max,
            advice: "upgrade the agent to a build that speaks one of these versions",
        });
    }
    // An agent newer than the broker is told the broker's version and downgrades; if the
    // agent no longer speaks it, the agent refuses the Welcome with its own Goodbye.
    Ok(chosen)
}

/// The agent's side: whether it speaks the version the broker chose in its `Welcome`, given
/// that the agent speaks `min..=max`.
pub fn accept_welcome(chosen: u32, min: u32, max: u32) -> Result<u32, VersionError> {
    if (min..=max).contains(&chosen) {
        Ok(chosen)
    } else {
        Err(VersionError {
            peer_role: "broker",
            own_role: "agent",
            peer: chosen,
            min,
            max,
            advice: if chosen < min {
                "upgrade the broker"
            } else {
                "upgrade the agent"
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_version_agrees() {
        assert_eq!(negotiate_version(1, 1, 1), Ok(1));
    }

    #[test]
    fn newer_agent_is_offered_the_brokers_version() {
        assert_eq!(negotiate_version(3, 1, 2), Ok(2));
    }

    #[test]
    fn too_old_agent_is_refused_with_advice() {
        let err = negotiate_version(1, 2, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "incompatible protocol: the agent offers version 1, this broker speaks 2..=3; \
             upgrade the agent to a build that speaks one of these versions"
        );
        assert_eq!(err.goodbye().reason, GoodbyeReason::IncompatibleVersion);
    }

    #[test]
    fn agent_refuses_a_version_it_dropped() {
        assert_eq!(accept_welcome(2, 1, 3), Ok(2));
        let err = accept_welcome(1, 2, 3).unwrap_err();
        assert!(err.to_string().ends_with("upgrade the broker"), "{err}");
        assert!(accept_welcome(4, 2, 3).is_err());
    }
}

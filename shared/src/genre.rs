//! Genre profiles: how a kind of game loads a GPU and how it wants to be placed.
//!
//! Genres are configuration (`[genres.<name>]` in `broker.toml`). The defaults model the three
//! genres of the design: fast shooters and MOBAs are latency-critical and suffer from noisy
//! neighbours, so they spread across GPUs; RPGs tolerate more latency and pack, keeping whole
//! GPUs free for the others.

use serde::{Deserialize, Serialize};

use crate::ids::GenreName;

/// How the placer distributes sessions of a genre over GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementStrategy {
    /// Prefer the least-loaded GPU, away from heavy neighbours.
    Spread,
    /// Prefer the fullest GPU that still fits, keeping other GPUs whole.
    Pack,
}

/// Load, latency needs and neighbour tolerance of one genre.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenreProfile {
    /// The genre's name, e.g. `fps`.
    pub name: GenreName,
    /// GPU load of a session relative to an average one (1.0); the placer multiplies the
    /// compute demand by it. Range `0.1..=4.0`.
    pub load_weight: f64,
    /// The largest round-trip time, in milliseconds, from player to region that the genre
    /// accepts at first; it relaxes the longer a request waits.
    pub rtt_cap_ms: u32,
    /// Spread or pack.
    pub strategy: PlacementStrategy,
    /// How much the genre suffers from, and causes, contention on a shared GPU, `0.0..=1.0`:
    /// the weight of the neighbour term in the placer's score.
    pub neighbour_penalty: f64,
}

impl GenreProfile {
    /// The allowed range of [`GenreProfile::load_weight`].
    pub const LOAD_WEIGHT_RANGE: std::ops::RangeInclusive<f64> = 0.1..=4.0;
    /// The allowed range of [`GenreProfile::neighbour_penalty`].
    pub const NEIGHBOUR_PENALTY_RANGE: std::ops::RangeInclusive<f64> = 0.0..=1.0;

    /// The built-in `fps`, `moba` and `rpg` profiles.
    ///
    /// RTT caps: competitive shooters are commonly held to well under 50 ms round trip end to
    /// end, MOBAs tolerate somewhat more, RPGs about 100 ms. Load weights reflect that shooters
    /// render at high frame rates with little idle time while RPG scenes are lighter on
    /// average. These are starting points to tune with the simulator, not measurements.
    pub fn defaults() -> Vec<GenreProfile> {
        vec![
            profile("fps", 1.3, 40, PlacementStrategy::Spread, 0.8),
            profile("moba", 1.0, 60, PlacementStrategy::Spread, 0.6),
            profile("rpg", 0.7, 100, PlacementStrategy::Pack, 0.2),
        ]
    }
}

fn profile(
    name: &str,
    load_weight: f64,
    rtt_cap_ms: u32,
    strategy: PlacementStrategy,
    neighbour_penalty: f64,
) -> GenreProfile {
    GenreProfile {
        // Only called with the literal names above, which are valid.
        name: GenreName::new(name).unwrap_or_else(|_| unreachable!("built-in genre {name}")),
        load_weight,
        rtt_cap_ms,
        strategy,
        neighbour_penalty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_critical_genres_spread_and_rpg_packs() {
        let genres = GenreProfile::defaults();
        let strategy = |n: &str| {
            genres
                .iter()
                .find(|g| g.name.as_str() == n)
                .unwrap()
                .strategy
        };
        assert_eq!(strategy("fps"), PlacementStrategy::Spread);
        assert_eq!(strategy("moba"), PlacementStrategy::Spread);
        assert_eq!(strategy("rpg"), PlacementStrategy::Pack);
        for g in &genres {
            assert!(GenreProfile::LOAD_WEIGHT_RANGE.contains(&g.load_weight));
            assert!(GenreProfile::NEIGHBOUR_PENALTY_RANGE.contains(&g.neighbour_penalty));
        }
    }
}

//! `[planner]` of `broker.toml`: the pool planner that keeps warm instances and vGPU profiles
//! ahead of demand, and the fleet recommendation it sends to a node-pool autoscaler.
//!
//! Durations are seconds and may have a fraction (`round_every_s = 0.2` in tests).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::Checker;

/// `[planner]`: how the broker plans its pools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlannerConfig {
    /// Whether the planner runs. Off: no pool plans are sent, agents keep whatever plan they
    /// had, and `GET /v1/pools` shows no targets.
    pub enabled: bool,
    /// How often the planner compares demand, intent and what agents report, s (0.2 to
    /// 3600).
    pub round_every_s: f64,
    /// The recent window demand is measured over, s.
    pub short_window_s: f64,
    /// The longer window that steadies the forecast, s.
    pub long_window_s: f64,
    /// How long a game takes to start cold: warm instances cover the demand expected within
    /// it, s.
    pub launch_time_s: f64,
    /// Standard deviations of demand kept warm above the forecast. 4 by default: the forecast
    /// trails a rising evening and refills take a launch time; on the evening-peak demand the
    /// Poisson rule of thumb (2) kept 90.4 % of placements warm, 4 kept 95.7 %.
    pub safety_z: f64,
    /// Fewest warm instances per (region, tier, game) with any demand.
    pub min_warm: u16,
    /// Most warm instances per (region, tier, game).
    pub max_warm: u16,
    /// Most GPU changes (profile or warm target) sent per round, so the fleet does not flap.
    /// 64 by default: 16 re-planned a 3 840-GPU fleet too slowly to follow an evening rise.
    pub max_changes_per_round: u32,
    /// Rounds a new target must hold before the planner acts on it.
    pub hysteresis_rounds: u32,
    /// Learn a per-hour-of-day demand profile and plan for the coming hour too.
    pub daily_profile: bool,
    /// Where the fleet recommendation (nodes needed per region and GPU model) is POSTed as
    /// JSON when it changes; `http://` only (the broker has no TLS HTTP client). None: the
    /// recommendation is only exported as metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<WebhookUrl>,
    /// Fewest seconds between two webhook posts (a failed post is retried after it too).
    pub webhook_min_interval_s: f64,
    /// A file holding the secret the webhook's posts are signed with (HMAC-SHA256 in the
    /// `x-framecast-signature` header); read at start. None: posts are not signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_file: Option<PathBuf>,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            round_every_s: 10.0,
            short_window_s: 300.0,
            long_window_s: 3600.0,
            launch_time_s: 30.0,
            safety_z: 4.0,
            min_warm: 0,
            max_warm: 64,
            max_changes_per_round: 64,
            hysteresis_rounds: 3,
            daily_profile: true,
            webhook_url: None,
            webhook_min_interval_s: 60.0,
            webhook_secret_file: None,
        }
    }
}

impl PlannerConfig {
    /// `round_every_s` as a duration.
    pub fn round_every(&self) -> Duration {
        seconds(self.round_every_s)
    }

    /// `short_window_s` as a duration.
    pub fn short_window(&self) -> Duration {
        seconds(self.short_window_s)
    }

    /// `long_window_s` as a duration.
    pub fn long_window(&self) -> Duration {
        seconds(self.long_window_s)
    }

    /// `launch_time_s` as a duration.
    pub fn launch_time(&self) -> Duration {
        seconds(self.launch_time_s)
    }

    /// `webhook_min_interval_s` as a duration.
    pub fn webhook_min_interval(&self) -> Duration {
        seconds(self.webhook_min_interval_s)
    }

    /// Checks every rule into `c` (the `planner` section).
    pub(crate) fn check(&self, c: &mut Checker<'_>) {
        const WEEK: f64 = 7.0 * 24.0 * 3600.0;
        // The broker's driver ticks every 0.2 s; a shorter round could not run more often.
        c.range("round_every_s", self.round_every_s, 0.2, 3600.0);
        c.range("short_window_s", self.short_window_s, 1.0, WEEK);
        c.range("long_window_s", self.long_window_s, 1.0, WEEK);
        c.check(
            self.short_window_s >= self.round_every_s,
            "short_window_s",
            self.short_window_s,
            format!(
                "must be at least planner.round_every_s ({})",
                self.round_every_s
            ),
        );
        c.check(
            self.long_window_s >= self.short_window_s,
            "long_window_s",
            self.long_window_s,
            format!(
                "must be at least planner.short_window_s ({})",
                self.short_window_s
            ),
        );
        c.range("launch_time_s", self.launch_time_s, 0.1, 3600.0);
        c.range("safety_z", self.safety_z, 0.0, 10.0);
        c.range("max_warm", self.max_warm, 0, 4096);
        c.check(
            self.min_warm <= self.max_warm,
            "min_warm",
            self.min_warm,
            format!("must not exceed planner.max_warm ({})", self.max_warm),
        );
        c.range(
            "max_changes_per_round",
            self.max_changes_per_round,
            1,
            100_000,
        );
        c.range("hysteresis_rounds", self.hysteresis_rounds, 0, 1_000);
        c.range(
            "webhook_min_interval_s",
            self.webhook_min_interval_s,
            0.0,
            86_400.0,
        );
    }
}

/// Seconds as a duration; only called on validated, finite, non-negative values (anything
/// else becomes zero rather than a panic).
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

/// An `http://host[:port][/path]` URL the broker can POST to, parsed when the config loads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebhookUrl {
    text: String,
    host: String,
    port: u16,
    path: String,
}

/// Why a string is not a webhook URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("webhook URL {url:?}: {reason}")]
pub struct WebhookUrlError {
    url: String,
    reason: &'static str,
}

impl WebhookUrl {
    /// Parses `http://host[:port][/path][?query]`. `https://` is refused: the broker carries
    /// no TLS HTTP client (put a TLS-terminating proxy on loopback in front of the target).
    pub fn parse(url: &str) -> Result<Self, WebhookUrlError> {
        let fail = |reason| WebhookUrlError {
            url: url.to_owned(),
            reason,
        };
        if url.len() > 2048 {
            return Err(fail("is longer than 2048 bytes"));
        }
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(fail(
                    "https is not supported (the broker has no TLS HTTP client); use http:// \
                     to a TLS-terminating proxy",
                ));
            }
            _ => return Err(fail("must start with http://")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if authority.contains('@') {
            return Err(fail("must not carry credentials (user@host)"));
        }
        if path.contains('#') {
            return Err(fail("must not have a fragment"));
        }
        if !path
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '<' | '>' | '\\' | '`'))
        {
            return Err(fail("the path must be printable ASCII without spaces"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| {
            fail("must name a host, and a port in 1..=65535 if any (http://host:port/path)")
        })?;
        Ok(Self {
            text: url.to_owned(),
            host,
            port,
            path,
        })
    }

    /// The host, without brackets for an IPv6 address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (80 when the URL names none).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path and query, at least `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The `Host` header: the authority as written.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
    if !host_ok {
        return None;
    }
    let port = match port {
        None => 80,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0)?,
    };
    Some((host.to_owned(), port))
}

impl TryFrom<String> for WebhookUrl {
    type Error = WebhookUrlError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<WebhookUrl> for String {
    fn from(u: WebhookUrl) -> Self {
        u.text
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn http_urls_parse_into_host_port_and_path() {
        let table: &[(&str, &str, u16, &str, &str)] = &[
            ("http://scaler", "scaler", 80, "/", "scaler"),
            (
                "http://scaler.ops.svc:8080/v1/hook?pool=gpu",
                "scaler.ops.svc",
                8080,
                "/v1/hook?pool=gpu",
                "scaler.ops.svc:8080",
            ),
            ("HTTP://10.0.0.1:9/x", "10.0.0.1", 9, "/x", "10.0.0.1:9"),
            ("http://[::1]:7000/hook", "::1", 7000, "/hook", "[::1]:7000"),
            ("http://h?q=1", "h", 80, "/?q=1", "h"),
        ];
        for (url, host, port, path, header) in table {
            let u = WebhookUrl::parse(url).unwrap();
            assert_eq!(
                (u.host(), u.port(), u.path(), u.host_header().as_str()),
                (*host, *port, *path, *header),
                "{url}"
            );
            assert_eq!(u.to_string(), *url);
        }
    }

    #[test]
    fn other_urls_are_refused_with_the_reason() {
        let table: &[(&str, &str)] = &[
            ("https://scaler/hook", "https is not supported"),
            ("ftp://scaler", "must start with http://"),
            ("scaler:80", "must start with http://"),
            ("http://", "must name a host"),
            ("http://:80/x", "must name a host"),
            ("http://h:0/", "port in 1..=65535"),
            ("http://h:99999/", "port in 1..=65535"),
            ("http://h:x/", "port in 1..=65535"),
            ("http://user:pw@h/", "credentials"),
            ("http://h/a b", "printable ASCII"),
            ("http://h/a#frag", "fragment"),
            ("http://[zz]/", "must name a host"),
            ("http://ho st/", "must name a host"),
        ];
        for (url, reason) in table {
            let e = WebhookUrl::parse(url).unwrap_err();
            assert!(e.to_string().contains(reason), "{url}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_strings_never_panic_the_parser(s in "\\PC*", tail in "(http://)?[\\[\\]:@/?#a-z0-9 ]{0,24}") {
            let _ = WebhookUrl::parse(&s);
            let _ = WebhookUrl::parse(&format!("http://{tail}"));
            let _ = WebhookUrl::parse(&tail);
        }
    }
}

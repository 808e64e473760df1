use std::path::Path;

use super::*;
use crate::config::agent::InventorySource;
use crate::ids::TierName;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn sources<'a>(
    file: Option<&'a Path>,
    env: &[(&str, &str)],
    flags: &[(&str, &str)],
) -> Sources<'a> {
    Sources {
        file,
        env: Some(
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        flags: flags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn broker_from(toml: &str) -> Result<BrokerConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "broker.toml", toml);
    load(&sources(Some(&path), &[], &[]))
}

fn agent_from(toml: &str) -> Result<AgentConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "agent.toml", toml);
    load(&sources(Some(&path), &[], &[]))
}

/// The error lines, with the `(from …)` suffix that names the temp file cut off.
fn lines(err: &ConfigError) -> Vec<String> {
    err.lines()
        .into_iter()
        .map(|l| match l.find(" (from ") {
            Some(i) => l[..i].to_owned(),
            None => l,
        })
        .collect()
}

#[test]
fn defaults_are_valid() {
    let broker: BrokerConfig = load(&sources(None, &[], &[])).unwrap();
    assert_eq!(broker, BrokerConfig::default());
    assert_eq!(broker.tier_presets(), crate::tier::TierPreset::defaults());
    assert_eq!(
        broker.genre_profiles(),
        crate::genre::GenreProfile::defaults()
    );
    let agent: AgentConfig = load(&sources(None, &[], &[])).unwrap();
    assert_eq!(agent, AgentConfig::default());
}

#[test]
fn a_bad_framebuffer_is_refused_with_field_value_rule_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "broker.toml",
        "[tiers.4k]\nframebuffer_mb = 8100\n",
    );
    let err = load::<BrokerConfig>(&sources(Some(&path), &[], &[])).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(
            "tiers.4k.framebuffer_mb = 8100: must be a multiple of 64 (from TOML file "
        ),
        "{text}"
    );
    assert!(text.contains("broker.toml"), "{text}");
}

/// Rule violations, one per row: the TOML, then the error line expected.
#[test]
fn broker_rule_table() {
    let table: &[(&str, &str)] = &[
        (
            "[tiers.4k]\nframebuffer_mb = 0",
            "tiers.4k.framebuffer_mb = 0: must be greater than 0",
        ),
        (
            "[tiers.4k]\nframebuffer_mb = 131072",
            "tiers.4k.framebuffer_mb = 131072: must fit a GPU that can stream (the largest known, NVIDIA L40S, has 49152 MB)",
        ),
        (
            "[tiers.720p]\ncompute_share = 17",
            "tiers.720p.compute_share = 17: must be in 1..=16",
        ),
        (
            "[tiers.720p]\ncompute_share = 0",
            "tiers.720p.compute_share = 0: must be in 1..=16",
        ),
        (
            "[tiers.720p]\nwidth = 1281",
            "tiers.720p.width = 1281: must be even and in 2..=7680",
        ),
        (
            "[tiers.720p]\nfps = 0",
            "tiers.720p.fps = 0: must be in 1..=240",
        ),
        (
            "[tiers.720p]\ncodecs = []",
            "tiers.720p.codecs = []: must list at least one codec, each once",
        ),
        (
            "[tiers.720p]\ncodecs = [\"h264\", \"h264\"]",
            "tiers.720p.codecs = [H264, H264]: must list at least one codec, each once",
        ),
        (
            "[tiers.720p]\nencoder_units = 0.0",
            "tiers.720p.encoder_units = 0.0: must be in 0.001..=64",
        ),
        (
            "[genres.fps]\nload_weight = 9.5",
            "genres.fps.load_weight = 9.5: must be in 0.1..=4",
        ),
        (
            "[genres.rpg]\nneighbour_penalty = -0.1",
            "genres.rpg.neighbour_penalty = -0.1: must be in 0..=1",
        ),
        (
            "[http]\nmax_body_bytes = 10",
            "http.max_body_bytes = 10: must be in 1024..=16777216",
        ),
        (
            "[control]\nsuspect_after_ms = 20000",
            "control.down_after_ms = 10000: must be greater than control.suspect_after_ms (20000)",
        ),
        (
            "[timers]\nreservation_ttl_s = 0",
            "timers.reservation_ttl_s = 0: must be in 1..=604800",
        ),
        (
            "[[games]]\nid = \"arena\"\ngenre = \"racing\"",
            "games.0.genre = \"racing\": must be one of the configured [genres]",
        ),
        (
            "[[games]]\nid = \"arena\"\ngenre = \"fps\"\ntiers = [\"8k\"]",
            "games.0.tiers = \"8k\": must be one of the configured [tiers]",
        ),
        (
            "[[tenants]]\nid = \"acme\"\napi_key_sha256 = \"secret-key\"",
            "tenants.0.api_key_sha256 = \"<redacted>\": must be 64 hex digits (the SHA-256 of the key, never the key itself)",
        ),
        (
            "[[tenants]]\nid = \"a\"\napi_key_sha256 = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n[[tenants]]\nid = \"b\"\napi_key_sha256 = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"",
            "tenants.1.api_key_sha256 = \"<redacted>\": must be unique among tenants (two tenants cannot share a key)",
        ),
        (
            "[[tenants]]\nid = \"a\"\napi_key_sha256 = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\nmax_session_s = 0",
            "tenants.0.max_session_s = 0: must be in 60..=604800",
        ),
        (
            "[tiers.4k]\nmax_session_s = 10",
            "tiers.4k.max_session_s = 10: must be in 60..=604800",
        ),
        (
            "[control.tls]\nca_cert = \"/nonexistent/ca.pem\"\ncert = \"/nonexistent/b.pem\"\nkey = \"/nonexistent/b.key\"",
            "control.tls.ca_cert = \"/nonexistent/ca.pem\": file not found",
        ),
        (
            "[planner]\nround_every_s = 0.01",
            "planner.round_every_s = 0.01: must be in 0.2..=3600",
        ),
        (
            "[planner]\nround_every_s = 600\nshort_window_s = 300",
            "planner.short_window_s = 300.0: must be at least planner.round_every_s (600)",
        ),
        (
            "[planner]\nlong_window_s = 60",
            "planner.long_window_s = 60.0: must be at least planner.short_window_s (300)",
        ),
        (
            "[planner]\nsafety_z = -1",
            "planner.safety_z = -1.0: must be in 0..=10",
        ),
        (
            "[planner]\nmin_warm = 8\nmax_warm = 4",
            "planner.min_warm = 8: must not exceed planner.max_warm (4)",
        ),
        (
            "[planner]\nmax_changes_per_round = 0",
            "planner.max_changes_per_round = 0: must be in 1..=100000",
        ),
        (
            "[planner]\nwebhook_min_interval_s = -5",
            "planner.webhook_min_interval_s = -5.0: must be in 0..=86400",
        ),
    ];
    for (toml, expected) in table {
        let err = broker_from(toml).expect_err(toml);
        assert!(matches!(err, ConfigError::Invalid(_)), "{toml}: {err}");
        assert_eq!(
            lines(&err).first().map(String::as_str),
            Some(*expected),
            "{toml}"
        );
    }
}

#[test]
fn every_broken_rule_is_reported_at_once() {
    let err = broker_from(
        "[tiers.4k]\nframebuffer_mb = 8100\ncompute_share = 20\n[http]\nmax_body_bytes = 1",
    )
    .unwrap_err();
    assert_eq!(
        lines(&err),
        [
            "http.max_body_bytes = 1: must be in 1024..=16777216",
            "tiers.4k.framebuffer_mb = 8100: must be a multiple of 64",
            "tiers.4k.compute_share = 20: must be in 1..=16",
        ]
    );
}

/// Values that do not fit the schema at all, one per row.
#[test]
fn schema_errors_name_the_field() {
    let table: &[(&str, &str, &str)] = &[
        (
            "[http]\nlisten = \"not an address\"",
            "http.listen",
            "invalid socket address",
        ),
        (
            "[http]\nlisten_on = \"127.0.0.1:1\"",
            "http.listen_on",
            "unknown field: found `listen_on`",
        ),
        ("regoin = \"eu\"", "regoin", "unknown field: found `regoin`"),
        (
            "region = \"EU West\"",
            "region",
            "region name may only hold",
        ),
        (
            "[tiers.720p]\nfps = \"sixty\"",
            "tiers.720p.fps",
            "invalid type",
        ),
        (
            "[tiers.1440p]\nwidth = 2560",
            "tiers.1440p",
            "missing field `height`",
        ),
        (
            "[tiers.720p]\ncodecs = [\"vp8\"]",
            "tiers.720p.codecs.0",
            "unknown variant: found `vp8`",
        ),
        (
            "[genres.fps]\nstrategy = \"scatter\"",
            "genres.fps.strategy",
            "unknown variant",
        ),
        (
            "[planner]\nwebhook_url = \"https://scaler/hook\"",
            "planner.webhook_url",
            "https is not supported",
        ),
        (
            "[planner]\nwebhook_url = \"scaler:8080\"",
            "planner.webhook_url",
            "must start with http://",
        ),
        (
            "[planner]\nround_every = 10",
            "planner.round_every",
            "unknown field: found `round_every`",
        ),
    ];
    for (toml, field, message) in table {
        let err = broker_from(toml).expect_err(toml);
        let ConfigError::Parse(errors) = &err else {
            panic!("{toml}: {err}")
        };
        let first = &errors[0];
        assert_eq!(first.field, *field, "{toml}: {err}");
        assert!(first.message.contains(message), "{toml}: {}", first.message);
        assert!(
            first.source.as_deref().unwrap_or("").contains("TOML file"),
            "{toml}: {err}"
        );
    }
}

#[test]
fn malformed_toml_is_a_parse_error() {
    let err = broker_from("[http\nlisten = 1").unwrap_err();
    assert!(matches!(err, ConfigError::Parse(_)), "{err}");
}

#[test]
fn missing_file_is_named() {
    let path = Path::new("/nonexistent/broker.toml");
    let err = load::<BrokerConfig>(&sources(Some(path), &[], &[])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "config file /nonexistent/broker.toml: not found"
    );
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "broker.toml",
        "region = \"from-file\"\n[http]\nlisten = \"127.0.0.1:1000\"\n",
    );
    let env = [
        ("FRAMECAST_REGION", "from-env"),
        ("FRAMECAST_HTTP__LISTEN", "127.0.0.1:2000"),
        ("FRAMECAST_TIERS__4K__FRAMEBUFFER_MB", "12288"),
        ("FRAMECAST_CONFIG", "ignored.toml"),
        ("FRAMECAST_LOG", "debug"),
        ("OTHER_VAR", "ignored"),
    ];
    let cfg: BrokerConfig = load(&sources(Some(&path), &env, &[])).unwrap();
    assert_eq!(cfg.region.as_str(), "from-env");
    assert_eq!(cfg.http.listen.port(), 2000);
    assert_eq!(
        cfg.tiers[&TierName::new("4k").unwrap()].framebuffer_mb,
        12288
    );
    // Fields the file and env left alone keep their defaults.
    assert_eq!(cfg.tiers[&TierName::new("4k").unwrap()].compute_share, 4);

    let flags = [("http.listen", "127.0.0.1:3000")];
    let cfg: BrokerConfig = load(&sources(Some(&path), &env, &flags)).unwrap();
    assert_eq!(cfg.http.listen.port(), 3000);
    assert_eq!(cfg.region.as_str(), "from-env");
}

#[test]
fn errors_name_the_env_var_or_flag_that_set_the_value() {
    let err = load::<BrokerConfig>(&sources(
        None,
        &[("FRAMECAST_TIERS__4K__FRAMEBUFFER_MB", "8100")],
        &[],
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tiers.4k.framebuffer_mb = 8100: must be a multiple of 64 \
         (from environment variable FRAMECAST_TIERS__4K__FRAMEBUFFER_MB)"
    );
    let err = load::<BrokerConfig>(&sources(None, &[], &[("tiers.4k.framebuffer_mb", "8100")]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tiers.4k.framebuffer_mb = 8100: must be a multiple of 64 (from flag --set tiers.4k.framebuffer_mb)"
    );
    let err = load::<BrokerConfig>(&sources(
        None,
        &[("FRAMECAST_HTTP__LISTEN", "nowhere")],
        &[],
    ))
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("http.listen: invalid socket address"),
        "{text}"
    );
    assert!(text.contains("FRAMECAST_HTTP__LISTEN"), "{text}");
    let err = load::<BrokerConfig>(&sources(None, &[("FRAMECAST_NO_SUCH", "1")], &[])).unwrap_err();
    assert!(
        err.to_string().contains("unknown field: found `no_such`"),
        "{err}"
    );
}

#[test]
fn agent_rule_table() {
    let table: &[(&str, &str)] = &[
        (
            "[broker]\naddress = \"broker\"",
            "broker.address = \"broker\": must be host:port",
        ),
        (
            "[broker]\naddress = \"broker:0\"",
            "broker.address = \"broker:0\": must be host:port",
        ),
        (
            "[inventory]\nsource = \"simulated\"",
            "inventory.simulate = \"\": must name a simulated inventory file when inventory.source = \"simulated\"",
        ),
        (
            "[inventory]\nsimulate = \"/nonexistent/gpus.toml\"",
            "inventory.simulate = \"/nonexistent/gpus.toml\": file not found",
        ),
        (
            "[vgpu]\nsysfs_root = \"sys\"",
            "vgpu.sysfs_root = \"sys\": must be an absolute path",
        ),
        (
            "[whep]\npublic_url = \"example.com\"",
            "whep.public_url = \"example.com\": must start with http:// or https://",
        ),
        (
            "[[games]]\nid = \"a\"\n[[games]]\nid = \"a\"",
            "games.1.id = \"a\": must be unique among games",
        ),
        (
            "[[games]]\nid = \"a\"\ncommand = \"game.sh\"",
            "games.0.command = \"game.sh\": must be an absolute path",
        ),
        (
            "[[games]]\nid = \"a\"\nenv = { FRAMECAST_GPU = \"0\" }",
            "games.0.env = \"FRAMECAST_GPU\": names must be non-empty, hold no '=', and not start with FRAMECAST_ (the agent sets those)",
        ),
    ];
    for (toml, expected) in table {
        let err = agent_from(toml).expect_err(toml);
        assert_eq!(
            lines(&err).first().map(String::as_str),
            Some(*expected),
            "{toml}"
        );
    }
}

#[test]
fn agent_accepts_a_simulated_inventory_file() {
    let dir = tempfile::tempdir().unwrap();
    let gpus = write(dir.path(), "gpus.toml", "");
    let toml = format!(
        "node_id = \"gpu-host-1\"\n[inventory]\nsource = \"simulated\"\nsimulate = {:?}\n",
        gpus
    );
    let cfg = agent_from(&toml).unwrap();
    assert_eq!(cfg.inventory.source, InventorySource::Simulated);
    assert_eq!(cfg.node_id.unwrap().as_str(), "gpu-host-1");
}

#[test]
fn the_example_configs_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
    let broker: BrokerConfig = load(&sources(Some(&root.join("broker.toml")), &[], &[])).unwrap();
    assert!(!broker.games.is_empty() && !broker.tenants.is_empty());
    let agent: AgentConfig = load(&sources(Some(&root.join("agent.toml")), &[], &[])).unwrap();
    assert!(!agent.games.is_empty());
}

#[test]
fn a_planner_section_with_a_webhook_loads_and_prints_back() {
    let cfg = broker_from(
        "[planner]\nround_every_s = 0.5\nmax_warm = 8\nwebhook_url = \"http://scaler:9000/hook\"",
    )
    .unwrap();
    assert_eq!(
        cfg.planner.round_every(),
        std::time::Duration::from_millis(500)
    );
    assert_eq!(cfg.planner.max_warm, 8);
    let url = cfg.planner.webhook_url.clone().unwrap();
    assert_eq!(
        (url.host(), url.port(), url.path()),
        ("scaler", 9000, "/hook")
    );
    assert_eq!(broker_from(&to_toml(&cfg).unwrap()).unwrap(), cfg);
    // Set from the environment like any other field.
    let env = load::<BrokerConfig>(&sources(
        None,
        &[("FRAMECAST_PLANNER__ENABLED", "false")],
        &[],
    ))
    .unwrap();
    assert!(!env.planner.enabled);
}

#[test]
fn the_effective_config_prints_as_toml_that_loads_back() {
    let cfg = BrokerConfig::default();
    let text = to_toml(&cfg).unwrap();
    let back = broker_from(&text).unwrap();
    assert_eq!(back, cfg);
    let agent = AgentConfig::default();
    assert_eq!(agent_from(&to_toml(&agent).unwrap()).unwrap(), agent);
}

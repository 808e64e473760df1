//! The alert rules (`deploy/prometheus/rules/`) and the Grafana dashboard (`deploy/grafana/`)
//! cannot rot: every `framecast_*` series they name must be one a running deployment exports,
//! with the labels they select on.
//!
//! Dev mode runs a broker and an agent on simulated GPUs in one process; the test drives it
//! until the metrics exist (an allocation that starts its game cold, one that takes a warm
//! instance, a release, an expired reservation, a failed post to the autoscaler's webhook, and
//! a WebRTC stream the player page plays in headless Chromium), then scrapes the broker's and the agent's `/metrics`. Without Chromium
//! the stream's series cannot appear: outside CI the test then checks the `framecast_stream_*`
//! names against the agent's list of exported names and says so, loudly; under CI (`CI` set)
//! a missing browser fails it, as in `browser.rs`.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr
)]

mod chromium;
mod http;
mod tuning;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use framecast_broker::dev::{Dev, DevOptions, Tune, start_dev};
use framecast_shared::config::planner::WebhookUrl;
use framecast_shared::ids::NodeId;
use framecast_shared::state::EndReason;

use http::{request, wait_for};
use tuning::fast_planner;

const KEY: &str = "dev-key";
const NODE: &str = "dev-node-1";
/// Ample for the player page to connect its session (well under a second on loopback), short
/// enough that the test need not wait long for an unused one to expire.
const RESERVATION_TTL_S: u32 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_use_is_exported() {
    let references = references();
    assert!(
        references.names.len() >= 10,
        "the rules and the dashboard name only {} metrics; is the parser broken? {:?}",
        references.names.len(),
        references.names.keys()
    );
    let browser = chromium::find();
    if browser.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must play a stream to check the framecast_stream_* metrics: install chromium \
             (.ci/run does)"
        );
        eprintln!(
            "PARTLY SKIPPED every_metric_the_rules_and_the_dashboard_use_is_exported: no chromium \
             on the PATH, so no stream runs and the framecast_stream_* names are checked against \
             framecast_agent::metrics::NAMES instead of a scrape (apt-get install chromium, or \
             set FRAMECAST_CHROMIUM)"
        );
    }

    let deployment = Deployment::start().await;
    let addr = deployment.dev.broker().http;
    drive(addr, browser.as_deref()).await;
    // The agent's scrape runs its hook, which sets its gauges; the broker's renders the same
    // process-wide recorder with the broker's gauges set too.
    let agent = scrape(deployment.agent_http).await;
    let broker = scrape(addr).await;
    let exported = Exposition::parse(&format!("{agent}\n{broker}"));
    deployment.stop().await;

    let problems = check(&references, &exported, browser.is_some());
    assert!(
        problems.is_empty(),
        "the rules or the dashboard name what the services do not export:\n  {}\n\nexported \
         series: {:?}",
        problems.join("\n  "),
        exported.series.keys().collect::<Vec<_>>()
    );
}

/// The check reports a misspelt name, an unknown label or label value and an undefined
/// recording rule: the test above can fail.
#[test]
fn a_misspelt_name_an_unknown_label_and_an_undefined_recording_rule_are_reported() {
    let exported = Exposition::parse(
        "# TYPE framecast_broker_queue_depth gauge\n\
         framecast_broker_queue_depth{tier=\"720p\"} 0\n\
         # TYPE framecast_broker_allocation_duration_seconds histogram\n\
         framecast_broker_allocation_duration_seconds_bucket{le=\"0.5\"} 1\n\
         framecast_broker_allocation_duration_seconds_count 1\n",
    );
    let mut refs = References::default();
    let at = Path::new("rules.yml");
    refs.promql(
        at,
        "sum by (tier) (framecast_broker_queue_depht{tier=\"720p\"}) \
         + histogram_quantile(0.99, rate(framecast_broker_allocation_duration_seconds_bucket[5m])) \
         + framecast_broker_queue_depth{pool=\"720p\"} + framecast_broker_queue_depth{tier=\"8k\"} \
         + job:framecast_nothing:rate5m + framecast_broker_allocation_duration_seconds",
    );
    let problems = check(&refs, &exported, true);
    let text = problems.join("\n");
    for expected in [
        "framecast_broker_queue_depht is not exported",
        "framecast_broker_queue_depth has no label pool",
        "framecast_broker_queue_depth{tier=\"8k\"}",
        "job:framecast_nothing:rate5m is not recorded",
        // A histogram's own name is no series: PromQL needs _bucket, _sum or _count.
        "framecast_broker_allocation_duration_seconds is not exported",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    assert_eq!(problems.len(), 5, "{text}");
    // Prose may name a histogram by its own name.
    let mut prose = References::default();
    prose.prose(
        at,
        "see framecast_broker_allocation_duration_seconds and framecast_",
    );
    assert!(check(&prose, &exported, true).is_empty());
}

/// Rule files give expressions on one line, plain or quoted, or as indented blocks.
#[test]
fn expressions_are_read_from_yaml_lines_and_blocks() {
    let yaml = r#"groups:
  - name: g
    rules:
      - record: job:a:rate5m
        expr: sum(rate(framecast_a_total[5m]))
      - alert: B
        expr: |
          framecast_b
          > 1

          and framecast_c == 0
        for: 1m
      - alert: C
        expr: "framecast_d{x=\"y\"} > 0"
      - alert: D
        expr: 'framecast_e{x=''y''} > 0'
"#;
    assert_eq!(
        yaml_values(yaml, "expr"),
        [
            "sum(rate(framecast_a_total[5m]))",
            "          framecast_b\n          > 1\n\n          and framecast_c == 0\n",
            r#"framecast_d{x="y"} > 0"#,
            "framecast_e{x='y'} > 0",
        ]
    );
    assert_eq!(yaml_values(yaml, "record"), ["job:a:rate5m"]);
    let mut refs = References::default();
    refs.promql(
        Path::new("d.json"),
        r#"label_values(framecast_f{a=~"$x"}, tier)"#,
    );
    assert_eq!(
        refs.labels,
        [(PathBuf::from("d.json"), "framecast_f".into(), "tier".into())]
    );
    assert!(refs.names.contains_key("framecast_f"));
}

// ---- the deployment --------------------------------------------------------------------

/// Dev mode with one node whose agent is restarted with `/metrics` on a known port (dev mode's
/// agents bind theirs on a port nobody is told).
struct Deployment {
    dev: Dev,
    agent_http: SocketAddr,
}

impl Deployment {
    async fn start() -> Self {
        let webhook = refusing_webhook().await;
        let mut dev = start_dev(DevOptions {
            nodes: 1,
            gpus_toml: "[[gpus]]\nmodel = \"l4\"\ncount = 2\n".into(),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: None,
            api_key: KEY.into(),
            tune: Some(Tune::new(move |c| {
                // A planner that plans at once, so that warm instances appear within the test.
                fast_planner(c);
                c.timers.reservation_ttl_s = RESERVATION_TTL_S;
                // Every post fails, so that the failures are counted.
                c.planner.webhook_url = Some(webhook.clone());
                c.planner.webhook_min_interval_s = 0.2;
            })),
        })
        .await
        .unwrap();
        let addr = dev.broker().http;
        connected(addr).await;

        // The same node again, with /metrics on a known port.
        let node = NodeId::new(NODE).unwrap();
        let agent_http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        assert!(
            dev.restart_agent_with(&node, |c| c.http.listen = agent_http)
                .await
        );
        // Ready: this agent's control link is up (the broker may still list the old one's).
        wait_for("the agent is ready", || async move {
            tokio::net::TcpStream::connect(agent_http).await.ok()?;
            (request(agent_http, "GET", "/readyz", &[], b"").await.status == 200).then_some(())
        })
        .await;
        connected(addr).await;
        Self { dev, agent_http }
    }

    async fn stop(self) {
        self.dev.stop().await;
    }
}

/// An autoscaler's webhook that answers every post 500.
async fn refusing_webhook() -> WebhookUrl {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
        }
    });
    WebhookUrl::parse(&url).unwrap()
}

/// Makes the events after which the counters and histograms exist.
async fn drive(addr: SocketAddr, browser: Option<&Path>) {
    // A game's first request launches it cold, unless a planner round counted the request
    // and its plan reached the agent, which started a warm instance, before the reservation
    // did (a warm hit); then the next game's first request is the cold start.
    let mut first = None;
    for game in ["arena-shooter", "lane-battle", "open-world"] {
        let session = allocate(addr, game, "p-cold").await;
        first.get_or_insert(session);
        if scrape(addr)
            .await
            .contains(framecast_broker::metrics::POOL_COLD_STARTS)
        {
            break;
        }
    }
    let cold = first.unwrap();
    // The planner keeps an arena-shooter instance warm for the demand; the next player takes
    // it.
    wait_for("a warm arena-shooter instance", || async move {
        let pools = get(addr, "/v1/pools").await;
        pools.as_array()?.iter().find(|p| p["tier"] == "720p")?["targets"]
            .as_array()?
            .iter()
            .any(|t| t["game"] == "arena-shooter" && t["observed_warm"].as_u64() >= Some(1))
            .then_some(())
    })
    .await;
    let warm = allocate(addr, "arena-shooter", "p-warm").await;
    assert_eq!(warm["state"], "reserved", "{warm}");
    let released = request(
        addr,
        "DELETE",
        &format!("/v1/sessions/{}", cold["session_id"].as_str().unwrap()),
        &[("authorization", &format!("Bearer {KEY}"))],
        b"",
    )
    .await;
    assert_eq!(released.status, 204, "{}", released.body);

    if let Some(browser) = browser {
        let sink = chromium::ReportSink::bind().await;
        let url = chromium::page_url(addr, "arena-shooter", "720p", "fps", 3, 3, &sink.url());
        let _browser = chromium::Browser::open(browser, &url);
        let report = sink.next(Duration::from_secs(90)).await;
        assert_eq!(report["ok"], true, "the page failed: {report}");
    }

    wait_for("a failed webhook post is counted", || async move {
        scrape(addr)
            .await
            .contains(framecast_broker::metrics::FLEET_WEBHOOK_FAILURES)
            .then_some(())
    })
    .await;

    // The warm player never connects: the reservation expires.
    let id = warm["session_id"].as_str().unwrap().to_owned();
    wait_for("the unused reservation expires", || {
        let id = id.clone();
        async move {
            let s = get(addr, &format!("/v1/sessions/{id}")).await;
            (s["end_reason"] == "expired").then_some(())
        }
    })
    .await;
}

async fn allocate(addr: SocketAddr, game: &str, player: &str) -> serde_json::Value {
    let body = format!(r#"{{"game":"{game}","tier":"720p","player_id":"{player}"}}"#);
    let r = request(
        addr,
        "POST",
        "/v1/sessions",
        &[
            ("authorization", &format!("Bearer {KEY}")),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

async fn get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let r = request(
        addr,
        "GET",
        path,
        &[("authorization", &format!("Bearer {KEY}"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    r.json()
}

async fn scrape(addr: SocketAddr) -> String {
    let r = request(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200, "GET http://{addr}/metrics: {}", r.body);
    r.body
}

/// Waits until the broker's only node is connected.
async fn connected(addr: SocketAddr) {
    wait_for("the agent connects", || async move {
        let nodes = get(addr, "/v1/nodes").await;
        let list = nodes.as_array()?;
        (list.len() == 1 && list[0]["connected"] == true).then_some(())
    })
    .await;
}

/// A loopback port nothing listens on now (another process could take it before the agent
/// binds it; good enough for a test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---- what the files name ---------------------------------------------------------------

/// One use of a series in a PromQL expression: where, and the label matchers on it.
#[derive(Debug, Clone)]
struct Use {
    at: PathBuf,
    /// Label, operator, value.
    matchers: Vec<(String, String, String)>,
}

/// What the rules and the dashboard name.
#[derive(Debug, Default)]
struct References {
    /// `framecast_*` series in PromQL, with each use.
    names: BTreeMap<String, Vec<Use>>,
    /// `label_values(metric, label)` in the dashboard's variables: the label must exist.
    labels: Vec<(PathBuf, String, String)>,
    /// Recording-rule names (`level:metric:operation`) used in PromQL.
    recorded_uses: Vec<(PathBuf, String)>,
    /// Recording rules the rule files define.
    recorded: BTreeSet<String>,
    /// `framecast_*` names in comments, annotations, titles: each must be a metric family or a
    /// series.
    mentions: Vec<(PathBuf, String)>,
}

/// The repository's root (the broker crate's parent).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every name the rule files (not their tests) and the dashboards use.
fn references() -> References {
    let mut refs = References::default();
    let root = root();
    let rules = files(&root.join("deploy/prometheus/rules"), ".yml");
    let rules: Vec<PathBuf> = rules
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".test.yml"))
        .collect();
    assert!(
        !rules.is_empty(),
        "no rule files under deploy/prometheus/rules"
    );
    for path in &rules {
        let text = std::fs::read_to_string(path).unwrap();
        let at = path.strip_prefix(&root).unwrap();
        for expr in yaml_values(&text, "expr") {
            refs.promql(at, &expr);
        }
        for name in yaml_values(&text, "record") {
            refs.recorded.insert(name);
        }
        refs.prose(at, &text);
    }
    let dashboards = files(&root.join("deploy/grafana"), ".json");
    assert!(!dashboards.is_empty(), "no dashboards under deploy/grafana");
    for path in &dashboards {
        let text = std::fs::read_to_string(path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        let at = path.strip_prefix(&root).unwrap();
        refs.json(at, &json, None);
    }
    refs
}

fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

/// The values of `key:` in a YAML document: plain or quoted on the key's line, or a `|`/`>`
/// block on the lines indented below it. Enough for rule files; not a YAML parser.
fn yaml_values(text: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let body = line.trim_start();
        let body = body.strip_prefix("- ").unwrap_or(body).trim_start();
        let Some(rest) = body.strip_prefix(key).and_then(|r| r.strip_prefix(':')) else {
            continue;
        };
        if body.starts_with('#') {
            continue;
        }
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let mut block = String::new();
            while i < lines.len() {
                let l = lines[i];
                let blank = l.trim().is_empty();
                if !blank && l.len() - l.trim_start().len() <= indent {
                    break;
                }
                block.push_str(l);
                block.push('\n');
                i += 1;
            }
            out.push(block);
        } else {
            let value = if let Some(q) = rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                q.replace("\\\"", "\"").replace("\\\\", "\\")
            } else if let Some(q) = rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
                q.replace("''", "'")
            } else {
                rest.to_owned()
            };
            out.push(value);
        }
    }
    out
}

impl References {
    /// Walks a dashboard: `expr` strings and the variables' queries are PromQL; every other
    /// string is prose.
    fn json(&mut self, at: &Path, v: &serde_json::Value, key: Option<&str>) {
        match v {
            serde_json::Value::String(s) => match key {
                Some("expr" | "query" | "definition") => self.promql(at, s),
                _ => self.prose(at, s),
            },
            serde_json::Value::Array(items) => {
                for item in items {
                    self.json(at, item, key);
                }
            }
            serde_json::Value::Object(map) => {
                for (k, item) in map {
                    self.json(at, item, Some(k));
                }
            }
            _ => {}
        }
    }

    /// Records the series, matchers and recording rules one PromQL expression uses.
    fn promql(&mut self, at: &Path, expr: &str) {
        let tokens = lex(expr);
        let mut i = 0;
        while i < tokens.len() {
            let Token::Ident(ident) = &tokens[i] else {
                i += 1;
                continue;
            };
            i += 1;
            if ident == "label_values" && tokens.get(i) == Some(&Token::Punct('(')) {
                // label_values(metric{...}, label): the metric is read below; the label after
                // the comma must be one of its labels.
                if let (Some(Token::Ident(metric)), Some(close)) = (
                    tokens.get(i + 1),
                    tokens[i..].iter().position(|t| *t == Token::Punct(')')),
                ) {
                    let args = &tokens[i..i + close];
                    if let Some(Token::Ident(label)) = args.last()
                        && args.len() > 2
                        && args[args.len() - 2] == Token::Punct(',')
                    {
                        self.labels
                            .push((at.to_owned(), metric.clone(), label.clone()));
                    }
                }
                continue;
            }
            if ident.contains(':') {
                self.recorded_uses.push((at.to_owned(), ident.clone()));
                continue;
            }
            if !is_framecast(ident) {
                continue;
            }
            let mut matchers = Vec::new();
            if tokens.get(i) == Some(&Token::Punct('{')) {
                i += 1;
                while let Some(t) = tokens.get(i) {
                    match (t, tokens.get(i + 1), tokens.get(i + 2)) {
                        (Token::Punct('}'), _, _) => {
                            i += 1;
                            break;
                        }
                        (Token::Ident(label), Some(Token::Op(op)), Some(Token::Str(value))) => {
                            matchers.push((label.clone(), op.clone(), value.clone()));
                            i += 3;
                        }
                        _ => i += 1,
                    }
                }
            }
            self.names.entry(ident.clone()).or_default().push(Use {
                at: at.to_owned(),
                matchers,
            });
        }
    }

    /// Records the `framecast_*` words of free text (comments, annotations, titles).
    fn prose(&mut self, at: &Path, text: &str) {
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            // `framecast_stream_*`: a family of names, not one.
            if word.ends_with('_') {
                continue;
            }
            if word.contains(':') {
                if word.split(':').any(is_framecast) {
                    self.recorded_uses.push((at.to_owned(), word.to_owned()));
                }
            } else if is_framecast(word) {
                self.mentions.push((at.to_owned(), word.to_owned()));
            }
        }
    }
}

/// A Framecast metric name, not the bare prefix (`framecast_*` in a comment).
fn is_framecast(word: &str) -> bool {
    word.len() > "framecast_".len() && word.starts_with("framecast_")
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Op(String),
    Punct(char),
}

/// Splits PromQL into identifiers (metric and label names, keywords, functions), strings,
/// matcher operators and punctuation; numbers, durations, comments and Grafana variables
/// (`$__rate_interval`, `${region}`) are dropped.
fn lex(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' && i + 1 < chars.len() {
                    i += 1;
                }
                s.push(chars[i]);
                i += 1;
            }
            i += 1;
            out.push(Token::Str(s));
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (5m, 1h30m, 1e3).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '=' || c == '!' {
            let op = match (c, chars.get(i + 1)) {
                ('=', Some('~')) | ('!', Some('~')) | ('!', Some('=')) | ('=', Some('=')) => {
                    i += 2;
                    format!("{c}{}", chars[i - 1])
                }
                _ => {
                    i += 1;
                    c.to_string()
                }
            };
            out.push(Token::Op(op));
        } else {
            if !c.is_whitespace() {
                out.push(Token::Punct(c));
            }
            i += 1;
        }
    }
    out
}

// ---- what the services export ----------------------------------------------------------

/// A scrape, as names: each series name with its labels and their values, and each metric
/// family (`# TYPE`), so a histogram is known by its own name and its `_bucket`, `_sum` and
/// `_count` series.
#[derive(Debug, Default)]
struct Exposition {
    series: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    families: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.split_whitespace().next() {
                    out.families.insert(name.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line
                .find(|c: char| c == '{' || c.is_whitespace())
                .unwrap_or(line.len());
            let labels = out.series.entry(line[..end].to_owned()).or_default();
            if line[end..].starts_with('{') {
                let close = line.rfind('}').unwrap_or(line.len());
                let tokens = lex(&line[end + 1..close]);
                for t in tokens.windows(3) {
                    if let [Token::Ident(k), Token::Op(_), Token::Str(v)] = t {
                        labels.entry(k.clone()).or_default().insert(v.clone());
                    }
                }
            }
        }
        out
    }
}

/// Labels Prometheus adds to every series of a job: `job` and `instance`, and for the agents
/// the `node` and `region` target labels of `deploy/prometheus/prometheus.yml`.
fn target_labels(metric: &str) -> &'static [&'static str] {
    if metric.starts_with("framecast_agent_") || metric.starts_with("framecast_stream_") {
        &["job", "instance", "node", "region"]
    } else {
        &["job", "instance"]
    }
}

/// What the references ask that the exposition lacks, one line each. `streamed`: whether a
/// stream ran, so that the stream's series must be in the scrape.
fn check(refs: &References, exported: &Exposition, streamed: bool) -> Vec<String> {
    let mut problems = BTreeSet::new();
    let agent_names: BTreeSet<&str> = framecast_agent::metrics::NAMES.into_iter().collect();
    for (name, uses) in &refs.names {
        let Some(labels) = exported.series.get(name) else {
            let known_unstreamed = !streamed
                && name.starts_with("framecast_stream_")
                && [name.as_str()]
                    .into_iter()
                    .chain(
                        ["_bucket", "_sum", "_count"]
                            .iter()
                            .filter_map(|s| name.strip_suffix(s)),
                    )
                    .any(|n| agent_names.contains(n));
            if !known_unstreamed {
                for u in uses {
                    problems.insert(format!("{}: {name} is not exported", u.at.display()));
                }
            }
            continue;
        };
        for u in uses {
            for (label, op, value) in &u.matchers {
                if target_labels(name).contains(&label.as_str()) {
                    continue;
                }
                let Some(values) = labels.get(label) else {
                    problems.insert(format!("{}: {name} has no label {label}", u.at.display()));
                    continue;
                };
                // An exact value must be one the series take; end reasons are a closed set
                // that a short run cannot all show.
                if op != "=" || value.contains('$') {
                    continue;
                }
                let known = if label == "reason" {
                    EndReason::ALL.iter().any(|r| r.to_string() == *value)
                } else {
                    values.contains(value)
                };
                if !known {
                    problems.insert(format!(
                        "{}: {name}{{{label}=\"{value}\"}} matches no series (seen: {values:?})",
                        u.at.display()
                    ));
                }
            }
        }
    }
    for (at, metric, label) in &refs.labels {
        let has = exported
            .series
            .get(metric)
            .is_some_and(|l| l.contains_key(label))
            || target_labels(metric).contains(&label.as_str());
        if exported.series.contains_key(metric) && !has {
            problems.insert(format!("{}: {metric} has no label {label}", at.display()));
        }
    }
    for (at, name) in &refs.recorded_uses {
        if !refs.recorded.contains(name) {
            problems.insert(format!(
                "{}: {name} is not recorded by any rule",
                at.display()
            ));
        }
    }
    for (at, name) in &refs.mentions {
        let known = exported.series.contains_key(name)
            || exported.families.contains(name)
            || (!streamed
                && name.starts_with("framecast_stream_")
                && agent_names.contains(name.as_str()));
        if !known {
            problems.insert(format!("{}: {name} is not exported", at.display()));
        }
    }
    problems.into_iter().collect()
}

//! The pool planner in the running broker, end to end: a real broker and in-process agents on
//! simulated GPUs over real HTTP and QUIC on loopback. The planner runs every 200 ms here; the
//! waits are bounded by [`LIMIT`] and only poll, and no test asserts on timing.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod http;
mod tuning;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;

use framecast_broker::dev::{Dev, DevOptions, Tune, start_dev};
use framecast_shared::config::planner::WebhookUrl;

use http::{Response, request, wait_for};
use tuning::fast_planner;

const LIMIT: Duration = Duration::from_secs(30);
const KEY: &str = "dev-key";

async fn dev_with(nodes: usize, gpus: u32, tune: Tune) -> Dev {
    let dev = start_dev(DevOptions {
        nodes,
        gpus_toml: format!("[[gpus]]\nmodel = \"l4\"\ncount = {gpus}\n"),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: None,
        api_key: KEY.into(),
        tune: Some(tune),
    })
    .await
    .unwrap();
    all_connected(dev.broker().http, nodes).await;
    dev
}

/// Waits until the broker at `addr` lists `nodes` nodes, all connected.
async fn all_connected(addr: SocketAddr, nodes: usize) {
    wait_for("every agent connects", || async move {
        let nodes_now = get(addr, "/v1/nodes").await.json();
        let list = nodes_now.as_array()?;
        (list.len() == nodes && list.iter().all(|n| n["connected"] == true)).then_some(())
    })
    .await;
}

async fn get(addr: SocketAddr, path: &str) -> Response {
    request(
        addr,
        "GET",
        path,
        &[("authorization", &format!("Bearer {KEY}"))],
        b"",
    )
    .await
}

async fn allocate(addr: SocketAddr, game: &str, tier: &str, player: &str) -> serde_json::Value {
    let body = format!(r#"{{"game":"{game}","tier":"{tier}","player_id":"{player}"}}"#);
    let auth = format!("Bearer {KEY}");
    let r = request(
        addr,
        "POST",
        "/v1/sessions",
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()
}

/// The target of `game` at `tier` in a list of targets.
fn target<'a>(
    targets: &'a serde_json::Value,
    game: &str,
    tier: &str,
) -> Option<&'a serde_json::Value> {
    targets
        .as_array()?
        .iter()
        .find(|t| t["game"] == game && t["tier"] == tier)
}

/// Every node the planner planned has reported its newest plan back; the plan generation.
fn all_planned_nodes_report_their_plan(nodes: &serde_json::Value) -> Option<Vec<(String, u64)>> {
    let planned: Vec<(String, u64, u64)> = nodes
        .as_array()?
        .iter()
        .filter_map(|n| {
            Some((
                n["node_id"].as_str()?.to_owned(),
                n["plan_generation_sent"].as_u64()?,
                n["plan_generation"].as_u64()?,
            ))
        })
        .collect();
    let done = !planned.is_empty() && planned.iter().all(|(_, sent, got)| got == sent);
    done.then(|| planned.into_iter().map(|(n, sent, _)| (n, sent)).collect())
}

#[tokio::test]
async fn agents_build_the_plan_for_new_demand_and_report_it_back() {
    let dev = dev_with(2, 2, Tune::new(fast_planner)).await;
    let addr = dev.broker().http;
    for i in 0..3 {
        allocate(addr, "arena-shooter", "720p", &format!("p{i}")).await;
    }

    // The planner sees the demand and wants warm arena-shooter instances at 720p.
    let plan = wait_for(
        "the plan wants warm arena-shooter instances",
        || async move {
            let plan = get(addr, "/v1/pools/plan").await.json();
            let t = target(&plan["targets"], "arena-shooter", "720p")?;
            (t["desired_warm"].as_u64()? >= 1 && t["forecast_rate"].as_f64()? > 0.0).then_some(plan)
        },
    )
    .await;
    assert_eq!(plan["enabled"], true);
    assert!(plan["counters"]["rounds"].as_u64().unwrap() >= 1, "{plan}");
    assert!(!plan["profiles"].as_array().unwrap().is_empty(), "{plan}");

    // The agents receive their nodes' plans, apply them and say so in their heartbeats.
    let reported = wait_for("every planned node reports its plan", || async move {
        all_planned_nodes_report_their_plan(&get(addr, "/v1/nodes").await.json())
    })
    .await;
    assert!(reported.iter().all(|(_, g)| *g > 0), "{reported:?}");

    // What they built: vGPUs of the planned profile, and warm instances the engine counts.
    let pool = wait_for(
        "the agents report warm arena-shooter instances",
        || async move {
            let pools = get(addr, "/v1/pools").await.json();
            let pool = pools
                .as_array()?
                .iter()
                .find(|p| p["tier"] == "720p")?
                .clone();
            let t = target(&pool["targets"], "arena-shooter", "720p")?;
            (t["observed_warm"].as_u64()? >= 1 && pool["warm"].as_u64()? >= 1).then_some(pool)
        },
    )
    .await;
    assert!(pool["plan_generation"].as_u64().is_some(), "{pool}");
    let t = target(&pool["targets"], "arena-shooter", "720p").unwrap();
    assert!(t["desired_warm"].as_u64().unwrap() >= 1, "{pool}");
    let profiles = pool["profiles"].as_array().unwrap();
    assert!(
        profiles
            .iter()
            .any(|p| p["gpus_planned"].as_u64().unwrap() >= 1
                && p["gpus_observed"].as_u64().unwrap() >= 1),
        "{pool}"
    );

    // A new player of that game takes a warm instance.
    allocate(addr, "arena-shooter", "720p", "warm-player").await;
    let metrics = wait_for("the warm hit is counted", || async move {
        let m = request(addr, "GET", "/metrics", &[], b"").await.body;
        m.contains(framecast_broker::metrics::POOL_WARM_HITS)
            .then_some(m)
    })
    .await;
    // The metrics are the process's (other tests add to them); the plan's counters are this
    // broker's own: three cold starts before any plan, then the warm hit.
    let plan = get(addr, "/v1/pools/plan").await.json();
    assert_eq!(plan["counters"]["warm_hits"], 1, "{plan}");
    assert_eq!(plan["counters"]["cold_starts"], 3, "{plan}");
    // The targets show it from the next round on.
    let t = wait_for("a round counts the warm hit", || async move {
        let plan = get(addr, "/v1/pools/plan").await.json();
        let t = target(&plan["targets"], "arena-shooter", "720p")?.clone();
        (t["warm_hits"] == 1).then_some(t)
    })
    .await;
    assert_eq!(t["cold_starts"], 3, "{t}");
    for labelled in [
        framecast_broker::metrics::POOL_WARM_HITS,
        framecast_broker::metrics::POOL_COLD_STARTS,
    ] {
        let series = format!("{labelled}{{region=\"local\",tier=\"720p\",game=\"arena-shooter\"}}");
        assert!(metrics.contains(&series), "{series} missing: {metrics}");
    }
    for name in framecast_broker::metrics::POOL_NAMES {
        if name == framecast_broker::metrics::FLEET_WEBHOOK_FAILURES
            || name == framecast_broker::metrics::POOL_REPROFILES
        {
            continue; // no webhook here; re-profiles need a change of profile
        }
        assert!(metrics.contains(name), "{name} missing");
    }
    dev.stop().await;
}

#[tokio::test]
async fn after_a_broker_restart_the_agents_get_newer_plans() {
    let mut dev = dev_with(1, 2, Tune::new(fast_planner)).await;
    let addr = dev.broker().http;
    allocate(addr, "open-world", "1080p", "p1").await;
    let before = wait_for("the node reports its plan", || async move {
        all_planned_nodes_report_their_plan(&get(addr, "/v1/nodes").await.json())
    })
    .await;
    dev.restart_broker().await.unwrap();
    let addr = dev.broker().http;
    all_connected(addr, 1).await;
    allocate(addr, "open-world", "1080p", "p2").await;
    // The agent kept the old broker's generation; the new broker's plans must be newer for
    // it to apply them at all.
    let after = wait_for("the node reports the new broker's plan", || async move {
        all_planned_nodes_report_their_plan(&get(addr, "/v1/nodes").await.json())
    })
    .await;
    assert!(after[0].1 > before[0].1, "{before:?} then {after:?}");
    dev.stop().await;
}

/// An agent that restarts forgets its plan (it starts at generation 0); the broker gets its
/// node's newest plan to it again — with the welcome, and failing that by the resend of a plan
/// the heartbeats do not report (either path passes here) — and the agent builds it again.
#[tokio::test]
async fn a_restarted_agent_gets_its_nodes_plan_again() {
    let mut dev = dev_with(2, 2, Tune::new(fast_planner)).await;
    let addr = dev.broker().http;
    allocate(addr, "lane-battle", "1080p", "p1").await;
    let before = wait_for("every planned node reports its plan", || async move {
        all_planned_nodes_report_their_plan(&get(addr, "/v1/nodes").await.json())
    })
    .await;
    let (node, generation) = before[0].clone();
    assert!(dev.restart_agent(&node.parse().unwrap()).await);
    let node_ref = node.as_str();
    let (sent, got) = wait_for(
        "the restarted agent reports its node's plan",
        || async move {
            let nodes = get(addr, "/v1/nodes").await.json();
            let n = nodes
                .as_array()?
                .iter()
                .find(|n| n["node_id"] == node_ref && n["connected"] == true)?
                .clone();
            let (sent, got) = (
                n["plan_generation_sent"].as_u64()?,
                n["plan_generation"].as_u64()?,
            );
            (got > 0 && got == sent).then_some((sent, got))
        },
    )
    .await;
    assert!(
        sent >= generation && got == sent,
        "{generation} then sent {sent}, got {got}"
    );
    // And it built the plan again: warm instances of the game on the fleet.
    wait_for("warm lane-battle instances again", || async move {
        let pools = get(addr, "/v1/pools").await.json();
        let pool = pools
            .as_array()?
            .iter()
            .find(|p| p["tier"] == "1080p")?
            .clone();
        let t = target(&pool["targets"], "lane-battle", "1080p")?;
        (t["observed_warm"].as_u64()? >= 1).then_some(())
    })
    .await;
    dev.stop().await;
}

#[tokio::test]
async fn a_disabled_planner_sends_no_plan() {
    let dev = dev_with(
        1,
        1,
        Tune::new(|c| {
            fast_planner(c);
            c.planner.enabled = false;
        }),
    )
    .await;
    let addr = dev.broker().http;
    allocate(addr, "arena-shooter", "720p", "p1").await;
    // Five rounds' and ten heartbeats' worth: an enabled planner would have planned by now
    // (the first test shows it does within that).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let plan = get(addr, "/v1/pools/plan").await.json();
    assert_eq!(plan["enabled"], false);
    assert!(plan["plan_generation"].is_null(), "{plan}");
    let nodes = get(addr, "/v1/nodes").await.json();
    assert_eq!(nodes[0]["plan_generation"], 0, "{nodes}");
    assert!(nodes[0]["plan_generation_sent"].is_null(), "{nodes}");
    let pools = get(addr, "/v1/pools").await.json();
    assert!(
        pools
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["plan_generation"].is_null() && p["targets"] == serde_json::json!([])),
        "{pools}"
    );
    dev.stop().await;
}

/// A webhook receiver: answers the first post 500, the rest 204, and hands on every body.
async fn receiver() -> (WebhookUrl, mpsc::UnboundedReceiver<(String, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = WebhookUrl::parse(&format!(
        "http://{}/autoscaler/hook",
        listener.local_addr().unwrap()
    ))
    .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut answered = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            let (head, body) = read_request(&mut s).await;
            let status = if answered == 0 {
                "500 Internal Server Error"
            } else {
                "204 No Content"
            };
            answered += 1;
            let _ = s
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
            let _ = tx.send((head, body));
        }
    });
    (url, rx)
}

/// One request's head and body (by its content-length).
async fn read_request(s: &mut tokio::net::TcpStream) -> (String, String) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the webhook request ended early");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.trim().parse().unwrap());
            if body.len() >= length {
                return (head.to_owned(), body.to_owned());
            }
        }
    }
}

#[tokio::test]
async fn the_fleet_recommendation_reaches_the_webhook_signed_and_failures_are_retried_and_counted()
{
    let (url, mut posts) = receiver().await;
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("webhook.secret");
    let secret = "a shared secret of the autoscaler";
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let dev = dev_with(
        2,
        1,
        Tune::new(move |c| {
            fast_planner(c);
            c.planner.webhook_url = Some(url.clone());
            c.planner.webhook_min_interval_s = 0.2;
            c.planner.webhook_secret_file = Some(secret_file.clone());
        }),
    )
    .await;
    let addr = dev.broker().http;
    allocate(addr, "arena-shooter", "1080p", "p1").await;
    // The first post is answered 500; the retry brings the newest recommendation.
    let (first_head, _) = timeout(LIMIT, posts.recv()).await.unwrap().unwrap();
    assert!(
        first_head.starts_with("POST /autoscaler/hook HTTP/1.1"),
        "{first_head}"
    );
    assert!(
        first_head
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{first_head}"
    );
    let (head, body) = timeout(LIMIT, posts.recv()).await.unwrap().unwrap();
    // Signed as the receiver checks it: HMAC-SHA256 over "<t>." and the body, with the
    // file's secret (its line break left out); a recent t.
    let signature = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case(framecast_broker::service::webhook::SIGNATURE_HEADER))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no signature: {head}"));
    let (t, v1) = signature
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .unwrap_or_else(|| panic!("{signature}"));
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now_s.abs_diff(t.parse().unwrap()) < 60, "{signature}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mac: Vec<u8> = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&v1[i..i + 2], 16).unwrap())
        .collect();
    ring::hmac::verify(&key, format!("{t}.{body}").as_bytes(), &mac)
        .unwrap_or_else(|_| panic!("the signature does not verify: {signature}"));
    let forged = format!("{t}.{body} ");
    assert!(ring::hmac::verify(&key, forged.as_bytes(), &mac).is_err());
    let needs: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lines = needs.as_array().unwrap();
    assert!(!lines.is_empty(), "{body}");
    for l in lines {
        assert_eq!(l["region"], "local", "{body}");
        assert!(l["model"].as_str().unwrap().contains("L4"), "{body}");
        assert!(l["nodes_needed"].is_u64(), "{body}");
        assert_eq!(l["nodes_present"], 2, "{body}");
        assert!(l["generated_at"].as_str().unwrap().ends_with('Z'), "{body}");
    }
    // The same figures as the API and the metrics show.
    let plan = get(addr, "/v1/pools/plan").await.json();
    let rec = &plan["recommendation"][0];
    assert_eq!(rec["nodes_present"], 2, "{plan}");
    let metrics = request(addr, "GET", "/metrics", &[], b"").await.body;
    let failures: f64 = metrics
        .lines()
        .find(|l| l.starts_with(framecast_broker::metrics::FLEET_WEBHOOK_FAILURES))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no webhook failures counted: {metrics}"));
    assert!(failures >= 1.0, "{failures}");
    assert!(
        metrics.contains(&format!(
            "{}{{region=\"local\",model=",
            framecast_broker::metrics::FLEET_RECOMMENDED_NODES
        )),
        "{metrics}"
    );
    dev.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_the_plan() {
    let dev = dev_with(1, 1, Tune::new(fast_planner)).await;
    let doc = get(dev.broker().http, "/openapi.json").await.json();
    assert!(doc["paths"]["/v1/pools/plan"]["get"].is_object(), "{doc}");
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("PoolBody", "targets"),
        ("PoolBody", "profiles"),
        ("PoolBody", "plan_generation"),
        ("NodeBody", "plan_generation_sent"),
        ("TargetBody", "desired_warm"),
        ("TargetBody", "observed_warm"),
        ("ProfileBody", "gpus_observed"),
        ("PlanBody", "recommendation"),
        ("RecommendationBody", "nodes_needed"),
        ("PlannerCountersBody", "warm_hits"),
    ] {
        assert!(
            schemas[schema]["properties"][field].is_object(),
            "{schema}.{field} missing"
        );
    }
    dev.stop().await;
}

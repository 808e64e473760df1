//! The broker service end to end: a real broker and in-process agents on simulated GPUs, over
//! real HTTP and real QUIC with mutual TLS on loopback. Timeouts only bound how long a broken
//! build hangs; no test asserts on timing.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod http;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::timeout;

use framecast_broker::dev::{Dev, DevOptions, Tune, start_dev};
use framecast_shared::config::BrokerConfig;
use framecast_shared::ids::{NodeId, SessionId};
use framecast_shared::time::Timestamp;
use framecast_shared::token::TokenVerifier;

use http::{Response, events, request};

const LIMIT: Duration = Duration::from_secs(30);
const KEY: &str = "dev-key";

async fn dev_with(nodes: usize, gpus: u32, tune: Option<fn(&mut BrokerConfig)>) -> Dev {
    let dev = start_dev(DevOptions {
        nodes,
        gpus_toml: format!("[[gpus]]\nmodel = \"l4\"\ncount = {gpus}\n"),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: None,
        api_key: KEY.into(),
        tune: tune.map(Tune::new),
    })
    .await
    .unwrap();
    // The agents connect in the background; wait until the broker knows them.
    all_connected(dev.broker().http, nodes).await;
    dev
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

async fn post(addr: SocketAddr, path: &str, body: &str, extra: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {KEY}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    request(addr, "POST", path, &headers, body.as_bytes()).await
}

async fn delete(addr: SocketAddr, path: &str) -> Response {
    request(
        addr,
        "DELETE",
        path,
        &[("authorization", &format!("Bearer {KEY}"))],
        b"",
    )
    .await
}

/// `POST /v1/nodes/{node}/{op}` (`cordon`, `uncordon`) with the dev key, which must answer
/// 204.
async fn node_op(addr: SocketAddr, node: &str, op: &str) {
    let r = post(addr, &format!("/v1/nodes/{node}/{op}"), "", &[]).await;
    assert_eq!(r.status, 204, "{op} {node}: {}", r.body);
}

/// `POST /v1/nodes/{node}/drain` with a deadline `deadline_s` from now, which must answer 204.
async fn drain(addr: SocketAddr, node: &str, deadline_s: u64) {
    let body = format!(r#"{{"deadline_s":{deadline_s}}}"#);
    let r = post(addr, &format!("/v1/nodes/{node}/drain"), &body, &[]).await;
    assert_eq!(r.status, 204, "drain {node}: {}", r.body);
}

/// `POST /v1/sessions` for `game` at `tier`, which must answer 201 (a slot is reserved).
async fn reserve(addr: SocketAddr, game: &str, tier: &str, player: &str) -> Response {
    let r = post(addr, "/v1/sessions", &session(game, tier, player), &[]).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r
}

fn session(game: &str, tier: &str, player: &str) -> String {
    format!(r#"{{"game":"{game}","tier":"{tier}","player_id":"{player}"}}"#)
}

fn assert_problem(r: &Response, status: u16) -> serde_json::Value {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{r:?}"
    );
    let p = r.json();
    assert_eq!(p["status"], status);
    assert!(p["type"].as_str().unwrap().starts_with("https://"));
    assert!(!p["detail"].as_str().unwrap().is_empty());
    p
}

#[tokio::test]
async fn a_session_is_reserved_on_an_agent_with_a_token_it_can_verify() {
    let dev = dev_with(2, 2, None).await;
    let addr = dev.broker().http;
    let r = reserve(addr, "arena-shooter", "1080p", "p1").await;
    let s = r.json();
    assert_eq!(s["state"], "reserved");
    assert_eq!(s["tier"], "1080p");
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/sessions/{}", s["session_id"].as_str().unwrap()).as_str())
    );
    let node = NodeId::new(s["node_id"].as_str().unwrap()).unwrap();
    assert!(dev.nodes().contains(&node));
    assert!(s["whep_url"].as_str().unwrap().ends_with(&format!(
        "/whep/sessions/{}",
        s["session_id"].as_str().unwrap()
    )));
    // The token verifies offline with the key agents get in their welcome, for that node only.
    let verifier = TokenVerifier::new(&dev.broker().broker.token_public_key()).unwrap();
    let claims = verifier
        .verify(s["token"].as_str().unwrap(), &node, Timestamp::now())
        .unwrap();
    assert_eq!(claims.session_id.to_string(), s["session_id"]);
    let other = dev.nodes().into_iter().find(|n| n != &node).unwrap();
    assert!(
        verifier
            .verify(s["token"].as_str().unwrap(), &other, Timestamp::now())
            .is_err()
    );
    // It is listed, shown, and its slot is counted in the pools.
    let id = s["session_id"].as_str().unwrap();
    let one = get(addr, &format!("/v1/sessions/{id}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["node_id"], s["node_id"]);
    let list = get(addr, "/v1/sessions?state=reserved").await;
    assert_eq!(list.json()["sessions"].as_array().unwrap().len(), 1);
    let pools = get(addr, "/v1/pools").await.json();
    let p1080 = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tier"] == "1080p")
        .unwrap()
        .clone();
    assert_eq!(p1080["reserved"], 1);
    // Deleting it frees the slot and writes an audit record.
    assert_eq!(
        delete(addr, &format!("/v1/sessions/{id}")).await.status,
        204
    );
    let ended = get(addr, &format!("/v1/sessions/{id}")).await.json();
    assert_eq!(ended["state"], "ended");
    assert_eq!(ended["end_reason"], "released");
    assert_problem(&delete(addr, &format!("/v1/sessions/{id}")).await, 404);
    dev.stop().await;
}

#[tokio::test]
async fn bad_requests_get_problem_documents() {
    let dev = dev_with(1, 1, None).await;
    let addr = dev.broker().http;
    let body = session("arena-shooter", "1080p", "p1");
    // 401: no key, a bad key.
    let r = request(addr, "POST", "/v1/sessions", &[], body.as_bytes()).await;
    assert_problem(&r, 401);
    assert!(r.header("www-authenticate").is_some());
    let r = request(
        addr,
        "GET",
        "/v1/sessions",
        &[("authorization", "Bearer wrong")],
        b"",
    )
    .await;
    assert_problem(&r, 401);
    // 400: not JSON, unknown field, missing field.
    assert_problem(&post(addr, "/v1/sessions", "{", &[]).await, 400);
    assert_problem(
        &post(
            addr,
            "/v1/sessions",
            r#"{"game":"arena-shooter","tier":"1080p","player_id":"p","color":"red"}"#,
            &[],
        )
        .await,
        400,
    );
    assert_problem(
        &post(addr, "/v1/sessions", r#"{"game":"x"}"#, &[]).await,
        400,
    );
    // 413: larger than http.max_body_bytes.
    let huge = format!(
        r#"{{"game":"arena-shooter","tier":"1080p","player_id":"{}"}}"#,
        "p".repeat(100_000)
    );
    assert_problem(&post(addr, "/v1/sessions", &huge, &[]).await, 413);
    // 422: unknown game, tier, genre, priority.
    for (body, field) in [
        (session("chess", "1080p", "p"), "game"),
        (session("arena-shooter", "8k", "p"), "tier"),
        (
            r#"{"game":"arena-shooter","tier":"1080p","player_id":"p","genre":"racing"}"#.into(),
            "genre",
        ),
        (
            r#"{"game":"arena-shooter","tier":"1080p","player_id":"p","priority":"urgent"}"#.into(),
            "priority",
        ),
    ] {
        let p = assert_problem(&post(addr, "/v1/sessions", &body, &[]).await, 422);
        assert_eq!(p["field"], field);
    }
    // 404: unknown session, unknown route.
    let id = SessionId::new(Timestamp::now(), 7);
    assert_problem(&get(addr, &format!("/v1/sessions/{id}")).await, 404);
    assert_problem(&get(addr, "/v1/sessions/not-an-id").await, 404);
    assert_problem(&get(addr, "/v2/everything").await, 404);
    // 405 is a problem document too, and an unknown filter is a 400.
    let r = request(
        addr,
        "PUT",
        "/v1/sessions",
        &[("authorization", "Bearer dev-key")],
        b"",
    )
    .await;
    assert_problem(&r, 405);
    assert_problem(&get(addr, "/v1/sessions?state=sleeping").await, 400);
    assert_problem(&get(addr, "/v1/sessions?limit=0").await, 400);
    dev.stop().await;
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_returns_the_same_session() {
    let dev = dev_with(1, 1, None).await;
    let addr = dev.broker().http;
    let body = session("open-world", "720p", "p1");
    let key = [("idempotency-key", "order-1")];
    let first = post(addr, "/v1/sessions", &body, &key).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let again = post(addr, "/v1/sessions", &body, &key).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.json()["session_id"], first.json()["session_id"]);
    assert_eq!(
        get(addr, "/v1/sessions").await.json()["sessions"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "one session, not two"
    );
    let other = session("open-world", "720p", "p2");
    assert_problem(&post(addr, "/v1/sessions", &other, &key).await, 409);
    dev.stop().await;
}

#[tokio::test]
async fn a_full_fleet_queues_or_refuses_and_a_queued_player_hears_when_placed() {
    // One node, one L4: three 4K sessions fill it.
    let dev = dev_with(1, 1, None).await;
    let addr = dev.broker().http;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = reserve(addr, "open-world", "4k", &format!("p{i}")).await;
        ids.push(r.json()["session_id"].as_str().unwrap().to_owned());
    }
    let no_queue = r#"{"game":"open-world","tier":"4k","player_id":"p9","queue":false}"#;
    let p = assert_problem(&post(addr, "/v1/sessions", no_queue, &[]).await, 503);
    assert!(p["retry_after"].is_number());
    let queued = post(
        addr,
        "/v1/sessions",
        &session("open-world", "4k", "p10"),
        &[],
    )
    .await;
    assert_eq!(queued.status, 202, "{}", queued.body);
    let q = queued.json();
    assert_eq!(q["state"], "queued");
    assert_eq!(q["queue_position"], 0);
    let qid = q["session_id"].as_str().unwrap().to_owned();
    let mut stream = events(addr, &format!("/v1/sessions/{qid}/events"), KEY).await;
    assert_eq!(stream.next().await["state"], "queued");
    // A slot frees: the queued player is placed and hears it.
    assert_eq!(
        delete(addr, &format!("/v1/sessions/{}", ids[0]))
            .await
            .status,
        204
    );
    let placed = timeout(LIMIT, stream.next()).await.unwrap();
    assert_eq!(placed["state"], "reserved", "{placed}");
    assert!(placed["token"].is_string());
    dev.stop().await;
}

#[tokio::test]
async fn operators_cordon_and_drain_nodes_and_others_may_not() {
    let dev = dev_with(2, 1, None).await;
    let addr = dev.broker().http;
    let nodes = dev.nodes();
    let (a, b) = (nodes[0].to_string(), nodes[1].to_string());
    node_op(addr, &a, "cordon").await;
    for i in 0..2 {
        let r = post(
            addr,
            "/v1/sessions",
            &session("open-world", "720p", &format!("p{i}")),
            &[],
        )
        .await;
        assert_eq!(
            r.json()["node_id"],
            b.as_str(),
            "the cordoned node gets nothing"
        );
    }
    node_op(addr, &a, "uncordon").await;
    drain(addr, &b, 600).await;
    let drained = node_view(addr, &b).await;
    assert_eq!(drained["state"], "draining");
    let r = post(
        addr,
        "/v1/sessions",
        &session("open-world", "720p", "p3"),
        &[],
    )
    .await;
    assert_eq!(r.json()["node_id"], a.as_str());
    assert_problem(&post(addr, "/v1/nodes/nowhere/cordon", "", &[]).await, 404);
    // The explain endpoint shows where a request would go, without reserving. (A's L4 now
    // holds 720p slots, so 720p is what fits there.)
    let explained = post(
        addr,
        "/v1/placement/explain",
        &session("arena-shooter", "720p", "px"),
        &[],
    )
    .await;
    assert_eq!(explained.status, 200, "{}", explained.body);
    let e = explained.json();
    assert_eq!(e["decision"]["decision"], "placed");
    assert_eq!(e["decision"]["node"], a.as_str());
    assert!(
        !e["attempts"][0]["candidates"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let pools = get(addr, "/v1/pools").await.json();
    let reserved: u64 = pools
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reserved"].as_u64().unwrap())
        .sum();
    assert_eq!(reserved, 3, "explain reserved nothing");
    // Uncordoning the draining node cancels the drain on its agent too: with A cordoned,
    // B takes sessions again.
    node_op(addr, &b, "uncordon").await;
    node_op(addr, &a, "cordon").await;
    let r = reserve(addr, "open-world", "720p", "p4").await;
    assert_eq!(r.json()["node_id"], b.as_str());
    node_op(addr, &a, "uncordon").await;
    dev.stop().await;
}

#[tokio::test]
async fn the_openapi_document_and_metrics_describe_the_service() {
    let dev = dev_with(1, 1, None).await;
    let addr = dev.broker().http;
    let doc = get(addr, "/openapi.json").await.json();
    for path in [
        "/v1/sessions",
        "/v1/sessions/{id}",
        "/v1/sessions/{id}/events",
        "/v1/nodes",
        "/v1/nodes/{id}/drain",
        "/v1/pools",
        "/v1/placement/explain",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    post(
        addr,
        "/v1/sessions",
        &session("open-world", "720p", "p"),
        &[],
    )
    .await;
    let metrics = request(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(metrics.status, 200);
    for name in framecast_broker::metrics::NAMES {
        if name == framecast_broker::metrics::SESSIONS_ENDED {
            continue; // nothing ended yet
        }
        assert!(metrics.body.contains(name), "{name} missing");
    }
    assert_eq!(request(addr, "GET", "/livez", &[], b"").await.status, 200);
    assert_eq!(request(addr, "GET", "/readyz", &[], b"").await.status, 200);
    // Dev mode's status page shows the fleet.
    let page = request(addr, "GET", "/status", &[], b"").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains(dev.nodes()[0].as_str()), "{}", page.body);
    dev.stop().await;
}

fn fast_liveness(c: &mut BrokerConfig) {
    c.control.heartbeat_interval_ms = 100;
    c.control.suspect_after_ms = 300;
    c.control.down_after_ms = 600;
    c.control.node_lost_grace_ms = 300;
}

#[tokio::test]
async fn sessions_on_a_lost_node_end_with_node_lost() {
    let mut dev = dev_with(2, 1, Some(fast_liveness)).await;
    let addr = dev.broker().http;
    let r = post(
        addr,
        "/v1/sessions",
        &session("open-world", "720p", "p1"),
        &[],
    )
    .await;
    let s = r.json();
    let node = NodeId::new(s["node_id"].as_str().unwrap()).unwrap();
    let id = s["session_id"].as_str().unwrap().to_owned();
    let mut stream = events(addr, &format!("/v1/sessions/{id}/events"), KEY).await;
    assert_eq!(stream.next().await["state"], "reserved");
    dev.stop_agent(&node).await;
    let ended = timeout(LIMIT, stream.next()).await.unwrap();
    assert_eq!(ended["state"], "ended");
    assert_eq!(ended["end_reason"], "node-lost");
    let lost = node_view(addr, node.as_str()).await;
    assert_eq!(lost["state"], "down");
    // New sessions go to the node that is left.
    let r = post(
        addr,
        "/v1/sessions",
        &session("open-world", "720p", "p2"),
        &[],
    )
    .await;
    assert_eq!(r.status, 201);
    assert_ne!(r.json()["node_id"], node.as_str());
    dev.stop().await;
}

fn one_request_per_minute(c: &mut BrokerConfig) {
    c.tenants[0].requests_per_minute = Some(1);
    c.tenants[0].max_sessions = Some(5);
}

#[tokio::test]
async fn a_tenant_over_its_rate_gets_429_with_retry_after() {
    let dev = dev_with(1, 1, Some(one_request_per_minute)).await;
    let addr = dev.broker().http;
    let body = session("open-world", "720p", "p");
    assert_eq!(post(addr, "/v1/sessions", &body, &[]).await.status, 201);
    let r = post(addr, "/v1/sessions", &body, &[]).await;
    assert_problem(&r, 429);
    assert!(r.header("retry-after").unwrap().parse::<u32>().unwrap() >= 1);
    dev.stop().await;
}

fn with_platform_tenant(c: &mut BrokerConfig) {
    use framecast_broker::service::tenants::{hex, sha256};
    c.tenants
        .push(framecast_shared::config::broker::TenantConfig {
            id: framecast_shared::ids::TenantId::new("platform").unwrap(),
            api_key_sha256: hex(&sha256(b"platform-key")),
            max_sessions: None,
            admin: false,
            max_session_s: None,
            requests_per_minute: None,
        });
}

#[tokio::test]
async fn tenants_see_only_their_sessions_and_only_operators_touch_nodes() {
    let dev = dev_with(1, 1, Some(with_platform_tenant)).await;
    let addr = dev.broker().http;
    let theirs = [("authorization", "Bearer platform-key")];
    let r = request(addr, "GET", "/v1/nodes", &theirs, b"").await;
    assert_problem(&r, 403);
    let node = dev.nodes()[0].to_string();
    let r = request(
        addr,
        "POST",
        &format!("/v1/nodes/{node}/drain"),
        &theirs,
        b"",
    )
    .await;
    assert_problem(&r, 403);
    let mine = post(
        addr,
        "/v1/sessions",
        &session("open-world", "720p", "p"),
        &[],
    )
    .await;
    let id = mine.json()["session_id"].as_str().unwrap().to_owned();
    let r = request(addr, "GET", &format!("/v1/sessions/{id}"), &theirs, b"").await;
    assert_problem(&r, 404);
    let r = request(addr, "DELETE", &format!("/v1/sessions/{id}"), &theirs, b"").await;
    assert_problem(&r, 404);
    let r = request(addr, "GET", "/v1/sessions", &theirs, b"").await;
    assert_eq!(r.json()["sessions"].as_array().unwrap().len(), 0);
    let r = request(
        addr,
        "POST",
        "/v1/placement/explain",
        &theirs,
        session("open-world", "720p", "p").as_bytes(),
    )
    .await;
    assert_problem(&r, 403);
    dev.stop().await;
}

#[tokio::test]
async fn after_a_restart_the_broker_finds_its_sessions_and_idempotency_keys_again() {
    let dir = tempfile::tempdir().unwrap();
    let options = || DevOptions {
        nodes: 1,
        gpus_toml: "[[gpus]]\nmodel = \"l4\"\ncount = 1\n".into(),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: Some(dir.path().to_owned()),
        api_key: KEY.into(),
        tune: None,
    };
    let dev = start_dev(options()).await.unwrap();
    let addr = dev.broker().http;
    timeout(LIMIT, async {
        while get(addr, "/v1/nodes")
            .await
            .json()
            .as_array()
            .is_none_or(|n| n.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    for i in 0..3 {
        reserve(addr, "open-world", "4k", &format!("p{i}")).await;
    }
    let body = session("open-world", "4k", "waiting");
    let key = [("idempotency-key", "k-queued")];
    let queued = post(addr, "/v1/sessions", &body, &key).await;
    assert_eq!(queued.status, 202, "{}", queued.body);
    let id = queued.json()["session_id"].clone();
    dev.stop().await;

    let dev = start_dev(options()).await.unwrap();
    let addr = dev.broker().http;
    let again = post(addr, "/v1/sessions", &body, &key).await;
    assert_eq!(again.json()["session_id"], id, "the same session");
    assert_eq!(again.json()["state"], "queued", "{}", again.body);
    // The restarted agent runs none of the old sessions (the synthetic game lives in the
    // agent), so its GPU is free and the queued session is placed once the agent is back.
    let path = format!("/v1/sessions/{}", id.as_str().unwrap());
    timeout(LIMIT, async {
        while get(addr, &path).await.json()["state"] != "reserved" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the queued session is placed after the restart");
    let again = post(addr, "/v1/sessions", &body, &key).await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.json()["session_id"], id);
    dev.stop().await;
}

/// `node` as `GET /v1/nodes` lists it.
async fn node_view(addr: SocketAddr, node: &str) -> serde_json::Value {
    let nodes = get(addr, "/v1/nodes").await.json();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == node)
        .unwrap_or_else(|| panic!("{node} is not listed: {nodes}"))
        .clone()
}

async fn all_connected(addr: SocketAddr, nodes: usize) {
    timeout(LIMIT, async {
        loop {
            let r = get(addr, "/v1/nodes").await;
            if r.status == 200
                && r.json()
                    .as_array()
                    .is_some_and(|n| n.len() == nodes && n.iter().all(|n| n["connected"] == true))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every agent connects");
}

fn sorted_ids(page: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = page["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_broker_restart_with_sessions_running_loses_and_doubles_nothing() {
    let mut dev = dev_with(3, 2, None).await;
    let addr = dev.broker().http;
    let mut created = Vec::new();
    for i in 0..12 {
        let r = reserve(addr, "open-world", "720p", &format!("p{i}")).await;
        created.push(r.json()["session_id"].as_str().unwrap().to_owned());
    }
    created.sort();
    let before = get(addr, "/v1/sessions?limit=1000").await.json();
    assert_eq!(sorted_ids(&before), created);

    dev.restart_broker().await.unwrap();
    let addr = dev.broker().http;
    all_connected(addr, 3).await;
    let after = get(addr, "/v1/sessions?limit=1000").await.json();
    assert_eq!(
        sorted_ids(&after),
        created,
        "the same sessions, none lost or doubled"
    );
    // The engine holds each of them once again, from the agents' hellos.
    let held: u64 = get(addr, "/v1/pools")
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reserved"].as_u64().unwrap() + p["active"].as_u64().unwrap())
        .sum();
    assert_eq!(held, 12);
    // And the service goes on: a release reaches the agent, a new session is placed.
    assert_eq!(
        delete(addr, &format!("/v1/sessions/{}", created[0]))
            .await
            .status,
        204
    );
    reserve(addr, "open-world", "720p", "new").await;
    dev.stop().await;
}

#[tokio::test]
async fn a_thousand_sessions_are_allocated_and_released() {
    let dev = dev_with(3, 2, None).await;
    let addr = dev.broker().http;
    let mut workers = Vec::new();
    for w in 0..8 {
        workers.push(tokio::spawn(async move {
            let mut nodes = std::collections::BTreeSet::new();
            for i in 0..125 {
                let r = post(
                    addr,
                    "/v1/sessions",
                    // A shooter: its sessions spread over GPUs, so every node is used.
                    &session("arena-shooter", "720p", &format!("w{w}-{i}")),
                    &[],
                )
                .await;
                assert_eq!(r.status, 201, "{}", r.body);
                let s = r.json();
                nodes.insert(s["node_id"].as_str().unwrap().to_owned());
                let id = s["session_id"].as_str().unwrap();
                assert_eq!(
                    delete(addr, &format!("/v1/sessions/{id}")).await.status,
                    204
                );
            }
            nodes
        }));
    }
    let mut nodes = std::collections::BTreeSet::new();
    for w in workers {
        nodes.extend(timeout(Duration::from_secs(120), w).await.unwrap().unwrap());
    }
    assert_eq!(nodes.len(), 3, "every node took sessions");
    // Nothing is left held anywhere.
    let pools = get(addr, "/v1/pools").await.json();
    for p in pools.as_array().unwrap() {
        assert_eq!(
            (p["reserved"].as_u64(), p["active"].as_u64()),
            (Some(0), Some(0)),
            "{p}"
        );
    }
    let listed = get(addr, "/v1/sessions").await.json();
    assert!(listed["sessions"].as_array().unwrap().is_empty());
    dev.stop().await;
}

/// Polls `GET /v1/nodes` until `node`'s state is `state` (bounded).
async fn wait_for_node_state(addr: SocketAddr, node: &str, state: &str) {
    timeout(LIMIT, async {
        while node_view(addr, node).await["state"] != state {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{node} never became {state}"));
}

/// Polls `GET /v1/sessions/{id}` until the session has ended (bounded), and returns it.
async fn wait_for_end(addr: SocketAddr, id: &str) -> serde_json::Value {
    wait_for_end_within(addr, id, LIMIT).await
}

/// [`wait_for_end`] with another limit.
async fn wait_for_end_within(addr: SocketAddr, id: &str, limit: Duration) -> serde_json::Value {
    let path = format!("/v1/sessions/{id}");
    timeout(limit, async {
        loop {
            let s = get(addr, &path).await.json();
            if s["state"] == "ended" {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("session {id} did not end"))
}

#[tokio::test]
async fn cordons_and_drains_survive_a_broker_restart() {
    let mut dev = dev_with(2, 1, None).await;
    let addr = dev.broker().http;
    let nodes = dev.nodes();
    let (a, b) = (nodes[0].to_string(), nodes[1].to_string());
    node_op(addr, &a, "cordon").await;
    drain(addr, &b, 600).await;

    dev.restart_broker().await.unwrap();
    let addr = dev.broker().http;
    all_connected(addr, 2).await;
    let cordoned = node_view(addr, &a).await;
    assert_eq!(cordoned["state"], "cordoned", "{cordoned}");
    assert_eq!(cordoned["cordoned"], true);
    let draining = node_view(addr, &b).await;
    assert_eq!(draining["state"], "draining", "{draining}");
    // Neither node may take the session: the broker says so itself rather than trying the
    // draining node, whose agent refuses.
    let no_queue = r#"{"game":"open-world","tier":"720p","player_id":"p0","queue":false}"#;
    let p = assert_problem(&post(addr, "/v1/sessions", no_queue, &[]).await, 503);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("no GPU slot is free"),
        "{p}"
    );
    // Once the cordon is lifted, sessions go to that node, not to the draining one.
    node_op(addr, &a, "uncordon").await;
    for i in 1..3 {
        let r = reserve(addr, "open-world", "720p", &format!("p{i}")).await;
        assert_eq!(r.json()["node_id"], a.as_str());
    }
    // The uncordon is recorded too: after another restart A is ready, B still draining.
    dev.restart_broker().await.unwrap();
    let addr = dev.broker().http;
    all_connected(addr, 2).await;
    assert_eq!(node_view(addr, &a).await["state"], "ready");
    assert_eq!(node_view(addr, &b).await["state"], "draining");
    dev.stop().await;
}

#[tokio::test]
async fn an_uncordon_after_a_finished_drain_lets_the_node_take_sessions_again() {
    let dev = dev_with(2, 1, None).await;
    let addr = dev.broker().http;
    let nodes = dev.nodes();
    let (a, b) = (nodes[0].to_string(), nodes[1].to_string());
    // A drain whose deadline is now: it finishes at once and leaves B cordoned, its agent
    // still draining.
    drain(addr, &b, 0).await;
    wait_for_node_state(addr, &b, "cordoned").await;
    // With A cordoned, B is the only choice once uncordoned: its agent must have been told
    // to resume, or it refuses the session (503).
    node_op(addr, &a, "cordon").await;
    node_op(addr, &b, "uncordon").await;
    let r = reserve(addr, "open-world", "720p", "p1").await;
    assert_eq!(r.json()["node_id"], b.as_str());
    dev.stop().await;
}

/// Timers long enough that nothing but an agent's hello (or a lapsed reservation the test
/// made) can end a recovered session while a test waits: the node-lost sweep after a restart
/// comes an hour later, and reservations last an hour.
fn patient(c: &mut BrokerConfig) {
    c.control.node_lost_grace_ms = 3_600_000;
    c.timers.reservation_ttl_s = 3_600;
}

fn options_in(dir: &std::path::Path, nodes: usize) -> DevOptions {
    DevOptions {
        nodes,
        gpus_toml: "[[gpus]]\nmodel = \"l4\"\ncount = 1\n".into(),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: Some(dir.to_owned()),
        api_key: KEY.into(),
        tune: Some(Tune::new(patient)),
    }
}

/// Starts a dev deployment in `dir` with one node, reserves a session on it and stops
/// everything; returns the session's id.
async fn reserve_and_stop(dir: &std::path::Path) -> String {
    let dev = start_dev(options_in(dir, 1)).await.unwrap();
    let addr = dev.broker().http;
    all_connected(addr, 1).await;
    let r = reserve(addr, "open-world", "720p", "p1").await;
    let id = r.json()["session_id"].as_str().unwrap().to_owned();
    dev.stop().await;
    id
}

#[tokio::test]
async fn a_recovered_session_its_restarted_agent_does_not_hold_ends_at_its_hello() {
    let dir = tempfile::tempdir().unwrap();
    let id = reserve_and_stop(dir.path()).await;
    // Broker and agent start again: the agent's synthetic session did not survive its
    // restart, so its hello reports none, and the broker ends the one it recovered as any
    // hello ends a session its agent does not report.
    let dev = start_dev(options_in(dir.path(), 1)).await.unwrap();
    let addr = dev.broker().http;
    let ended = wait_for_end(addr, &id).await;
    assert_eq!(ended["end_reason"], "error", "{ended}");
    // Its slot is free: the node takes a session of the same size.
    all_connected(addr, 1).await;
    reserve(addr, "open-world", "720p", "p2").await;
    dev.stop().await;
}

/// Opens the store of a stopped broker, once its last task has let go of it (bounded).
async fn open_store(data_dir: &std::path::Path) -> framecast_broker::store::Store {
    use framecast_broker::store::{Store, StoreError};
    timeout(LIMIT, async {
        loop {
            match Store::open(data_dir) {
                Err(StoreError::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other.unwrap(),
            }
        }
    })
    .await
    .expect("the stopped broker releases its store")
}

#[tokio::test]
async fn a_lapsed_recovered_reservation_waits_for_its_agent_and_ends_node_lost_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let id = reserve_and_stop(dir.path()).await;
    // The reservation's time runs out while the broker is down (rewound in its store rather
    // than waited for).
    {
        let store = open_store(&dir.path().join("broker")).await;
        let sid = id.parse::<SessionId>().unwrap();
        let mut record = store.session(&sid).unwrap().unwrap();
        assert_eq!(
            record.state,
            framecast_shared::state::SessionState::Reserved
        );
        record.expires_at = Some(Timestamp::from_millis(Timestamp::now().as_millis() - 1_000));
        store.put_session(&record).unwrap();
    }
    // No agent comes back. The broker cannot know whether the player connected while it was
    // away, so the lapsed reservation is not ended `expired` before the node's agent says
    // hello; with none within the orphan sweep's window it ends `node-lost`.
    let mut options = options_in(dir.path(), 0);
    options.tune = Some(Tune::new(|c| {
        patient(c);
        c.control.heartbeat_interval_ms = 100;
        c.control.suspect_after_ms = 300;
        c.control.down_after_ms = 600;
        c.control.node_lost_grace_ms = 300;
    }));
    let dev = start_dev(options).await.unwrap();
    let addr = dev.broker().http;
    // Five of the driver's 200 ms ticks: a lapse check that ignored the missing hello would
    // have ended it by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let early = get(addr, &format!("/v1/sessions/{id}")).await.json();
    assert_eq!(early["state"], "reserved", "{early}");
    // The sweep waits down_after + node_lost_grace + an agent's longest backoff (30 s).
    let ended = wait_for_end_within(addr, &id, Duration::from_secs(90)).await;
    assert_eq!(ended["end_reason"], "node-lost", "{ended}");
    dev.stop().await;
}

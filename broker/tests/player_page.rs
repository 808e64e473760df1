//! Dev mode's player page, its script, its configuration and the status page, over real HTTP:
//! served without a key by a dev broker, absent from any other. The page's play path (WHEP,
//! input, markers) needs an agent with a WHEP endpoint and a browser; this file checks what
//! the broker serves it.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod http;

use std::net::SocketAddr;
use std::sync::Arc;

use framecast_broker::api::RouterOptions;
use framecast_broker::dev::{Dev, DevOptions, Tune, start_dev};
use framecast_broker::service::Broker;
use framecast_shared::config::BrokerConfig;
use framecast_shared::ids::TierName;
use framecast_shared::tls::{DevCa, Role, server_config};
use framecast_shared::token::TokenSigner;

use http::{Response, request};

const KEY: &str = "player-page-key";
const PLAYER_JS: &str = include_str!("../src/api/player/player.js");
const INDEX_HTML: &str = include_str!("../src/api/player/index.html");

/// A dev broker without agents: the pages need none.
async fn dev(tune: Option<fn(&mut BrokerConfig)>) -> Dev {
    start_dev(DevOptions {
        nodes: 0,
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_key: KEY.into(),
        tune: tune.map(Tune::new),
        ..DevOptions::default()
    })
    .await
    .unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"").await
}

fn content_type(r: &Response) -> &str {
    r.header("content-type").unwrap_or("")
}

#[tokio::test]
async fn dev_mode_serves_the_player_page_its_script_and_the_status_page() {
    let dev = dev(None).await;
    let addr = dev.broker().http;

    let page = get(addr, "/").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(content_type(&page).starts_with("text/html"), "{page:?}");
    assert_eq!(page.body, INDEX_HTML);
    assert!(page.body.contains(r#"<script src="/player.js">"#));
    assert!(
        page.body.contains(r#"href="/status""#),
        "links the status page"
    );
    // No external resources: the dev machine may have no internet.
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));

    let js = get(addr, "/player.js").await;
    assert_eq!(js.status, 200);
    assert!(content_type(&js).starts_with("text/javascript"), "{js:?}");
    assert_eq!(js.body, PLAYER_JS);
    assert_eq!(js.header("cache-control"), Some("no-store"));

    let status = get(addr, "/status").await;
    assert_eq!(status.status, 200);
    assert!(content_type(&status).starts_with("text/html"));
    assert!(
        status.body.contains("Region <b>local</b>"),
        "{}",
        status.body
    );
    assert!(
        status.body.contains(r#"<a href="/">"#),
        "links the player page"
    );

    // The pages are GET only; other methods answer with the API's problem documents.
    let post = request(addr, "POST", "/", &[], b"").await;
    assert_eq!(post.status, 405);
    assert_eq!(content_type(&post), "application/problem+json");
    dev.stop().await;
}

#[tokio::test]
async fn the_player_config_lists_games_tiers_genres_and_the_dev_key() {
    let dev = dev(None).await;
    let r = get(dev.broker().http, "/player/config.json").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(content_type(&r).starts_with("application/json"), "{r:?}");
    let c = r.json();
    assert_eq!(c["api_key"], KEY);
    assert_eq!(c["region"], "local");
    let games: Vec<(&str, &str)> = c["games"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["id"].as_str().unwrap(), g["genre"].as_str().unwrap()))
        .collect();
    assert_eq!(
        games,
        [
            ("arena-shooter", "fps"),
            ("lane-battle", "moba"),
            ("open-world", "rpg")
        ]
    );
    assert_eq!(c["games"][0]["tiers"], serde_json::json!([]), "every tier");
    let tiers = c["tiers"].as_array().unwrap();
    let names: Vec<&str> = tiers.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["720p", "1080p", "4k"], "smallest first");
    assert_eq!(tiers[0]["width"], 1280);
    assert_eq!(tiers[0]["height"], 720);
    assert!(tiers[0]["fps"].as_u64().unwrap() > 0);
    let genres: Vec<&str> = c["genres"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    for g in ["fps", "moba", "rpg"] {
        assert!(genres.contains(&g), "{g} missing from {genres:?}");
    }
    // The key the page is handed is one the API takes.
    let pools = request(
        dev.broker().http,
        "GET",
        "/v1/pools",
        &[(
            "authorization",
            &format!("Bearer {}", c["api_key"].as_str().unwrap()),
        )],
        b"",
    )
    .await;
    assert_eq!(pools.status, 200, "{}", pools.body);
    dev.stop().await;
}

fn only_720p_and_a_narrow_game(c: &mut BrokerConfig) {
    c.tiers.retain(|name, _| name.as_str() == "720p");
    c.games[0].tiers = vec![TierName::new("720p").unwrap()];
}

#[tokio::test]
async fn the_player_config_follows_the_broker_config() {
    let dev = dev(Some(only_720p_and_a_narrow_game)).await;
    let c = get(dev.broker().http, "/player/config.json").await.json();
    let names: Vec<&str> = c["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["720p"]);
    assert_eq!(c["games"][0]["tiers"], serde_json::json!(["720p"]));
    dev.stop().await;
}

#[tokio::test]
async fn a_restarted_dev_broker_still_serves_the_pages_with_the_key() {
    let mut dev = dev(None).await;
    dev.restart_broker().await.unwrap();
    let addr = dev.broker().http;
    assert_eq!(get(addr, "/").await.status, 200);
    assert_eq!(get(addr, "/status").await.status, 200);
    assert_eq!(
        get(addr, "/player/config.json").await.json()["api_key"],
        KEY
    );
    dev.stop().await;
}

#[tokio::test]
async fn a_broker_outside_dev_mode_has_no_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = BrokerConfig {
        data_dir: dir.path().join("broker"),
        ..BrokerConfig::default()
    };
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.control.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let ca = DevCa::generate("player page test CA").unwrap();
    let cert = ca.issue("broker", &["localhost"], Role::Broker).unwrap();
    let tls = server_config(&ca.cert.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap();
    let running = Broker::builder(config)
        .tls(Arc::new(tls))
        .token_signer(TokenSigner::generate().unwrap())
        .build()
        .await
        .unwrap();
    for path in ["/", "/player.js", "/player/config.json", "/status"] {
        let r = get(running.http, path).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert_eq!(content_type(&r), "application/problem+json", "{path}");
    }
    // The rest of the port is as before.
    assert_eq!(get(running.http, "/livez").await.status, 200);
    running.stop().await;
}

#[test]
fn router_options_never_show_the_key() {
    let shown = format!("{:?}", RouterOptions::dev("s3cret-dev-key"));
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("dev_pages: true"), "{shown}");
}

//! The dev-mode player page: `GET /` (the page), `GET /player.js` (its script) and
//! `GET /player/config.json` (what the page offers: games, tiers, genres, the region and the
//! development API key). Dev mode only: the config hands out an API key to anyone who asks.
//!
//! The page allocates a session through `/v1/sessions`, plays it over WHEP from the node's
//! agent, sends input on the `input` data channel and reads the synthetic game's picture
//! markers (docs/PROTOCOL.md, "Player ↔ agent"); see docs/API.md, "Player page", for its query
//! parameters and the report its test mode posts.

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde::Serialize;

use crate::service::Broker;

use super::ApiState;

/// The page, and its script, embedded at build time: no build step, no external resources.
const INDEX_HTML: &str = include_str!("player/index.html");
const PLAYER_JS: &str = include_str!("player/player.js");

/// The player page's routes. `api_key` is the development key the page prefills (the broker
/// keeps only its digest, so dev mode hands it over); `None` leaves the page's key field empty.
pub(super) fn routes(broker: &Broker, api_key: Option<&str>) -> Router<ApiState> {
    // The configuration cannot change while this router serves (a restart builds a new one),
    // so the document is made once.
    let config = PlayerConfig::of(broker, api_key);
    Router::new()
        .route("/", get(|| async { no_cache(Html(INDEX_HTML)) }))
        .route(
            "/player.js",
            get(|| async {
                no_cache((
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    PLAYER_JS,
                ))
            }),
        )
        .route(
            "/player/config.json",
            get(move || {
                let config = config.clone();
                async move { no_cache(axum::Json(config)) }
            }),
        )
}

/// `GET /player/config.json`: what the page offers.
#[derive(Debug, Clone, Serialize)]
struct PlayerConfig {
    /// The development API key, or null.
    api_key: Option<String>,
    /// The broker's region, sent as the request's only region.
    region: String,
    /// The games, in configuration order.
    games: Vec<PlayerGame>,
    /// The tiers, smallest first.
    tiers: Vec<PlayerTier>,
    /// The genre names.
    genres: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct PlayerGame {
    id: String,
    genre: String,
    /// The tiers the game is offered at; empty means all.
    tiers: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct PlayerTier {
    name: String,
    width: u16,
    height: u16,
    fps: u16,
}

impl PlayerConfig {
    fn of(broker: &Broker, api_key: Option<&str>) -> Self {
        let config = broker.config();
        Self {
            api_key: api_key.map(str::to_owned),
            region: config.region.to_string(),
            games: config
                .games
                .iter()
                .map(|g| PlayerGame {
                    id: g.id.to_string(),
                    genre: g.genre.to_string(),
                    tiers: g.tiers.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            // The presets the broker places with (`Broker::new` builds its engine from them).
            tiers: config
                .tier_presets()
                .into_iter()
                .map(|t| PlayerTier {
                    name: t.name.to_string(),
                    width: t.resolution.width,
                    height: t.resolution.height,
                    fps: t.fps,
                })
                .collect(),
            genres: config.genres.keys().map(ToString::to_string).collect(),
        }
    }
}

/// Dev pages change with every build; a stale cached script would talk to a newer broker.
fn no_cache(r: impl IntoResponse) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], r)
}

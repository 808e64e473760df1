//! One request's life in a `live` run, as a game platform lives it: allocate at the due time,
//! follow the queue until placed (or give up), hold the session for its length, release it.
//! Every wait is bounded by the request's own timers and the run's end; at the end whatever is
//! still held or queued is released.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use tokio::sync::watch;

use super::Ctx;
use super::client::{CALL_TIMEOUT, View, rejection_reason};
use super::plan::wall_of;
use crate::demand::Request;

/// How long a call is retried while the broker cannot be reached (a restart).
pub(crate) const RETRY_LIMIT: Duration = Duration::from_secs(30);
/// The slowest poll of a queued request that has no event stream of its own.
const POLL_MAX: Duration = Duration::from_secs(1);
/// The fastest.
const POLL_MIN: Duration = Duration::from_millis(50);

/// Plays request `r`; every outcome goes to the run's tally.
pub(crate) async fn play(ctx: std::sync::Arc<Ctx>, r: Request) {
    let due = ctx.clock.wall(r.at_ms);
    let epoch = ctx.restarts();
    let down_at_due = !ctx.broker_is_up();
    ctx.tally().requests += 1;
    let Some(game) = ctx.games.get(&r.genre) else {
        // The plan maps every genre of the demand; a trace may name others.
        ctx.tally().rejected("unknown-game".into());
        return;
    };
    let player = format!("{}-{}", ctx.run_id, r.n);
    let body = serde_json::json!({
        "game": game.as_str(),
        "tier": r.tier.as_str(),
        "genre": r.genre.as_str(),
        "player_id": player,
        "queue": ctx.queue,
    });
    let body = Bytes::from(body.to_string());
    // Safe to retry: the same key and body give the same session.
    let answer = ctx
        .api
        .call_retrying(
            Method::POST,
            "/v1/sessions",
            Some(body),
            Some(&player),
            due + RETRY_LIMIT,
        )
        .await;
    let now = Instant::now();
    let (reply, retries) = match answer {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(n = r.n, error = %e, "a request got no answer");
            ctx.tally().failed(e.kind());
            return;
        }
    };
    {
        let mut t = ctx.tally();
        t.answered(
            now.saturating_duration_since(due),
            now.saturating_duration_since(ctx.clock.start),
        );
        if retries > 0 {
            t.retried += 1;
            if down_at_due || ctx.restarts() != epoch {
                t.retried_after_restart += 1;
            }
        }
    }
    let view = match reply.status {
        StatusCode::CREATED | StatusCode::ACCEPTED => {
            match serde_json::from_slice::<View>(&reply.body) {
                Ok(v) => v,
                Err(_) => {
                    ctx.tally().failed("bad-answer");
                    return;
                }
            }
        }
        status => {
            ctx.tally().rejected(rejection_reason(status, &reply.body));
            return;
        }
    };
    let tier = r.tier.as_str();
    if reply.status == StatusCode::CREATED {
        let wait = if retries == 0 {
            0
        } else {
            ctx.clock.sim_of(now.saturating_duration_since(due))
        };
        ctx.tally().placed(tier, wait, retries == 0);
        hold(
            &ctx,
            &view,
            tier,
            now + wall_of(r.length_ms, ctx.clock.speed),
        )
        .await;
        return;
    }
    ctx.tally().queued += 1;
    let gives_up = r
        .gives_up_after_ms
        .map(|ms| ctx.clock.wall(r.at_ms.saturating_add(ms)));
    match follow(&ctx, &view.session_id, gives_up).await {
        Followed::Placed(at, placed) => {
            let wait = ctx.clock.sim_of(at.saturating_duration_since(due));
            ctx.tally().placed(tier, wait, false);
            hold(
                &ctx,
                &placed,
                tier,
                at + wall_of(r.length_ms, ctx.clock.speed),
            )
            .await;
        }
        Followed::Ended(reason) => ctx.tally().ended(reason),
        Followed::GaveUp => release(&ctx, &view.session_id, Release::GiveUp).await,
        Followed::RunEnded => release(&ctx, &view.session_id, Release::AtEnd).await,
    }
}

/// How following a queued request ended.
enum Followed {
    /// It got a GPU at this time; the session as it was then.
    Placed(Instant, View),
    /// The broker ended it (the queue timeout) for this reason.
    Ended(String),
    /// The player's patience ran out first.
    GaveUp,
    /// The run ended first.
    RunEnded,
}

/// Why a session is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// Its length is over.
    Played,
    /// Its player gave up waiting in the queue.
    GiveUp,
    /// The run is over.
    AtEnd,
}

/// Follows queued session `id` until it is placed or ended, the player gives up at
/// `gives_up`, or the run ends: over its event stream (one connection each, up to a limit),
/// else by polling.
async fn follow(ctx: &Ctx, id: &str, gives_up: Option<Instant>) -> Followed {
    let mut ending = ctx.ending.clone();
    let mut up = ctx.broker_up.clone();
    let path = format!("/v1/sessions/{id}/events");
    let poll = wall_of(1000, ctx.clock.speed).clamp(POLL_MIN, POLL_MAX);
    let limit = gives_up.unwrap_or(ctx.end + RETRY_LIMIT);
    let mut backoff = POLL_MIN;
    loop {
        if *ending.borrow() {
            return Followed::RunEnded;
        }
        if Instant::now() >= limit {
            return Followed::GaveUp;
        }
        // While the broker restarts, wait for it (its streams are gone).
        if !*up.borrow() {
            tokio::select! {
                Ok(_) = up.wait_for(|u| *u) => {}
                Ok(_) = ending.wait_for(|e| *e) => return Followed::RunEnded,
                () = tokio::time::sleep_until(limit.into()) => return Followed::GaveUp,
            }
        }
        let seen = match ctx.streams.try_acquire() {
            Ok(_permit) => {
                let watched = async {
                    let mut stream = ctx.api.events(&path).await.ok()?;
                    loop {
                        match stream.next_view().await {
                            Ok(Some(v)) if v.state == "queued" => {}
                            Ok(Some(v)) => return Some(v),
                            Ok(None) | Err(_) => return None,
                        }
                    }
                };
                tokio::select! {
                    v = watched => v,
                    Ok(_) = ending.wait_for(|e| *e) => return Followed::RunEnded,
                    Ok(_) = up.wait_for(|u| !*u) => None,
                    () = tokio::time::sleep_until(limit.into()) => return Followed::GaveUp,
                }
            }
            Err(_) => {
                let looked = async {
                    let reply = ctx
                        .api
                        .call(Method::GET, &format!("/v1/sessions/{id}"), None, None)
                        .await
                        .ok()?;
                    let v = serde_json::from_slice::<View>(&reply.body).ok()?;
                    (v.state != "queued").then_some(v)
                };
                match looked.await {
                    Some(v) => Some(v),
                    None => {
                        tokio::select! {
                            () = tokio::time::sleep(poll) => {}
                            Ok(_) = ending.wait_for(|e| *e) => return Followed::RunEnded,
                        }
                        continue;
                    }
                }
            }
        };
        match seen {
            Some(v) if v.state == "ended" => {
                return Followed::Ended(v.end_reason.unwrap_or_else(|| "unknown".into()));
            }
            Some(v) => return Followed::Placed(Instant::now(), v),
            None => {
                // The stream broke or could not be opened: look again after a pause.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(POLL_MAX);
            }
        }
    }
}

/// Holds placed session `session` of `tier` until `until` (its length played) or the run's
/// end, then releases it. If its node is lost meanwhile, it is watched until the broker ends
/// it (counted with the broker's reason, as `sim` counts it when it happens).
async fn hold(ctx: &Ctx, session: &View, tier: &str, until: Instant) {
    let id = session.session_id.as_str();
    let mut ending: watch::Receiver<bool> = ctx.ending.clone();
    let mut lost = ctx.lost_nodes.subscribe();
    let on_lost_node = |lost: &[String]| session.node_id.as_ref().is_some_and(|n| lost.contains(n));
    let why = loop {
        if on_lost_node(&lost.borrow_and_update()) {
            match watch_lost(ctx, id, until).await {
                Some(reason) => {
                    ctx.tally().ended(reason);
                    ctx.tally().unheld(tier);
                    return;
                }
                None if *ending.borrow() => break Release::AtEnd,
                None => break Release::Played,
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => break Release::Played,
            Ok(_) = ending.wait_for(|e| *e) => break Release::AtEnd,
            Ok(()) = lost.changed() => {}
        }
    };
    // A session whose end falls after the run's is the run's to release, not an ending the
    // simulation would count.
    let why = if why == Release::Played && until > ctx.end {
        Release::AtEnd
    } else {
        why
    };
    release(ctx, id, why).await;
    ctx.tally().unheld(tier);
}

/// Polls session `id`, whose node was lost, until the broker ends it (its reason), or until
/// `until` or the run's end (`None`).
async fn watch_lost(ctx: &Ctx, id: &str, until: Instant) -> Option<String> {
    let mut ending = ctx.ending.clone();
    let path = format!("/v1/sessions/{id}");
    let poll = wall_of(1000, ctx.clock.speed).clamp(POLL_MIN, POLL_MAX);
    loop {
        if let Ok(reply) = ctx.api.call(Method::GET, &path, None, None).await
            && let Ok(v) = serde_json::from_slice::<View>(&reply.body)
            && v.state == "ended"
        {
            return Some(v.end_reason.unwrap_or_else(|| "unknown".into()));
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = tokio::time::sleep_until(until.into()) => return None,
            Ok(_) = ending.wait_for(|e| *e) => return None,
        }
    }
}

/// Ends session `id` and counts the outcome as `why` says; a session the broker had ended
/// already is counted with the broker's reason.
async fn release(ctx: &Ctx, id: &str, why: Release) {
    let path = format!("/v1/sessions/{id}");
    let deadline = Instant::now() + RETRY_LIMIT;
    let deleted = ctx
        .api
        .call_retrying(Method::DELETE, &path, None, None, deadline)
        .await;
    match deleted {
        Ok((reply, _)) if reply.status == StatusCode::NO_CONTENT => {
            let mut t = ctx.tally();
            match why {
                Release::Played => t.ended("released".into()),
                Release::GiveUp => t.abandoned += 1,
                Release::AtEnd => t.released_at_end += 1,
            }
        }
        Ok((reply, _)) if reply.status == StatusCode::NOT_FOUND => {
            // Ended by the broker before (node lost, queue timeout): say why.
            let looked = ctx
                .api
                .call_retrying(
                    Method::GET,
                    &path,
                    None,
                    None,
                    Instant::now() + CALL_TIMEOUT,
                )
                .await
                .ok()
                .and_then(|(r, _)| serde_json::from_slice::<View>(&r.body).ok());
            match looked {
                Some(v) if v.state == "ended" => {
                    ctx.tally()
                        .ended(v.end_reason.unwrap_or_else(|| "unknown".into()));
                }
                Some(_) => ctx.tally().release_failures += 1,
                // Ended, and forgotten since (a restarted broker keeps no recently ended
                // sessions): it is not held, but why it ended is lost.
                None => ctx.tally().ended("unknown".into()),
            }
        }
        Ok((reply, _)) => {
            tracing::warn!(session_id = %id, status = %reply.status, "the session could not be released");
            ctx.tally().release_failures += 1;
        }
        Err(e) => {
            tracing::warn!(session_id = %id, error = %e, "the session could not be released");
            ctx.tally().release_failures += 1;
        }
    }
}

//! One request's life in a `live` run, as a game platform lives it: allocate at the due time,
//! follow the queue until placed (or give up), hold the session for its length, release it.
//! Every wait is bounded by the request's own timers and the run's end; at the end whatever is
//! still held or queued is released.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use tokio::sync::watch;

use super::Ctx;
use super::plan::wall_of;
use super::sse::SseParser;
use crate::demand::Request;
use crate::http_client::{Api, BodyStream, CALL_TIMEOUT, CallError, SessionView, rejection_reason};

/// How long a call is retried while the broker cannot be reached (a restart).
pub(crate) const RETRY_LIMIT: Duration = Duration::from_secs(30);
/// The shortest wall-clock wait between two looks at a session that has no event stream of
/// its own (a queued request beyond the streams, a session on a lost node): the tool's own
/// polling must not crowd out the calls it measures.
const POLL_FLOOR: Duration = Duration::from_millis(250);
/// The longest: each look that finds nothing new doubles the wait up to this.
const POLL_CEILING: Duration = Duration::from_secs(2);

/// Plays request `r`; every outcome goes to the run's tally.
pub(crate) async fn play(ctx: std::sync::Arc<Ctx>, r: Request) {
    let due = ctx.clock.wall(r.at_ms);
    let epoch = ctx.restarts();
    let down_at_due = !ctx.broker_is_up();
    ctx.tally().requests += 1;
    let Some(game) = ctx.games.get(&r.genre) else {
        // The plan maps every genre of the demand and of a trace; this is a safety net.
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
    let restart = retried_for_restart(retries, down_at_due, ctx.restarts() != epoch);
    {
        let mut t = ctx.tally();
        t.answered(
            now.saturating_duration_since(due),
            now.saturating_duration_since(ctx.clock.start),
        );
        if retries > 0 {
            t.retried += 1;
        }
        if restart {
            t.retried_after_restart += 1;
        }
    }
    let view = match reply.status {
        StatusCode::CREATED | StatusCode::ACCEPTED => {
            match serde_json::from_slice::<SessionView>(&reply.body) {
                Ok(v) => v,
                Err(e) => {
                    ctx.tally()
                        .failed(CallError::BadAnswer(e.to_string()).kind());
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
        // A request that waited out a broker restart waited for its GPU as a player would;
        // one retried over a dropped connection was placed at once.
        let (wait, at_once) = if restart {
            (ctx.clock.sim_of(now.saturating_duration_since(due)), false)
        } else {
            (0, true)
        };
        ctx.tally().placed(tier, wait, at_once);
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
    let id = view.session_id.to_string();
    match follow(&ctx, &id, gives_up).await {
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
        Followed::GaveUp => release(&ctx, &id, Release::GiveUp).await,
        Followed::RunEnded => release(&ctx, &id, Release::AtEnd).await,
    }
}

/// Whether a request answered after `retries` retries was held up by the broker being away:
/// it was down at the request's due time, or a restart began while the request was tried.
/// Only such a request waited as a player would; a retry over a dropped connection did not.
fn retried_for_restart(retries: u32, down_at_due: bool, restarted_since: bool) -> bool {
    retries > 0 && (down_at_due || restarted_since)
}

/// The waits between looks at a session that has no event stream: a simulated second, but
/// at least [`POLL_FLOOR`] of wall time, doubling after each look up to [`POLL_CEILING`].
#[derive(Debug, Clone, Copy)]
struct Pace {
    next: Duration,
}

impl Pace {
    fn new(speed: f64) -> Self {
        Self {
            next: wall_of(1000, speed).clamp(POLL_FLOOR, POLL_CEILING),
        }
    }

    /// The wait before the next look.
    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(POLL_CEILING);
        d
    }
}

/// How following a queued request ended.
enum Followed {
    /// It got a GPU at this time; the session as it was then.
    Placed(Instant, SessionView),
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
/// else by polling on the run's own small pool of connections, at the [`Pace`].
async fn follow(ctx: &Ctx, id: &str, gives_up: Option<Instant>) -> Followed {
    let mut ending = ctx.ending.clone();
    let mut up = ctx.broker_up.clone();
    let path = format!("/v1/sessions/{id}/events");
    let limit = gives_up.unwrap_or(ctx.end + RETRY_LIMIT);
    let mut pace = Pace::new(ctx.clock.speed);
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
                    let mut events = Events::open(&ctx.api, &path).await.ok()?;
                    loop {
                        match events.next_view().await {
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
            Err(_) => look(&ctx.polls, id).await.filter(|v| v.state != "queued"),
        };
        match seen {
            Some(v) if v.state == "ended" => {
                return Followed::Ended(v.end_reason.unwrap_or_else(|| "unknown".into()));
            }
            Some(v) => return Followed::Placed(Instant::now(), v),
            None => {
                // Still queued, or the stream broke or could not be opened: look again later.
                tokio::select! {
                    () = tokio::time::sleep(pace.next()) => {}
                    Ok(_) = ending.wait_for(|e| *e) => return Followed::RunEnded,
                    () = tokio::time::sleep_until(limit.into()) => return Followed::GaveUp,
                }
            }
        }
    }
}

/// `GET /v1/sessions/{id}` on `api`, once; `None` when there is no usable answer.
async fn look(api: &Api, id: &str) -> Option<SessionView> {
    let reply = api
        .call(Method::GET, &format!("/v1/sessions/{id}"), None, None)
        .await
        .ok()?;
    if reply.status != StatusCode::OK {
        return None;
    }
    serde_json::from_slice::<SessionView>(&reply.body).ok()
}

/// Holds placed session `session` of `tier` until `until` (its length played) or the run's
/// end, then releases it. If its node is lost meanwhile, it is watched until the broker ends
/// it (counted with the broker's reason, as `sim` counts it when it happens).
async fn hold(ctx: &Ctx, session: &SessionView, tier: &str, until: Instant) {
    let id = session.session_id.to_string();
    let mut ending: watch::Receiver<bool> = ctx.ending.clone();
    let mut lost = ctx.lost_nodes.subscribe();
    let on_lost_node = |lost: &[String]| session.node_id.as_ref().is_some_and(|n| lost.contains(n));
    let why = loop {
        if on_lost_node(&lost.borrow_and_update()) {
            match watch_lost(ctx, &id, until).await {
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
    release(ctx, &id, why).await;
    ctx.tally().unheld(tier);
}

/// Polls session `id`, whose node was lost, until the broker ends it (its reason), or until
/// `until` or the run's end (`None`), at the [`Pace`] on the polling pool.
async fn watch_lost(ctx: &Ctx, id: &str, until: Instant) -> Option<String> {
    let mut ending = ctx.ending.clone();
    let mut pace = Pace::new(ctx.clock.speed);
    loop {
        if let Some(v) = look(&ctx.polls, id).await
            && v.state == "ended"
        {
            return Some(v.end_reason.unwrap_or_else(|| "unknown".into()));
        }
        tokio::select! {
            () = tokio::time::sleep(pace.next()) => {}
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
                .polls
                .call_retrying(
                    Method::GET,
                    &path,
                    None,
                    None,
                    Instant::now() + CALL_TIMEOUT,
                )
                .await
                .ok()
                .filter(|(r, _)| r.status == StatusCode::OK)
                .and_then(|(r, _)| serde_json::from_slice::<SessionView>(&r.body).ok());
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

/// A session's event stream (`GET /v1/sessions/{id}/events`), on a connection of its own.
struct Events {
    body: BodyStream,
    parser: SseParser,
}

impl Events {
    async fn open(api: &Api, path: &str) -> Result<Self, CallError> {
        Ok(Self {
            body: api.stream(path, "text/event-stream").await?,
            parser: SseParser::default(),
        })
    }

    /// The next session view the stream carries; `Ok(None)` when the stream ended.
    async fn next_view(&mut self) -> Result<Option<SessionView>, CallError> {
        loop {
            while let Some(event) = self.parser.next_event() {
                if let Ok(view) = serde_json::from_str::<SessionView>(&event.data) {
                    return Ok(Some(view));
                }
            }
            match self.body.next_chunk().await? {
                None => return Ok(None),
                Some(data) => self
                    .parser
                    .feed(&data)
                    .map_err(|e| CallError::BadAnswer(e.to_string()))?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_retry_over_a_restart_makes_a_placement_wait() {
        assert!(!retried_for_restart(0, false, false));
        // Answered at the first try while a restart began: it did not wait.
        assert!(!retried_for_restart(0, true, true));
        // Retried over a dropped connection: placed at once.
        assert!(!retried_for_restart(3, false, false));
        assert!(retried_for_restart(1, true, false));
        assert!(retried_for_restart(1, false, true));
    }

    #[test]
    fn polls_are_at_least_a_quarter_second_apart_and_back_off_to_two() {
        let waits = |speed: f64| {
            let mut p = Pace::new(speed);
            (0..6).map(|_| p.next().as_millis()).collect::<Vec<_>>()
        };
        assert_eq!(waits(60.0), [250, 500, 1000, 2000, 2000, 2000]);
        assert_eq!(waits(2.0), [500, 1000, 2000, 2000, 2000, 2000]);
        // A simulated second longer than the ceiling: the ceiling.
        assert_eq!(waits(0.1), [2000; 6]);
    }
}

//! One step: N players at once allocate, connect over WHEP and get their first frame, play
//! together for the step's length, and are released.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio::task::JoinSet;

use framecast_shared::ids::SessionId;

use super::http::{self, Allocation, Broker};
use super::player::Player;
use super::streams::{PassRule, StepResult, StreamOutcome};

/// What every step shares.
#[derive(Debug, Clone)]
pub(crate) struct StepContext {
    /// The broker's API.
    pub(crate) broker: Broker,
    /// The game the players ask for.
    pub(crate) game: String,
    /// The tier they ask for.
    pub(crate) tier: String,
    /// The rule the step is judged by.
    pub(crate) rule: PassRule,
    /// How long the players play together.
    pub(crate) play: Duration,
    /// How long a player may take from its allocation request to its first frame.
    pub(crate) connect: Duration,
    /// Progress units (whole seconds) the play stands for.
    pub(crate) units: u64,
}

/// What a step did.
#[derive(Debug)]
pub(crate) struct Step {
    /// Its result by the rule.
    pub(crate) result: StepResult,
    /// Request to answer of every `POST /v1/sessions` the broker answered.
    pub(crate) allocation_latency: Vec<Duration>,
    /// `POST /v1/sessions` sent.
    pub(crate) requests: u64,
    /// Sessions placed (201).
    pub(crate) placed: u64,
    /// Requests refused, per reason (`no-answer-<kind>` for those with no usable answer).
    pub(crate) rejected: BTreeMap<String, u64>,
    /// Sessions the broker ended on our `DELETE` (204).
    pub(crate) released: u64,
    /// Sessions that had ended before their `DELETE` (404).
    pub(crate) already_ended: u64,
}

/// One player's way to its first frame.
struct Opened {
    /// Whether the broker placed it (201).
    placed: bool,
    /// Request to answer, when the broker answered.
    allocation_latency: Option<Duration>,
    /// Why the broker refused it, or why it got no usable answer.
    rejected: Option<String>,
    /// The peer, once made.
    player: Option<Player>,
    /// Time to first frame, or what failed.
    result: Result<Duration, String>,
}

/// Runs a step of `n` players. Every session allocated is released, and every peer closed,
/// before it returns; whether the broker has let go of them is the caller's to check.
pub(crate) async fn run(cx: &StepContext, n: u32, progress: &ProgressBar) -> Step {
    let epoch = Instant::now();
    let deadline = epoch + cx.connect;
    // Sessions are noted here as soon as the broker creates them, so they are released even
    // if their player's task fails.
    let sessions: Arc<Mutex<Vec<SessionId>>> = Arc::default();
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let cx = cx.clone();
        let sessions = Arc::clone(&sessions);
        tasks.spawn(async move { open(&cx, n, i, epoch, deadline, &sessions).await });
    }
    let mut opened = Vec::with_capacity(n as usize);
    while let Some(joined) = tasks.join_next().await {
        opened.push(joined.unwrap_or_else(|e| Opened {
            placed: false,
            allocation_latency: None,
            rejected: None,
            player: None,
            result: Err(format!("the player's task failed: {e}")),
        }));
    }

    // All players have their first frame or have failed: they play together.
    let start = epoch.elapsed();
    let playing = Instant::now();
    let until = playing + cx.play;
    let mut ticked = 0;
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        tokio::time::sleep((until - now).min(Duration::from_secs(1))).await;
        let due = playing.elapsed().as_secs().min(cx.units);
        if due > ticked {
            progress.inc(due - ticked);
            ticked = due;
        }
    }
    let end = epoch.elapsed();

    let outcomes: Vec<StreamOutcome> = opened
        .iter()
        .map(|o| match (&o.result, &o.player) {
            (Ok(ttff), Some(p)) => StreamOutcome::Played {
                ttff: *ttff,
                stats: p.stats(start, end, cx.rule.freeze),
            },
            (Err(e), _) => StreamOutcome::Failed { error: e.clone() },
            (Ok(_), None) => StreamOutcome::Failed {
                error: "no player".into(),
            },
        })
        .collect();
    let result = cx.rule.judge(&outcomes);

    let mut step = Step {
        result,
        allocation_latency: opened.iter().filter_map(|o| o.allocation_latency).collect(),
        requests: opened.len() as u64,
        placed: opened.iter().filter(|o| o.placed).count() as u64,
        rejected: BTreeMap::new(),
        released: 0,
        already_ended: 0,
    };
    for o in &opened {
        if let Some(reason) = &o.rejected {
            *step.rejected.entry(reason.clone()).or_default() += 1;
        }
    }
    let sessions = std::mem::take(&mut *sessions.lock().unwrap_or_else(PoisonError::into_inner));
    release(cx, sessions, &mut step).await;
    close_all(opened).await;
    step
}

/// Allocates, connects and waits for the first frame of player `i` of a step of `n`.
async fn open(
    cx: &StepContext,
    n: u32,
    i: u32,
    epoch: Instant,
    deadline: Instant,
    sessions: &Mutex<Vec<SessionId>>,
) -> Opened {
    let asked_at = epoch.elapsed();
    let mut o = Opened {
        placed: false,
        allocation_latency: None,
        rejected: None,
        player: None,
        result: Err(String::new()),
    };
    let sent = Instant::now();
    let player_id = format!("loadtest-webrtc-{n}-{i}");
    let placed = match cx.broker.allocate(&cx.game, &cx.tier, &player_id).await {
        Err(e) => {
            // Counted, so that a broker that does not answer shows in the report.
            o.rejected = Some(e.rejection());
            o.result = Err(e.to_string());
            return o;
        }
        Ok(Allocation::Refused {
            reason,
            detail,
            session,
        }) => {
            o.allocation_latency = Some(sent.elapsed());
            if let Some(s) = session {
                note(sessions, s);
            }
            o.rejected = Some(reason);
            o.result = Err(format!("POST /v1/sessions: {detail}"));
            return o;
        }
        Ok(Allocation::Placed(placed)) => {
            o.allocation_latency = Some(sent.elapsed());
            o.placed = true;
            note(sessions, placed.id);
            placed
        }
    };
    let (player, offer) = match Player::new(epoch).await {
        Ok(p) => p,
        Err(e) => {
            o.result = Err(e.to_string());
            return o;
        }
    };
    let player = o.player.insert(player);
    o.result = async {
        let answer = http::whep_offer(&placed, offer)
            .await
            .map_err(|e| e.to_string())?;
        player.accept(answer).await.map_err(|e| e.to_string())?;
        let first = player
            .first_frame(deadline)
            .await
            .map_err(|e| e.to_string())?;
        Ok(first.saturating_sub(asked_at))
    }
    .await;
    o
}

fn note(sessions: &Mutex<Vec<SessionId>>, session: SessionId) {
    sessions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(session);
}

/// `DELETE`s every session of the step, counting what the broker said.
async fn release(cx: &StepContext, sessions: Vec<SessionId>, step: &mut Step) {
    let mut tasks = JoinSet::new();
    for s in sessions {
        let broker = cx.broker.clone();
        tasks.spawn(async move { broker.release(&s).await });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(true)) => step.released += 1,
            Ok(Ok(false)) => step.already_ended += 1,
            // The caller's wait for an empty fleet catches a session left behind.
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing a session failed"),
            Err(e) => tracing::warn!(error = %e, "a release task failed"),
        }
    }
}

/// Hangs up every player at once.
async fn close_all(opened: Vec<Opened>) {
    let mut tasks = JoinSet::new();
    for p in opened.into_iter().filter_map(|o| o.player) {
        tasks.spawn(async move { p.close().await });
    }
    while tasks.join_next().await.is_some() {}
}

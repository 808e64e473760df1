//! The service's clock: every tick runs the engine's timers, judges node liveness from
//! heartbeats, ends sessions that no agent reported after a restart, runs the pool planner's
//! rounds when due, and turns the engine's events into effects. It also wakes early when
//! something changed.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::time::Timestamp;

use super::Broker;

/// How often the driver runs when nothing wakes it.
pub const TICK: Duration = Duration::from_millis(200);

/// Runs until `shutdown` turns true.
pub async fn run(broker: Broker, mut shutdown: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = Instant::now();
    loop {
        // A wake-up (something changed) only drains the engine's events; the scans over every
        // node and session run on the timed tick.
        let timed = tokio::select! {
            _ = ticks.tick() => true,
            () = broker.inner.wake.notified() => false,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        if timed {
            liveness(&broker);
            orphans(&broker).await;
            broker.end_overdue(Timestamp::now()).await;
            // A round only when one is due (`planner.round_every_s`).
            broker.plan_round(Timestamp::now());
        }
        broker.tick(Timestamp::now()).await;
        if last_sweep.elapsed() >= Duration::from_secs(3600) {
            last_sweep = Instant::now();
            let store = broker.inner.store.clone();
            let swept = tokio::task::spawn_blocking(move || {
                store.expire_idempotency(Timestamp::now(), super::IDEMPOTENCY_TTL)
            })
            .await;
            tracing::debug!(?swept, "idempotency keys expired");
        }
    }
}

/// Marks nodes whose heartbeats are late suspect, and down after longer.
fn liveness(broker: &Broker) {
    let c = &broker.inner.config.control;
    let suspect_after = Duration::from_millis(u64::from(c.suspect_after_ms));
    let down_after = Duration::from_millis(u64::from(c.down_after_ms));
    let now = Timestamp::now();
    let mut changes = Vec::new();
    for mut seen in broker.inner.seen.iter_mut() {
        let silent = seen.last.elapsed();
        if silent >= down_after && !seen.down {
            seen.down = true;
            changes.push((seen.key().clone(), true));
        } else if silent >= suspect_after && !seen.suspect {
            seen.suspect = true;
            changes.push((seen.key().clone(), false));
        }
    }
    for (node, down) in changes {
        let mut st = broker.state();
        let r = if down {
            tracing::warn!(node_id = %node, "node down: no heartbeat");
            st.engine.node_down(&node, now)
        } else {
            tracing::warn!(node_id = %node, "node suspect: heartbeats late");
            st.engine.set_suspect(&node, true, now)
        };
        if let Err(e) = r {
            tracing::warn!(node_id = %node, error = %e, "liveness change not applied");
        }
    }
}

/// The longest an agent waits between reconnect attempts (its link's backoff cap).
const AGENT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// After a restart, placed sessions wait for their agents' hellos (a hello ends at once those
/// its agent does not report, see `control`); those whose agent has not said hello within the
/// down timeout, the node-lost grace and an agent's longest reconnect backoff end with
/// `node-lost`, a lapsed reservation too: until its agent's hello the broker cannot know
/// whether the player connected while it was away.
async fn orphans(broker: &Broker) {
    let c = &broker.inner.config.control;
    let grace = Duration::from_millis(u64::from(c.down_after_ms) + u64::from(c.node_lost_grace_ms))
        + AGENT_BACKOFF_MAX;
    if broker.inner.started.elapsed() < grace {
        return;
    }
    let (lost, unplaceable) = {
        let mut st = broker.state();
        let lost: Vec<_> = st
            .sessions
            .values()
            .filter(|e| e.awaiting_agent && e.record.state != SessionState::Queued)
            .filter(|e| st.engine.session_state(&e.record.session_id).is_none())
            .map(|e| e.record.session_id)
            .collect();
        (lost, std::mem::take(&mut st.requeue))
    };
    for id in lost {
        tracing::warn!(session_id = %id, "no agent reported this session since the broker started");
        // Tell its agent, if it is connected after all, so no slot stays held there.
        broker.end(&id, EndReason::NodeLost, true).await;
    }
    for id in unplaceable {
        tracing::warn!(session_id = %id, "a queued session from before the restart names no region with nodes");
        broker.end(&id, EndReason::Expired, false).await;
    }
}

//! The broker side of a `live` run: the in-process deployment the tool starts (or the existing
//! broker it is pointed at), the wait until every agent is connected, the fleet samples of the
//! timeline, the faults, and the final sweep of sessions left behind.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};

use framecast_broker::dev::{Dev, DevOptions, Tune, start_dev};
use framecast_shared::ids::{NodeId, SessionId};

use super::plan::{Plan, Target, plan_pools, scale_timers};
use super::tally::{PlanBody, PoolBody};
use super::{Ctx, LiveError};
use crate::http_client::{self, Api, Fleet, FleetError, problem_detail};
use crate::report::Sample;
use crate::scenario::Fault;

/// The longest wait for the in-process agents to connect.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// The longest the in-process deployment takes to stop.
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// How often the fleet is sampled, simulated seconds (as `sim` does).
const SAMPLE_EVERY_S: u64 = 60;
/// The longest the final sweep takes.
const SWEEP_LIMIT: Duration = Duration::from_secs(60);

/// The broker a run talks to.
pub(crate) struct Deployment {
    /// The in-process one (the faults borrow it while the run goes on).
    pub dev: Option<Dev>,
    /// Its state, when under `--data-dir` (removed when the deployment is stopped or
    /// dropped).
    own_dir: Option<OwnDir>,
    /// Where its API is.
    pub addr: SocketAddr,
    /// How requests name it.
    pub host: String,
    /// The API key.
    pub api_key: String,
    /// Its nodes, in order (the in-process ones; a node-loss fault takes the first).
    pub nodes: Vec<NodeId>,
}

impl Deployment {
    /// Starts the in-process broker and agents the plan asks for, or finds the existing broker.
    pub(crate) async fn start(plan: &Plan) -> Result<Self, LiveError> {
        match &plan.target {
            Target::External { authority, api_key } => {
                let addr = tokio::net::lookup_host(authority.as_str())
                    .await
                    .map_err(|e| LiveError::Broker(format!("{authority}: {e}")))?
                    .next()
                    .ok_or_else(|| LiveError::Broker(format!("{authority} has no address")))?;
                Ok(Self {
                    dev: None,
                    own_dir: None,
                    addr,
                    host: authority.clone(),
                    api_key: api_key.clone(),
                    nodes: Vec::new(),
                })
            }
            Target::Own {
                nodes,
                gpus_toml,
                data_dir,
                ..
            } => {
                let api_key = format!("live-{}", uuid::Uuid::new_v4().simple());
                // Removed on every path from here, a failed start included.
                let own_dir = data_dir.as_ref().map(|d| {
                    OwnDir(d.join(format!("framecast-live-{}", uuid::Uuid::new_v4().simple())))
                });
                let (speed, wall) = (plan.speed, plan.wall_length());
                let pools = plan.pools.clone();
                let options = DevOptions {
                    nodes: *nodes,
                    gpus_toml: gpus_toml.clone(),
                    http: SocketAddr::from(([127, 0, 0, 1], 0)),
                    data_dir: own_dir.as_ref().map(|d| d.0.clone()),
                    api_key: api_key.clone(),
                    tune: Some(Tune::new(move |c| {
                        scale_timers(c, speed, wall);
                        plan_pools(c, &pools, speed);
                    })),
                };
                let dev = start_dev(options)
                    .await
                    .map_err(|e| LiveError::Deploy(format!("{e:#}")))?;
                let addr = dev.broker().http;
                let node_ids = dev.nodes();
                Ok(Self {
                    dev: Some(dev),
                    own_dir,
                    addr,
                    host: addr.to_string(),
                    api_key,
                    nodes: node_ids,
                })
            }
        }
    }

    /// Stops the in-process deployment, if any, bounded; removes its state.
    pub(crate) async fn stop(mut self) {
        if let Some(dev) = self.dev.take()
            && tokio::time::timeout(STOP_LIMIT, dev.stop()).await.is_err()
        {
            tracing::warn!(
                "the in-process deployment did not stop within {} s",
                STOP_LIMIT.as_secs()
            );
        }
        // After the deployment, which writes in it.
        drop(self.own_dir.take());
    }
}

/// A run's own state directory under `--data-dir`: a lease on it, removed when dropped.
#[derive(Debug)]
struct OwnDir(PathBuf);

impl Drop for OwnDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %self.0.display(), error = %e, "the run's state was not removed")
            }
        }
    }
}

/// Checks the API key and, for the in-process fleet, waits until every agent is connected;
/// the fleet's nodes and GPUs (from `GET /v1/nodes`, or `fallback` where the key may not
/// list nodes).
pub(crate) async fn ready(
    api: &Api,
    want_nodes: usize,
    fallback: (u64, u64),
) -> Result<(u64, u64), LiveError> {
    let pools = api
        .call(Method::GET, "/v1/pools", None, None)
        .await
        .map_err(|e| LiveError::Broker(e.to_string()))?;
    match pools.status {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => {
            return Err(LiveError::Broker(format!(
                "the broker refused the API key: {}",
                problem_detail(&pools.body)
            )));
        }
        s => {
            return Err(LiveError::Broker(format!(
                "GET /v1/pools: {s} {}",
                problem_detail(&pools.body)
            )));
        }
    }
    match http_client::wait_for_agents(api, want_nodes as u64, READY_LIMIT).await {
        Ok(nodes) => {
            let fleet = Fleet::of(&nodes);
            Ok((fleet.connected, fleet.gpus))
        }
        Err(FleetError::Status {
            status: StatusCode::FORBIDDEN,
            ..
        }) if want_nodes == 0 => {
            tracing::warn!("this API key may not list nodes: the timeline has no GPU figures");
            Ok(fallback)
        }
        Err(e @ FleetError::Absent { .. }) => Err(LiveError::Deploy(e.to_string())),
        Err(e) => Err(LiveError::Broker(e.to_string())),
    }
}

/// Samples the fleet once a simulated minute, from 0 to before the end of the run, best
/// effort; the sample at the end is the run's to take ([`sample_at`]) before it releases
/// anything.
pub(crate) async fn sample(ctx: Arc<Ctx>, duration_ms: u64) -> Vec<Sample> {
    let mut timeline = Vec::new();
    let mut ending = ctx.ending.clone();
    let mut at_ms = 0u64;
    while at_ms < duration_ms {
        let at = ctx.clock.wall(at_ms);
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            Ok(_) = ending.wait_for(|e| *e) => {}
        }
        // An early end takes no more.
        if ctx.aborted.load(Ordering::Relaxed) || Instant::now() < at {
            break;
        }
        timeline.extend(sample_at(&ctx, at_ms).await);
        at_ms += SAMPLE_EVERY_S * 1000;
    }
    timeline
}

/// The fleet now, as the sample at simulated `at_ms`, from the lookup pool; none while the
/// broker restarts or when it lists neither nodes nor pools.
pub(crate) async fn sample_at(ctx: &Ctx, at_ms: u64) -> Option<Sample> {
    if !ctx.broker_is_up() {
        return None;
    }
    let nodes = http_client::nodes(&ctx.polls).await.ok();
    let pools = read::<Vec<PoolBody>>(&ctx.polls, "/v1/pools").await;
    if nodes.is_none() && pools.is_none() {
        return None;
    }
    // Operators only: without it the run has no warm figures. Not read when the tool's own
    // broker runs no planner (an existing broker's policy is learned from it).
    let planless = ctx.tally().pools == "none";
    let plan = if planless {
        None
    } else {
        read::<PlanBody>(&ctx.polls, "/v1/pools/plan").await
    };
    Some(ctx.tally().sample(
        at_ms / 1000,
        nodes.as_deref(),
        pools.as_deref(),
        plan.as_ref(),
    ))
}

async fn read<T: serde::de::DeserializeOwned>(api: &Api, path: &str) -> Option<T> {
    let reply = api.call(Method::GET, path, None, None).await.ok()?;
    if reply.status != StatusCode::OK {
        return None;
    }
    serde_json::from_slice(&reply.body).ok()
}

/// Applies the scenario's faults at their times to the in-process deployment until the run
/// ends; the error that stopped them, if any.
pub(crate) async fn faults(
    ctx: &Ctx,
    dev: &mut Dev,
    nodes: &[NodeId],
    faults: Vec<Fault>,
) -> Option<String> {
    let mut faults = faults;
    faults.sort_by_key(Fault::at_s);
    let mut ending = ctx.ending.clone();
    for f in faults {
        let at = ctx.clock.wall(f.at_s().saturating_mul(1000));
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            Ok(_) = ending.wait_for(|e| *e) => break,
        }
        match f {
            Fault::NodeLoss { nodes: count, .. } => {
                for node in nodes.iter().take(count) {
                    tracing::info!(node_id = %node, "fault: stopping the node's agent");
                    dev.stop_agent(node).await;
                    ctx.lost_nodes.send_modify(|l| l.push(node.to_string()));
                }
                ctx.tally().nodes_lost += count as u64;
            }
            Fault::BrokerRestart { .. } => {
                tracing::info!("fault: restarting the broker");
                ctx.restarts.fetch_add(1, Ordering::Relaxed);
                let _ = ctx.up_tx.send(false);
                let restarted = dev.restart_broker().await;
                ctx.tally().broker_restarts += 1;
                if let Err(e) = restarted {
                    // The deployment has no broker now: the run cannot go on.
                    ctx.aborted.store(true, Ordering::Relaxed);
                    let _ = ctx.end_tx.send(true);
                    return Some(format!("the broker did not restart: {e:#}"));
                }
                let _ = ctx.up_tx.send(true);
            }
        }
    }
    None
}

/// Releases what this run left on the broker (sessions whose player id carries `run_id`):
/// the safety net behind the players' own releases. How many it released.
pub(crate) async fn sweep(api: &Api, run_id: &str) -> u64 {
    #[derive(serde::Deserialize)]
    struct Page {
        #[serde(default)]
        sessions: Vec<Listed>,
        #[serde(default)]
        next: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Listed {
        session_id: SessionId,
        #[serde(default)]
        player_id: String,
    }
    let prefix = format!("{run_id}-");
    let work = async {
        let mut released = 0u64;
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(a) => format!("/v1/sessions?limit=1000&after={a}"),
                None => "/v1/sessions?limit=1000".to_owned(),
            };
            let Some(page) = api
                .call(Method::GET, &path, None, None)
                .await
                .ok()
                .filter(|r| r.status == StatusCode::OK)
                .and_then(|r| serde_json::from_slice::<Page>(&r.body).ok())
            else {
                break;
            };
            for s in page
                .sessions
                .iter()
                .filter(|s| s.player_id.starts_with(&prefix))
            {
                let path = format!("/v1/sessions/{}", s.session_id);
                if api
                    .call(Method::DELETE, &path, None, None)
                    .await
                    .is_ok_and(|r| r.status == StatusCode::NO_CONTENT)
                {
                    released += 1;
                }
            }
            match page.next {
                Some(n) if after.as_ref() != Some(&n) => after = Some(n),
                _ => break,
            }
        }
        released
    };
    tokio::time::timeout(SWEEP_LIMIT, work).await.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runs_own_dir_is_removed_when_its_lease_ends() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("framecast-live-x");
        std::fs::create_dir_all(dir.join("broker")).unwrap();
        std::fs::write(dir.join("broker/store"), b"x").unwrap();
        drop(OwnDir(dir.clone()));
        assert!(!dir.exists());
        // One that was never made (the start failed before it) is no error.
        drop(OwnDir(dir.clone()));
    }
}

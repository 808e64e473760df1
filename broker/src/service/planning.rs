//! The pool planner in the service: what feeds it, when it runs, and where its plans go.
//!
//! The planner is a sans-IO core ([`crate::planner`]) kept beside the engine in the service's
//! state, so feeding it costs no lock of its own: a request, a placement (warm or cold, as the
//! agent answered) and a session end are recorded in the critical sections that already hold
//! the engine. The driver runs a round every `planner.round_every_s` (checked on its 200 ms
//! ticks): the planner compares its intent with what the agents report (through the engine),
//! and the round's steering is applied to the engine under the same lock. Then, outside the
//! lock, each node whose plan changed is sent its `PoolPlan` over its control link.
//!
//! Reconcile: an agent reports the newest plan it applied in every heartbeat. A plan not
//! reported back within three heartbeats (or one round, if longer) is sent again, and a
//! reconnecting agent is sent its node's newest plan with its welcome, so a plan lost with a
//! link is not lost for good. The planner itself re-plans what the agents report building.
//!
//! Generations on the wire: agents apply only a plan newer than the one they hold, and keep
//! theirs across broker restarts. So the generation sent is `epoch + the planner's
//! generation`, with `epoch` the wall clock in milliseconds at start: the planner's generation
//! grows by at most one per round and `round_every_s` is at least 0.2 s, so a broker started
//! later always numbers above one that ran before it. Should a node report a newer generation
//! than this broker ever sent it (the clock stepped back), the epoch moves past it and every
//! plan goes out again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use framecast_shared::config::planner::PlannerConfig as PlannerSection;
use framecast_shared::ids::{GameId, NodeId, RegionName, TierName};
use framecast_shared::protocol::{Message, PoolPlan};
use framecast_shared::time::Timestamp;

use super::Broker;
use super::webhook::FleetNeed;
use crate::placement::Engine;
use crate::planner::{
    DemandKey, Planner, PlannerConfig, PlannerConfigError, PlannerCounters, ProfileView,
    Recommendation, Round, TargetView,
};

/// The planner's last round, as the API and the metrics show it.
#[derive(Debug, Clone)]
pub struct PlanView {
    /// The generation its plans were sent with.
    pub generation: u64,
    /// When it ran.
    pub generated_at: Timestamp,
    /// GPU changes it made (profile or warm targets).
    pub changes: usize,
    /// Plan vs observed per (region, tier, game).
    pub targets: Vec<TargetView>,
    /// GPUs per (region, model, tier) profile, planned vs observed.
    pub profiles: Vec<ProfileView>,
    /// Nodes each (region, GPU model) needs.
    pub recommendation: Vec<Recommendation>,
    /// Planned nodes whose agent had not reported its newest plan back at the round.
    pub lagging: usize,
}

/// What the service keeps of the planner: the core, the newest plan per node and the last
/// round.
pub(crate) struct Planning {
    planner: Planner,
    round_every: Duration,
    resend_after: Duration,
    next_round: Instant,
    epoch: u64,
    /// The newest plan for each node the planner planned, and when it was last sent.
    plans: BTreeMap<NodeId, NodePlan>,
    last: Option<Arc<PlanView>>,
    /// The recommendation last handed to the webhook, without its timestamp.
    published: Vec<(String, String, u32, u32)>,
}

struct NodePlan {
    /// The planner's generation of the round that made it.
    round: u64,
    plan: PoolPlan,
    sent: Option<Instant>,
}

impl std::fmt::Debug for Planning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planning")
            .field("epoch", &self.epoch)
            .field("plans", &self.plans.len())
            .finish_non_exhaustive()
    }
}

impl Planning {
    /// The planner `section` describes, or `None` when it is off. `heartbeat` is the agents'
    /// heartbeat interval (a plan is sent again when no heartbeat reported it for a few).
    pub(crate) fn new(
        section: &PlannerSection,
        heartbeat: Duration,
    ) -> Result<Option<Self>, PlannerConfigError> {
        if !section.enabled {
            return Ok(None);
        }
        let config = PlannerConfig::from(section);
        // The loaded configuration was validated already; this only guards a broker built
        // from a config that never went through `load`.
        config.validate()?;
        let round_every = section.round_every();
        Ok(Some(Self {
            planner: Planner::new(config),
            round_every,
            resend_after: resend_after(round_every, heartbeat),
            // The first round waits one interval: agents connect and report first.
            next_round: Instant::now() + round_every,
            epoch: Timestamp::now().as_millis(),
            plans: BTreeMap::new(),
            last: None,
            published: Vec::new(),
        }))
    }

    /// A request for `game` at `tier` in `region` arrived.
    pub(crate) fn request(&mut self, region: &RegionName, tier: &TierName, game: &GameId) {
        self.planner
            .observe_request(&key(region, tier, game), Timestamp::now());
    }

    /// A session was placed and its agent holds it, on a warm instance or launching cold.
    pub(crate) fn placed(
        &mut self,
        region: &RegionName,
        tier: &TierName,
        game: &GameId,
        warm: bool,
    ) {
        self.planner
            .observe_placement(&key(region, tier, game), warm, Timestamp::now());
    }

    /// A session that held a slot for `length` ended.
    pub(crate) fn ended(
        &mut self,
        region: &RegionName,
        tier: &TierName,
        game: &GameId,
        length: Duration,
    ) {
        self.planner
            .observe_session_end(&key(region, tier, game), length, Timestamp::now());
    }

    /// The newest plan for `node`, stamped as sent now (for an agent that just said hello).
    pub(crate) fn take_for_hello(&mut self, node: &NodeId) -> Option<PoolPlan> {
        let p = self.plans.get_mut(node)?;
        p.sent = Some(Instant::now());
        Some(p.plan.clone())
    }

    /// The last round.
    pub(crate) fn last(&self) -> Option<Arc<PlanView>> {
        self.last.clone()
    }

    /// The generation last sent to `node`, if it was planned.
    pub(crate) fn sent_generation(&self, node: &NodeId) -> Option<u64> {
        self.plans.get(node).map(|p| p.plan.plan_generation)
    }

    /// Runs a round when one is due: the planner's round over `engine`, its steering applied,
    /// its plans stamped and kept. Returns the plans to send (changed ones, and ones no
    /// heartbeat has reported back in time) and the recommendation when it changed.
    fn round(&mut self, engine: &mut Engine, now: Timestamp) -> Option<RoundOutput> {
        let started = Instant::now();
        if started < self.next_round {
            return None;
        }
        self.next_round = started + self.round_every;
        let round = self.planner.round(engine, now);
        if let Err(e) = round.apply_steering(engine) {
            // A GPU that left since the round; the next round forgets it.
            tracing::warn!(error = %e, "steering not applied in full");
        }
        let Round {
            generation,
            plans,
            targets,
            profiles,
            recommendation,
            changes,
            ..
        } = round;
        let wire = self.epoch.saturating_add(generation);
        for (node, mut plan) in plans {
            plan.plan_generation = wire;
            let reprofiled = self.plans.get(&node).map_or(0, |old| {
                plan.gpus
                    .iter()
                    .filter(|g| {
                        old.plan
                            .gpus
                            .iter()
                            .any(|o| o.gpu == g.gpu && o.profile != g.profile)
                    })
                    .count()
            });
            if reprofiled > 0 {
                metrics::counter!(crate::metrics::POOL_REPROFILES, "cause" => "plan")
                    .increment(reprofiled as u64);
            }
            self.plans.insert(
                node,
                NodePlan {
                    round: generation,
                    plan,
                    sent: None,
                },
            );
        }
        // A node reporting a newer generation than this broker ever sent it holds another
        // broker's plan and would ignore every one of ours: move the epoch past it (every
        // plan then goes out again with the new numbers).
        let foreign = self
            .plans
            .iter()
            .map(|(node, p)| (reported(engine, node), p.plan.plan_generation))
            .filter(|(got, sent)| got > sent)
            .map(|(got, _)| got)
            .max();
        if let Some(newest) = foreign {
            tracing::warn!(
                reported = newest,
                epoch = self.epoch,
                "an agent holds a newer pool plan than this broker sent; renumbering"
            );
            self.epoch = newest.saturating_add(1);
            for p in self.plans.values_mut() {
                p.plan.plan_generation = self.epoch.saturating_add(p.round);
                p.sent = None;
            }
        }
        // Plans of nodes the engine forgot go with them.
        self.plans
            .retain(|node, _| engine.fleet().node_idx.contains_key(node));
        // What to send: plans never sent, and plans sent a while ago that the node's
        // heartbeats still do not report.
        let mut send = Vec::new();
        let mut lagging = 0usize;
        for (node, p) in &mut self.plans {
            let applied = reported(engine, node) >= p.plan.plan_generation;
            if applied {
                continue;
            }
            lagging += 1;
            let due = p
                .sent
                .is_none_or(|at| started.saturating_duration_since(at) >= self.resend_after);
            if due {
                send.push((node.clone(), p.plan.clone()));
            }
        }
        let needs: Vec<(String, String, u32, u32)> = recommendation
            .iter()
            .map(|r| {
                (
                    r.region.to_string(),
                    r.model.clone(),
                    r.nodes_needed,
                    r.nodes_present,
                )
            })
            .collect();
        let changed_needs = (needs != self.published).then(|| {
            self.published = needs;
            Arc::new(
                recommendation
                    .iter()
                    .map(|r| FleetNeed {
                        region: r.region.to_string(),
                        model: r.model.clone(),
                        nodes_needed: r.nodes_needed,
                        nodes_present: r.nodes_present,
                        generated_at: now.rfc3339(),
                    })
                    .collect::<Vec<_>>(),
            )
        });
        self.last = Some(Arc::new(PlanView {
            generation: self.epoch.saturating_add(generation),
            generated_at: now,
            changes,
            targets,
            profiles,
            recommendation,
            lagging,
        }));
        metrics::histogram!(crate::metrics::POOL_ROUND_SECONDS)
            .record(started.elapsed().as_secs_f64());
        Some(RoundOutput {
            send,
            needs: changed_needs,
        })
    }

    /// Notes that `node`'s plan went out now.
    fn mark_sent(&mut self, node: &NodeId, generation: u64) {
        if let Some(p) = self
            .plans
            .get_mut(node)
            .filter(|p| p.plan.plan_generation == generation)
        {
            p.sent = Some(Instant::now());
        }
    }
}

/// What a round hands the async shell.
struct RoundOutput {
    send: Vec<(NodeId, PoolPlan)>,
    needs: Option<Arc<Vec<FleetNeed>>>,
}

impl Broker {
    /// Runs a planner round if one is due, applies it and sends its plans; the driver calls
    /// this on its timed ticks.
    pub(crate) fn plan_round(&self, now: Timestamp) {
        let output = {
            let mut st = self.state();
            let st = &mut *st;
            let Some(planning) = st.planning.as_mut() else {
                return;
            };
            planning.round(&mut st.engine, now)
        };
        let Some(output) = output else { return };
        // Steered GPUs may free or hold capacity the queue waits for.
        self.inner.wake.notify_one();
        let mut sent = Vec::new();
        for (node, plan) in output.send {
            let Some(tx) = self.inner.links.get(&node).map(|l| l.tx.clone()) else {
                // Not connected: it gets the plan with its next welcome.
                continue;
            };
            let generation = plan.plan_generation;
            // Never wait on a slow agent here: a full queue leaves the plan unsent, and the
            // next round tries again.
            match tx.try_send(Message::PoolPlan(plan)) {
                Ok(()) => {
                    tracing::debug!(node_id = %node, generation, "pool plan sent");
                    sent.push((node, generation));
                }
                Err(e) => {
                    tracing::debug!(node_id = %node, error = %e, "pool plan not sent; next round")
                }
            }
        }
        if let Some((_, generation)) = sent.first() {
            tracing::info!(generation, nodes = sent.len(), "pool plans sent");
        }
        if !sent.is_empty()
            && let Some(planning) = self.state().planning.as_mut()
        {
            for (node, generation) in &sent {
                planning.mark_sent(node, *generation);
            }
        }
        if let Some(needs) = output.needs {
            self.inner.recommendation.send_replace(Some(needs));
        }
    }

    /// The planner's last round; `None` while it is off or before its first round.
    pub fn plan_view(&self) -> Option<Arc<PlanView>> {
        self.state().planning.as_ref().and_then(Planning::last)
    }

    /// Whether the pool planner runs.
    pub fn planner_enabled(&self) -> bool {
        self.state().planning.is_some()
    }

    /// The pool planner's running totals, up to the last placement; `None` while it is off.
    pub fn planner_counters(&self) -> Option<PlannerCounters> {
        self.state().planning.as_ref().map(|p| p.planner.counters())
    }

    /// Per node: the pool-plan generation last sent to it (if the planner planned it) and the
    /// one its agent reports applied (0 before it reported any).
    pub fn plan_generations(&self) -> BTreeMap<NodeId, (Option<u64>, u64)> {
        let st = self.state();
        let sent = |node: &NodeId| st.planning.as_ref().and_then(|p| p.sent_generation(node));
        st.engine
            .fleet()
            .nodes
            .iter()
            .map(|n| (n.id.clone(), (sent(&n.id), n.plan_generation)))
            .collect()
    }
}

/// How long a sent plan may go unreported before it is sent again: three heartbeats or one
/// round, whichever is longer.
fn resend_after(round_every: Duration, heartbeat: Duration) -> Duration {
    (heartbeat * 3).max(round_every)
}

/// The plan generation `node`'s agent reports applied (0 before it reported one, or for a
/// node the engine does not know).
fn reported(engine: &Engine, node: &NodeId) -> u64 {
    let fleet = engine.fleet();
    fleet
        .node_idx
        .get(node)
        .and_then(|&i| fleet.node(i))
        .map_or(0, |n| n.plan_generation)
}

fn key(region: &RegionName, tier: &TierName, game: &GameId) -> DemandKey {
    DemandKey::new(region.clone(), tier.clone(), game.clone())
}

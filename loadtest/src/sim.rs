//! The `sim` engine: a discrete-event simulation on a virtual clock that drives the real
//! placement engine in-process. No sockets, no threads, no wall clock: the same scenario and
//! seed give the same report, and a simulated day of a 10 000-node fleet runs in under a
//! minute.
//!
//! Every second of simulated time the engine's timers run (queue timeouts, reconnect and
//! node-loss grace) and what it did on its own (queued requests placed, sessions ended) is
//! taken in; every minute the fleet's use is sampled for the timeline.
//!
//! With warm pools (`[pools] policy`, `--pools`), simulated node agents keep warm game
//! instances as their pool plans ask (see the `pools` module): a player placed on one starts
//! at once, any other waits `launch_s` for its game to start.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

use framecast_broker::placement::fleet::NodeIdx;
use framecast_broker::placement::request::EngineEvent;
use framecast_broker::placement::{
    Decision, Engine, EngineConfig, PlaceRequest, Placement, Priority, RegionRtt, bound, simulated,
    strategy,
};
use framecast_shared::genre::GenreProfile;
use framecast_shared::ids::{NodeId, RegionName, SessionId, TenantId};
use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::tier::TierPreset;
use framecast_shared::time::Timestamp;

use crate::demand::{DemandStream, Request, StreamDrop};
use crate::report::{Percentiles, Report, Sample, SloCheck};
use crate::scenario::{Fault, Scenario};

mod calendar;
mod pools;

use calendar::Calendar;
use pools::{Key, Pools, Site, Start};

/// The simulation's epoch: its second 0.
const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);
/// How often the fleet's use is sampled, simulated seconds.
const SAMPLE_EVERY_S: u64 = 60;
/// Round-trip time from a player to its own region, ms.
const HOME_RTT_MS: u32 = 15;
/// Round-trip time to every other region, ms (within the default genres' caps, so a full
/// home region spills over).
const AWAY_RTT_MS: u32 = 40;

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A name in the scenario is not a valid id, or the engine refused the fleet.
    #[error("{0}")]
    Setup(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A player asks for a session.
    Arrival,
    /// The session is over.
    End(SessionId),
    /// A queued player gives up.
    Abandon(SessionId),
    /// The session's stream drops.
    Drop(SessionId),
    /// The session's player is back.
    Back(SessionId),
    /// The engine's timers.
    Tick,
    /// Sample the fleet.
    Sample,
    /// Fault `i` of the scenario.
    Fault(usize),
    /// The broker is back from a restart.
    BrokerUp,
    /// The session's game has started (a cold start): its player plays.
    Launched(SessionId),
    /// Warm instance `.2` on GPU `.1` of node `.0` is ready.
    WarmReady(NodeIdx, u8, u32),
    /// The pool plan is made again.
    PoolRound,
}

struct Live {
    tier: usize,
    /// When it was queued, for the queue wait; `None` once placed.
    queued_at: Option<u64>,
    /// Its length, drawn at arrival.
    length_ms: u64,
    /// Where it runs, once placed.
    node: Option<NodeId>,
    drop: Option<StreamDrop>,
    /// With warm pools: its (tier, game), the GPU it runs on and since when, once placed.
    key: Option<Key>,
    site: Option<Site>,
    placed_ms: u64,
}

/// Runs `scenario` with `strategy_name` (the scenario's when `None`) and reports.
pub fn run(scenario: &Scenario, strategy_name: Option<&str>) -> Result<Report, SimError> {
    run_with_progress(scenario, strategy_name, &indicatif::ProgressBar::hidden())
}

/// [`run`], moving `progress` through the simulated seconds.
pub fn run_with_progress(
    scenario: &Scenario,
    strategy_name: Option<&str>,
    progress: &indicatif::ProgressBar,
) -> Result<Report, SimError> {
    let started = Instant::now();
    let strategy_name = strategy_name.unwrap_or(&scenario.strategy).to_owned();
    let mut sim = Sim::new(scenario, &strategy_name)?;
    sim.simulate(progress)?;
    sim.report(scenario, strategy_name, started.elapsed())
}

struct Sim<'a> {
    scenario: &'a Scenario,
    engine: Engine,
    tiers: Vec<TierPreset>,
    demand: DemandStream,
    /// The request the pending `Arrival` event stands for.
    next_request: Option<Request>,
    regions: Vec<RegionName>,
    tenant: TenantId,
    nodes: Vec<NodeId>,
    gpus: usize,
    calendar: Calendar<Event>,
    end_ms: u64,
    stats: Counts,
    // Fx hashing: the map is keyed by our own ids, and is on the hot path.
    live: FxHashMap<SessionId, Live>,
    waits: Histogram<u64>,
    timeline: Vec<Sample>,
    place_calls: u64,
    place_time: Duration,
    peak: PeakSample,
    live_per_tier: Vec<u32>,
    /// Framebuffer the placed sessions' tiers need, MB.
    needed_fb_mb: u64,
    /// While the broker is away: until when, and what happened meanwhile (replayed when it is
    /// back).
    down_until: Option<u64>,
    deferred: Vec<Deferred>,
    /// The engine's queue timeout for normal requests, ms.
    queue_timeout_ms: u64,
    /// Warm pools and the agents that keep them; `None` for policy `none`.
    pools: Option<Pools>,
}

/// What reaches the broker only once it is back.
enum Deferred {
    Request(Request),
    Event(Event),
}

impl<'a> Sim<'a> {
    fn new(scenario: &'a Scenario, strategy_name: &str) -> Result<Self, SimError> {
        let setup = |e: &dyn std::fmt::Display| SimError::Setup(e.to_string());
        let strategy = strategy::by_name(strategy_name, scenario.seed)
            .ok_or_else(|| SimError::Setup(format!("unknown strategy {strategy_name}")))?;
        let tiers = TierPreset::defaults();
        let config = EngineConfig::default();
        let queue_timeout_ms = config
            .queue_timeout
            .get(Priority::Normal.index())
            .map_or(u64::MAX, |t| {
                u64::try_from(t.as_millis()).unwrap_or(u64::MAX)
            });
        let mut engine = Engine::new(tiers.clone(), GenreProfile::defaults(), config, strategy);
        // The fleet; a node-loss fault takes the first nodes.
        let mut nodes: Vec<NodeId> = Vec::new();
        let mut gpus = 0usize;
        for group in &scenario.fleet {
            let spec = Scenario::model(group)
                .ok_or_else(|| SimError::Setup(format!("unknown model {}", group.model)))?;
            for i in 0..group.nodes {
                let name = format!("{}-node-{i:05}", group.region);
                let hello = simulated::hello(
                    &name,
                    &group.region,
                    &spec,
                    group.mode,
                    group.gpus_per_node,
                    1,
                )
                .map_err(|e| setup(&e))?;
                engine.reconcile(&hello, T0).map_err(|e| setup(&e))?;
                nodes.push(hello.node_id);
            }
            gpus += group.nodes * group.gpus_per_node;
        }
        let pools = Pools::new(scenario, &engine)?;
        let demand = DemandStream::new(scenario).map_err(|e| setup(&e))?;
        let regions = demand.regions().cloned().collect();
        let live_per_tier = vec![0; tiers.len()];
        Ok(Self {
            scenario,
            engine,
            tiers,
            demand,
            next_request: None,
            regions,
            tenant: TenantId::new("loadtest").map_err(|e| setup(&e))?,
            nodes,
            gpus,
            calendar: Calendar::new(scenario.duration_s),
            end_ms: scenario.duration_s.saturating_mul(1000),
            stats: Counts::default(),
            live: FxHashMap::default(),
            waits: Histogram::<u64>::new(3).map_err(|e| setup(&e))?,
            timeline: Vec::new(),
            place_calls: 0,
            place_time: Duration::ZERO,
            peak: PeakSample::default(),
            live_per_tier,
            needed_fb_mb: 0,
            down_until: None,
            deferred: Vec::new(),
            queue_timeout_ms,
            pools,
        })
    }

    fn now(at: u64) -> Timestamp {
        T0.saturating_add(Duration::from_millis(at))
    }

    /// Runs the scenario to its end, moving `progress` through the simulated seconds.
    fn simulate(&mut self, progress: &indicatif::ProgressBar) -> Result<(), SimError> {
        let scenario = self.scenario;
        progress.set_length(scenario.duration_s);
        let end_ms = scenario.duration_s.saturating_mul(1000);
        if let Some(first) = self.demand.next() {
            self.next_request = Some(first.clone());
            self.calendar.push(first.at_ms, Event::Arrival);
        }
        self.calendar.push(1000, Event::Tick);
        self.calendar.push(0, Event::Sample);
        if self.pools.is_some() {
            self.calendar.push(0, Event::PoolRound);
        }
        for (i, f) in scenario.faults.iter().enumerate() {
            self.calendar.push(f.at_s() * 1000, Event::Fault(i));
        }
        while let Some((at, event)) = self.calendar.pop() {
            if at > end_ms {
                break;
            }
            self.handle(at, event)?;
            self.take_engine_events(at)?;
            if event == Event::Sample {
                progress.set_position(at / 1000);
            }
        }
        progress.set_position(scenario.duration_s);
        // Requests made while a broker restart outlasted the run never reached it.
        for d in std::mem::take(&mut self.deferred) {
            if let Deferred::Request(_) = d {
                self.stats.requests += 1;
                *self
                    .stats
                    .rejected
                    .entry("broker-unavailable".into())
                    .or_default() += 1;
            }
        }
        Ok(())
    }

    fn handle(&mut self, at: u64, event: Event) -> Result<(), SimError> {
        let down = self.down_until.is_some();
        match event {
            Event::Arrival => {
                let Some(request) = self.next_request.take() else {
                    return Ok(());
                };
                // The next arrival comes whatever happens to this one.
                if let Some(next) = self.demand.next() {
                    self.calendar.push(next.at_ms.max(at), Event::Arrival);
                    self.next_request = Some(next);
                }
                if down {
                    self.deferred.push(Deferred::Request(request));
                } else {
                    self.arrive(request, at)?;
                }
            }
            Event::End(_)
            | Event::Abandon(_)
            | Event::Drop(_)
            | Event::Back(_)
            | Event::Launched(_)
                if down =>
            {
                self.deferred.push(Deferred::Event(event));
            }
            Event::Launched(id) => {
                if self.live.get(&id).is_some_and(|s| s.node.is_some()) {
                    self.play(id, at);
                }
            }
            Event::WarmReady(node, gpu, serial) => {
                if let Some(p) = &mut self.pools {
                    p.ready(node, gpu, serial);
                }
            }
            Event::PoolRound => {
                if let Some(p) = &mut self.pools {
                    // The planner is the broker's: it does not run while the broker is away.
                    if !down {
                        p.round(&mut self.engine, at, &mut self.calendar);
                    }
                    let next = at + p.round_every_ms();
                    if next <= self.end_ms {
                        self.calendar.push(next, Event::PoolRound);
                    }
                }
            }
            Event::End(id) => self.end(id, at),
            Event::Abandon(id) => {
                let still_queued = self.live.get(&id).is_some_and(|s| s.queued_at.is_some());
                if still_queued && self.live.remove(&id).is_some() {
                    let _ = self.engine.release(&id, EndReason::Released, Self::now(at));
                    self.stats.abandoned += 1;
                }
            }
            Event::Drop(id) => self.observe(id, SessionState::Reconnecting, at),
            Event::Back(id) => self.observe(id, SessionState::Active, at),
            Event::Tick => {
                // A broker that is away runs no timers.
                if !down {
                    self.engine.expire(Self::now(at));
                    // The agents' heartbeats, for nodes whose warm instances changed.
                    if let Some(p) = &mut self.pools {
                        p.heartbeats(&mut self.engine, at, &mut self.calendar);
                    }
                }
                if at + 1000 <= self.end_ms {
                    self.calendar.push(at + 1000, Event::Tick);
                }
            }
            Event::Sample => {
                self.sample(at);
                if at + SAMPLE_EVERY_S * 1000 <= self.end_ms {
                    self.calendar
                        .push(at + SAMPLE_EVERY_S * 1000, Event::Sample);
                }
            }
            Event::Fault(i) => match self.scenario.faults.get(i) {
                Some(Fault::NodeLoss { nodes: count, .. }) => {
                    for node in self.nodes.iter().take(*count) {
                        let _ = self.engine.node_down(node, Self::now(at));
                        if let Some(p) = &mut self.pools {
                            p.node_lost(node);
                        }
                    }
                    self.stats.nodes_lost += *count as u64;
                }
                Some(Fault::BrokerRestart { down_s, .. }) => {
                    let back = at + down_s * 1000;
                    // A restart while away only makes the absence longer.
                    if self.down_until.is_none_or(|u| back > u) {
                        self.down_until = Some(back);
                        self.calendar.push(back, Event::BrokerUp);
                    }
                    self.stats.broker_restarts += 1;
                }
                None => {}
            },
            Event::BrokerUp => {
                if self.down_until.is_some_and(|u| u <= at) {
                    self.down_until = None;
                    // What happened meanwhile, in its order, as the broker learns it now.
                    for d in std::mem::take(&mut self.deferred) {
                        match d {
                            Deferred::Request(r) => {
                                self.stats.retried_after_restart += 1;
                                self.arrive(r, at)?;
                            }
                            Deferred::Event(e) => {
                                self.handle(at, e)?;
                                self.take_engine_events(at)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A request reaches the engine at `at` (after its arrival when the broker was away).
    fn arrive(&mut self, r: Request, at: u64) -> Result<(), SimError> {
        let now = Self::now(at);
        let id = SessionId::new(Self::now(r.at_ms), u128::from(r.n));
        let request = PlaceRequest {
            session_id: id,
            tenant: self.tenant.clone(),
            game: r.game.clone(),
            tier: r.tier.clone(),
            genre: r.genre.clone(),
            priority: Priority::Normal,
            regions: {
                let mut list: Vec<RegionRtt> = self
                    .regions
                    .iter()
                    .enumerate()
                    .map(|(i, region)| RegionRtt {
                        region: region.clone(),
                        rtt_ms: if i == r.home {
                            HOME_RTT_MS
                        } else {
                            AWAY_RTT_MS
                        },
                    })
                    .collect();
                list.sort_by_key(|x| x.rtt_ms);
                list
            },
            fallbacks: Vec::new(),
            queue: self.scenario.demand.queue,
        };
        let tier = self
            .tiers
            .iter()
            .position(|t| t.name == r.tier)
            .unwrap_or(0);
        let key = match &mut self.pools {
            Some(p) => {
                let key = p.request_key(&self.engine, &r.tier, &r.game);
                if let Some(home) = self.regions.get(r.home) {
                    p.observe_request(home, key, at);
                }
                key
            }
            None => None,
        };
        let timer = Instant::now();
        let decision = self.engine.place(request, now);
        self.place_time += timer.elapsed();
        self.place_calls += 1;
        self.stats.requests += 1;
        match decision {
            Decision::Placed(p) => {
                let waited = at.saturating_sub(r.at_ms);
                self.live.insert(
                    id,
                    Live {
                        tier,
                        queued_at: None,
                        length_ms: r.length_ms,
                        node: None,
                        drop: r.drop,
                        key,
                        site: None,
                        placed_ms: 0,
                    },
                );
                if waited == 0 {
                    self.stats.placed_at_once += 1;
                }
                self.placed(id, p, waited, false, at)?;
            }
            Decision::Queued(_) => {
                self.stats.queued += 1;
                self.live.insert(
                    id,
                    Live {
                        tier,
                        queued_at: Some(r.at_ms),
                        length_ms: r.length_ms,
                        node: None,
                        drop: r.drop,
                        key,
                        site: None,
                        placed_ms: 0,
                    },
                );
                // A player more patient than the queue timeout never gets to give up.
                if let Some(after) = r.gives_up_after_ms
                    && after < self.queue_timeout_ms
                {
                    self.calendar
                        .push(r.at_ms.saturating_add(after).max(at), Event::Abandon(id));
                }
            }
            Decision::Rejected { reason } => {
                *self.stats.rejected.entry(kebab(&reason)).or_default() += 1;
            }
        }
        Ok(())
    }

    /// Session `id` got a GPU (`p`) at `at` after waiting `waited` ms (in the engine's queue
    /// when `queued`): it connects and plays at once, as its agent would report, or once its
    /// game has started when warm pools are kept and it found no warm instance; it ends after
    /// its length.
    fn placed(
        &mut self,
        id: SessionId,
        p: Placement,
        waited: u64,
        queued: bool,
        at: u64,
    ) -> Result<(), SimError> {
        let Some(s) = self.live.get_mut(&id) else {
            return Ok(());
        };
        self.stats.placed += 1;
        if let Some(t) = self.tiers.get(s.tier) {
            *self
                .stats
                .placed_per_tier
                .entry(t.name.to_string())
                .or_default() += 1;
        }
        self.waits
            .record(waited)
            .map_err(|e| SimError::Setup(e.to_string()))?;
        if let Some(c) = self.live_per_tier.get_mut(s.tier) {
            *c += 1;
        }
        self.needed_fb_mb += tier_fb(&self.tiers, s.tier);
        s.placed_ms = at;
        let start = match &mut self.pools {
            Some(pools) => {
                let (site, start) =
                    pools.placed(&self.engine, &p, s.key, queued, at, &mut self.calendar);
                s.site = site;
                start
            }
            None => Start::Now,
        };
        if let Start::After(ms) = start {
            // The agent reports the session launching; the player plays once it is up.
            let _ = self.engine.observe_session(
                &p.node,
                1,
                &id,
                SessionState::Connecting,
                Self::now(at),
            );
            self.calendar
                .push(at.saturating_add(ms), Event::Launched(id));
        }
        s.node = Some(p.node);
        if start == Start::Now {
            self.play(id, at);
        }
        Ok(())
    }

    /// Session `id`'s player plays from `at`: the session is active and ends after its
    /// length.
    fn play(&mut self, id: SessionId, at: u64) {
        let Some(s) = self.live.get(&id) else {
            return;
        };
        let Some(node) = &s.node else {
            return;
        };
        let now = Self::now(at);
        for state in [SessionState::Connecting, SessionState::Active] {
            let _ = self.engine.observe_session(node, 1, &id, state, now);
        }
        let end = at.saturating_add(s.length_ms.max(1));
        // A player whose stream drops and who never comes back releases nothing: the
        // session ends when the broker's reconnect grace runs out.
        let mut gone = false;
        if let Some(d) = s.drop
            && d.after_ms < s.length_ms
        {
            let dropped = at.saturating_add(d.after_ms);
            self.calendar.push(dropped, Event::Drop(id));
            match d.back_after_ms {
                Some(back) if d.after_ms.saturating_add(back) < s.length_ms => {
                    self.calendar
                        .push(dropped.saturating_add(back), Event::Back(id));
                }
                Some(_) => {}
                None => gone = true,
            }
        }
        if !gone {
            self.calendar.push(end, Event::End(id));
        }
    }

    fn observe(&mut self, id: SessionId, state: SessionState, at: u64) {
        if let Some(s) = self.live.get(&id)
            && let Some(node) = &s.node
        {
            let _ = self
                .engine
                .observe_session(node, 1, &id, state, Self::now(at));
            if state == SessionState::Reconnecting {
                self.stats.reconnects += 1;
            }
        }
    }

    fn end(&mut self, id: SessionId, at: u64) {
        if let Some(s) = self.live.remove(&id) {
            if s.queued_at.is_none() {
                self.untally(s.tier);
            }
            if self
                .engine
                .release(&id, EndReason::Released, Self::now(at))
                .is_ok()
            {
                *self.stats.ended.entry("released".into()).or_default() += 1;
            }
            self.freed(&s, at);
        }
    }

    /// Session `s` (with warm pools) ended: its agent may use the slot.
    fn freed(&mut self, s: &Live, at: u64) {
        if let (Some(p), Some(site)) = (&mut self.pools, s.site) {
            let held = at.saturating_sub(s.placed_ms);
            p.ended(&self.engine, site, s.key, held, at, &mut self.calendar);
        }
    }

    fn untally(&mut self, tier: usize) {
        if let Some(c) = self.live_per_tier.get_mut(tier) {
            *c = c.saturating_sub(1);
        }
        self.needed_fb_mb = self.needed_fb_mb.saturating_sub(tier_fb(&self.tiers, tier));
    }

    /// What the engine did on its own: queued requests placed, sessions ended.
    fn take_engine_events(&mut self, at: u64) -> Result<(), SimError> {
        while let Some(e) = self.engine.poll_event() {
            match e {
                EngineEvent::Placed(p) => {
                    let Some(s) = self.live.get_mut(&p.session_id) else {
                        continue;
                    };
                    if let Some(q) = s.queued_at.take() {
                        self.placed(p.session_id, p, at.saturating_sub(q), true, at)?;
                    }
                }
                EngineEvent::Ended {
                    session_id, reason, ..
                } => {
                    if let Some(s) = self.live.remove(&session_id)
                        && s.queued_at.is_none()
                    {
                        self.untally(s.tier);
                        self.freed(&s, at);
                    }
                    *self.stats.ended.entry(reason.to_string()).or_default() += 1;
                }
            }
        }
        Ok(())
    }

    fn sample(&mut self, at: u64) {
        let s = self.engine.stats();
        // The engine counts compute in thousandths of a sixteenth of a GPU.
        let compute_total = self.gpus as u64 * 16 * 1000;
        // The engine counts the warm instances it holds as used framebuffer; the sample's is
        // the sessions'.
        let warm_fb = self.pools.as_ref().map_or(0, Pools::reported_fb_mb);
        let mut sample = Sample {
            t_s: at / 1000,
            sessions: s.sessions as u64,
            queued: s.queued as u64,
            gpus_in_use: s.gpus_in_use as u64,
            framebuffer: ratio(s.fb_used_mb.saturating_sub(warm_fb), s.fb_total_mb),
            encoder: ratio(s.encoder_used, s.encoder_total),
            compute: ratio(s.compute_used, compute_total),
            fragmentation: ratio(s.fb_stranded_mb, s.fb_total_mb),
            real_use: ratio(self.needed_fb_mb, s.fb_of_gpus_in_use_mb),
            max_sessions_per_gpu: u64::from(s.max_sessions_per_gpu),
            ..Sample::default()
        };
        if let Some(p) = &mut self.pools {
            p.sample(&mut sample, s.fb_total_mb);
        }
        if sample.framebuffer >= self.peak.sample.framebuffer {
            self.peak = PeakSample {
                sample: sample.clone(),
                per_tier: self.live_per_tier.clone(),
            };
        }
        self.timeline.push(sample);
    }

    fn report(
        self,
        scenario: &Scenario,
        strategy: String,
        wall: Duration,
    ) -> Result<Report, SimError> {
        // How many GPUs the busiest moment's sessions need at least (the first fleet group's
        // model and mode), against how many it used.
        let gpus_needed = scenario.fleet.first().and_then(|g| {
            let spec = Scenario::model(g)?;
            bound::lower_bound(&spec, g.mode, &self.tiers, &self.peak.per_tier)
                .map(|b| b.exact.unwrap_or(b.volume))
        });
        let mean = |f: fn(&Sample) -> f64| {
            if self.timeline.is_empty() {
                0.0
            } else {
                self.timeline.iter().map(f).sum::<f64>() / self.timeline.len() as f64
            }
        };
        let peak = self.peak.sample;
        let pools = self.pools.as_ref().map(Pools::figures);
        let mut report = Report {
            schema: crate::report::SCHEMA,
            scenario: scenario.name.clone(),
            engine: "sim".into(),
            strategy,
            seed: scenario.seed,
            duration_s: scenario.duration_s,
            nodes: self.nodes.len() as u64,
            gpus: self.gpus as u64,
            requests: self.stats.requests,
            placed: self.stats.placed,
            placed_at_once: self.stats.placed_at_once,
            placed_per_tier: self.stats.placed_per_tier,
            queued: self.stats.queued,
            rejected: self.stats.rejected,
            abandoned: self.stats.abandoned,
            ended: self.stats.ended,
            nodes_lost: self.stats.nodes_lost,
            reconnects: self.stats.reconnects,
            broker_restarts: self.stats.broker_restarts,
            retried_after_restart: self.stats.retried_after_restart,
            queue_wait_s: Percentiles::of_millis(&self.waits),
            peak_sessions_per_gpu_in_use: if peak.gpus_in_use == 0 {
                0.0
            } else {
                peak.sessions as f64 / peak.gpus_in_use as f64
            },
            mean_framebuffer: mean(|s| s.framebuffer),
            mean_real_use: mean(|s| s.real_use),
            peak,
            lower_bound_gpus_at_peak: gpus_needed,
            timeline: self.timeline,
            wall_seconds: wall.as_secs_f64(),
            placements_per_wall_second: if self.place_time.is_zero() {
                0.0
            } else {
                self.place_calls as f64 / self.place_time.as_secs_f64()
            },
            queue_wait_cdf: crate::report::cdf(&self.waits, 1000.0),
            ..Report::default()
        };
        report.pools = "none".into();
        if let Some(figures) = pools {
            figures.fill(&mut report);
        }
        report.slo = SloCheck::all(&scenario.slo, &report);
        report.ok = report.slo.iter().all(|c| c.ok);
        Ok(report)
    }
}

#[derive(Default)]
struct Counts {
    requests: u64,
    placed: u64,
    placed_at_once: u64,
    placed_per_tier: BTreeMap<String, u64>,
    queued: u64,
    rejected: BTreeMap<String, u64>,
    abandoned: u64,
    ended: BTreeMap<String, u64>,
    nodes_lost: u64,
    reconnects: u64,
    broker_restarts: u64,
    retried_after_restart: u64,
}

#[derive(Default)]
struct PeakSample {
    sample: Sample,
    per_tier: Vec<u32>,
}

fn tier_fb(tiers: &[TierPreset], tier: usize) -> u64 {
    tiers
        .get(tier)
        .map_or(0, |t| t.framebuffer.megabytes().get())
}

fn ratio(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        used as f64 / total as f64
    }
}

fn kebab(reason: &impl serde::Serialize) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "other".into())
}

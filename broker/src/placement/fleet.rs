//! The fleet as the engine sees it: nodes, their GPUs, each GPU's slots and what is used.
//!
//! All accounting changes go through [`Fleet::occupy`], [`Fleet::vacate`] and
//! [`Fleet::set_warm`], which keep the counters and the indices in step with the slots.

use rustc_hash::FxHashMap;

use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{GpuId, NodeId, SessionId};
use framecast_shared::state::NodeState;

use super::catalog::{Catalog, GameIdx, GenreIdx, ProfileIdx, RegionIdx, SpecIdx, TierIdx};
use super::index::{Indices, Membership};

/// Index of a GPU in [`Fleet::gpus`].
pub type GpuIdx = u32;
/// Index of a node in [`Fleet::nodes`].
pub type NodeIdx = u32;

/// Compute is accounted in thousandths of a sixteenth; the whole GPU is this much.
pub const FULL_COMPUTE: u32 = 16_000;
/// Where compute is a soft dimension, the most it may be oversubscribed (2×).
pub const SOFT_COMPUTE_LIMIT: u32 = 2 * FULL_COMPUTE;

/// A GPU host.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its id.
    pub id: NodeId,
    /// Its region.
    pub region: RegionIdx,
    /// Its lifecycle state.
    pub state: NodeState,
    /// Set by an operator's cordon; survives the node going down and coming back.
    pub cordoned: bool,
    /// Its heartbeats are late: it takes no new sessions until one arrives. Kept apart from
    /// the lifecycle state so an operator's cordon or drain is not lost.
    pub suspect: bool,
    /// The newest agent generation seen.
    pub generation: u64,
    /// Its GPUs.
    pub gpus: Vec<GpuIdx>,
    /// Host CPU for instances, in millicores, where the agent reported it.
    pub cpu_total: Option<u32>,
    /// Host CPU held by sessions.
    pub cpu_used: u32,
    /// The newest pool plan its agent reports applied (0 until a heartbeat says).
    pub plan_generation: u64,
}

impl Node {
    /// Whether new sessions may go to it.
    pub fn accepts_sessions(&self) -> bool {
        self.state.accepts_sessions() && !self.suspect
    }
}

/// What one vGPU slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Nothing: a cold slot, the instance must be launched.
    Free,
    /// An idle warm instance of a game at a tier.
    Warm {
        /// The game.
        game: GameIdx,
        /// The tier it was started for.
        tier: TierIdx,
    },
    /// A session (reserved, connecting, active or reconnecting).
    Held {
        /// The session.
        session: SessionId,
    },
}

/// Resources in use on one GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Framebuffer of occupied slots, MB.
    pub fb_mb: u64,
    /// Compute of sessions, thousandths of a sixteenth.
    pub compute: u32,
    /// Encoder throughput of sessions, thousandths of a unit.
    pub encoder: u32,
    /// Encoder sessions.
    pub encoder_sessions: u16,
    /// MIG compute slices of occupied instances, warm ones included.
    pub mig_slices: u16,
}

/// One physical GPU.
#[derive(Debug, Clone)]
pub struct Gpu {
    /// Its id.
    pub id: GpuId,
    /// Its node.
    pub node: NodeIdx,
    /// Its node's region.
    pub region: RegionIdx,
    /// Its model.
    pub spec: SpecIdx,
    /// Its sharing mode.
    pub mode: GpuMode,
    /// Equal-size: the profile its vGPUs use. Changes only while no slot is occupied.
    pub profile: Option<ProfileIdx>,
    /// vGPUs the agent reports created (pre-allocated), occupied or not.
    pub vgpus_created: u16,
    /// Slots; the first `slot_cap` are usable.
    pub slots: Vec<Slot>,
    /// Mixed-size and MIG: the profile of each occupied slot.
    pub slot_profile: Vec<Option<ProfileIdx>>,
    /// Usable slots under the current profile.
    pub slot_cap: u16,
    /// Resources in use.
    pub used: Usage,
    /// Slots holding sessions.
    pub held: u16,
    /// Slots holding warm instances.
    pub warm: u16,
    /// Sum of the sessions' genre load weights, thousandths.
    pub load: u32,
    /// Sum of the sessions' neighbour penalties, thousandths.
    pub sensitivity: u32,
    /// Held whole by one session (the exclusive baseline).
    pub exclusive: bool,
    /// Still reported by its agent.
    pub present: bool,
    /// Which index sets it is in now.
    pub membership: Membership,
    /// The agent reports another model or mode than the GPU had; it takes the new shape once
    /// no session is left on it, and no new session until then.
    pub pending_shape: Option<(SpecIdx, GpuMode)>,
    /// The pool planner steered it away: it takes no new session and its warm instances are
    /// not handed out, so it empties as its sessions end and can change profile. Running
    /// sessions are untouched.
    pub steered: bool,
}

impl Gpu {
    /// Occupied slots: sessions and warm instances.
    pub fn occupied(&self) -> u16 {
        self.held + self.warm
    }
}

/// What one session takes from the GPU and node it is placed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// The tier.
    pub tier: TierIdx,
    /// The genre.
    pub genre: GenreIdx,
    /// Framebuffer, MB.
    pub fb_mb: u64,
    /// Compute, thousandths of a sixteenth.
    pub compute: u32,
    /// Encoder, thousandths of a unit.
    pub encoder: u32,
    /// Host CPU, millicores.
    pub cpu: u32,
    /// Genre load weight, thousandths.
    pub load: u32,
    /// Genre neighbour penalty, thousandths.
    pub sensitivity: u32,
    /// The vGPU profile (equal-size, mixed-size) or MIG shape.
    pub profile: Option<ProfileIdx>,
    /// MIG compute slices.
    pub mig_slices: u16,
    /// Takes the whole GPU.
    pub exclusive: bool,
}

/// Why a GPU cannot take a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Infeasible {
    /// The node takes no sessions (cordoned, draining, down) or the GPU is gone.
    NotAccepting,
    /// The GPU cannot stream or no profile of its mode fits the tier.
    NoFit,
    /// Equal-size GPU holds another profile and is not empty.
    ProfileMismatch,
    /// No free slot, or the profile's instance limit is reached.
    NoSlot,
    /// Not enough framebuffer.
    Framebuffer,
    /// Not enough compute where the mode enforces it (or past the soft limit).
    Compute,
    /// Not enough encoder throughput.
    Encoder,
    /// The driver's encoder session cap is reached.
    EncoderSessions,
    /// Not enough host CPU.
    Cpu,
    /// MIG compute slices or instance shapes are used up.
    MigSlices,
    /// Held whole by an exclusive session, or the session needs a whole GPU and it is not empty.
    Exclusive,
    /// The pool planner steered the GPU away so it empties and can change profile.
    Steered,
}

impl Infeasible {
    /// Words for the explain output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAccepting => "node not accepting sessions",
            Self::NoFit => "no profile of this GPU fits the tier",
            Self::ProfileMismatch => "holds another vGPU profile",
            Self::NoSlot => "no free vGPU slot",
            Self::Framebuffer => "not enough framebuffer",
            Self::Compute => "not enough compute share",
            Self::Encoder => "not enough encoder throughput",
            Self::EncoderSessions => "encoder session cap reached",
            Self::Cpu => "not enough host CPU",
            Self::MigSlices => "no MIG capacity for the shape",
            Self::Exclusive => "GPU not wholly free",
            Self::Steered => "steered away by the pool planner",
        }
    }
}

/// Which slot a session may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotChoice {
    /// Any free slot.
    Any,
    /// This slot, which holds a warm instance of the session's game and tier.
    Warm(u16),
    /// This slot, free or holding a warm instance of anything: a session an agent reports.
    Exact(u16),
}

/// What a warm instance occupies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Footprint {
    warm: bool,
    fb_mb: u64,
    mig_slices: u16,
    profile: Option<ProfileIdx>,
}

/// Where on a GPU a session would go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPlan {
    /// The slot.
    pub slot: u16,
    /// The slot holds a warm instance of the session's game and tier.
    pub warm: bool,
    /// An equal-size GPU must take a new profile first.
    pub reprofile: bool,
}

/// Nodes, GPUs and indices.
#[derive(Debug)]
pub struct Fleet {
    /// Tiers, genres, models.
    pub catalog: Catalog,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Node ids to indices.
    pub node_idx: FxHashMap<NodeId, NodeIdx>,
    /// GPUs.
    pub gpus: Vec<Gpu>,
    /// Placement indices.
    pub indices: Indices,
}

impl Fleet {
    /// An empty fleet.
    pub fn new(catalog: Catalog) -> Self {
        Self {
            catalog,
            nodes: Vec::new(),
            node_idx: FxHashMap::default(),
            gpus: Vec::new(),
            indices: Indices::default(),
        }
    }

    /// A node.
    pub fn node(&self, idx: NodeIdx) -> Option<&Node> {
        self.nodes.get(to_usize(idx))
    }

    /// A GPU.
    pub fn gpu(&self, idx: GpuIdx) -> Option<&Gpu> {
        self.gpus.get(to_usize(idx))
    }

    fn gpu_mut(&mut self, idx: GpuIdx) -> Option<&mut Gpu> {
        self.gpus.get_mut(to_usize(idx))
    }

    /// Adds a GPU to a node, unindexed; call [`Fleet::reindex`] after.
    pub fn push_gpu(
        &mut self,
        node: NodeIdx,
        id: GpuId,
        spec: SpecIdx,
        mode: GpuMode,
    ) -> Option<GpuIdx> {
        let region = self.node(node)?.region;
        let s = self.catalog.spec(spec)?;
        let slot_count = match mode {
            GpuMode::Exclusive => 1,
            _ => s.max_vgpus.max(1),
        };
        let idx = GpuIdx::try_from(self.gpus.len()).ok()?;
        self.gpus.push(Gpu {
            id,
            node,
            region,
            spec,
            mode,
            profile: None,
            vgpus_created: 0,
            slots: vec![Slot::Free; usize::from(slot_count)],
            slot_profile: vec![None; usize::from(slot_count)],
            slot_cap: if mode == GpuMode::EqualSize {
                0
            } else {
                slot_count
            },
            used: Usage::default(),
            held: 0,
            warm: 0,
            load: 0,
            sensitivity: 0,
            exclusive: false,
            present: true,
            membership: Membership::default(),
            pending_shape: None,
            steered: false,
        });
        self.indices.add_gpu(region, spec);
        if let Some(n) = self.nodes.get_mut(to_usize(node)) {
            n.gpus.push(idx);
        }
        Some(idx)
    }

    /// The demand of a session of `tier` and `genre` on `gpu`, or why the GPU's mode and
    /// model cannot hold it at all.
    pub fn demand(
        &self,
        gpu: &Gpu,
        tier: TierIdx,
        genre: GenreIdx,
        exclusive: bool,
    ) -> Result<Demand, Infeasible> {
        let preset = self.catalog.tier(tier).ok_or(Infeasible::NoFit)?;
        let spec = self.catalog.spec(gpu.spec).ok_or(Infeasible::NoFit)?;
        let (load, sensitivity) = self.catalog.genre(genre).map_or((1000, 500), |g| {
            (milli(g.load_weight), milli(g.neighbour_penalty))
        });
        let base_compute = u32::from(preset.compute_share.sixteenths()) * 1000;
        let fit = self.catalog.fit(gpu.spec, tier);
        let mut d = Demand {
            tier,
            genre,
            fb_mb: preset.framebuffer.megabytes().get(),
            compute: scale(base_compute, load),
            encoder: preset.encoder_cost.milli(),
            cpu: preset.cpu_millicores,
            load,
            sensitivity,
            profile: None,
            mig_slices: 0,
            exclusive,
        };
        if !spec.can_stream() {
            return Err(Infeasible::NoFit);
        }
        if exclusive {
            if preset.framebuffer.megabytes() > spec.framebuffer {
                return Err(Infeasible::NoFit);
            }
            d.fb_mb = spec.framebuffer.get();
            d.compute = FULL_COMPUTE;
            return Ok(d);
        }
        match gpu.mode {
            GpuMode::Exclusive => {
                if !fit.exclusive {
                    return Err(Infeasible::NoFit);
                }
            }
            GpuMode::EqualSize => {
                let (p, _) = fit.equal.ok_or(Infeasible::NoFit)?;
                d.profile = Some(p);
                d.fb_mb = profile_fb(&self.catalog, gpu.spec, GpuMode::EqualSize, p);
            }
            GpuMode::MixedSize => {
                let (p, _) = fit.mixed.ok_or(Infeasible::NoFit)?;
                d.profile = Some(p);
                d.fb_mb = profile_fb(&self.catalog, gpu.spec, GpuMode::MixedSize, p);
            }
            GpuMode::Mig => {
                let p = fit.mig.ok_or(Infeasible::NoFit)?;
                let shape = self
                    .catalog
                    .profile(gpu.spec, GpuMode::Mig, p)
                    .ok_or(Infeasible::NoFit)?;
                d.profile = Some(p);
                d.fb_mb = shape.framebuffer.megabytes().get();
                // A MIG instance is a hardware partition: its compute is fixed, whatever the genre.
                d.compute = u32::from(shape.compute_share.sixteenths()) * 1000;
                d.mig_slices = u16::from(shape.mig_slices.unwrap_or(1));
            }
        }
        Ok(d)
    }

    /// Whether `gpu` can take `d` now, and in which slot (see [`SlotChoice`]).
    pub fn check(&self, gpu: &Gpu, d: &Demand, choice: SlotChoice) -> Result<SlotPlan, Infeasible> {
        let node = self.node(gpu.node).ok_or(Infeasible::NotAccepting)?;
        let adopting = matches!(choice, SlotChoice::Exact(_));
        // A session the agent already runs is taken whatever the node's state.
        if !gpu.present || (!adopting && !node.accepts_sessions()) {
            return Err(Infeasible::NotAccepting);
        }
        if gpu.steered && !adopting {
            return Err(Infeasible::Steered);
        }
        if gpu.exclusive {
            return Err(Infeasible::Exclusive);
        }
        let spec = self.catalog.spec(gpu.spec).ok_or(Infeasible::NoFit)?;

        // The slot, if the caller names one, and what a warm instance in it gives back.
        let named = match choice {
            SlotChoice::Any => None,
            SlotChoice::Warm(slot) => match gpu.slots.get(usize::from(slot)) {
                Some(Slot::Warm { tier, .. }) if *tier == d.tier && !d.exclusive => Some(slot),
                _ => return Err(Infeasible::NoSlot),
            },
            SlotChoice::Exact(slot) => match gpu.slots.get(usize::from(slot)) {
                Some(Slot::Free | Slot::Warm { .. }) => Some(slot),
                _ => return Err(Infeasible::NoSlot),
            },
        };
        let credit = named.map_or(Footprint::default(), |slot| self.warm_footprint(gpu, slot));
        let occupied = gpu.occupied() - u16::from(credit.warm);
        let fb_after = gpu.used.fb_mb.saturating_sub(credit.fb_mb) + d.fb_mb;
        if d.exclusive && occupied > 0 {
            return Err(Infeasible::Exclusive);
        }
        let mut reprofile = false;
        let cap = if d.exclusive {
            1
        } else {
            match gpu.mode {
                GpuMode::Exclusive => {
                    if gpu.held > 0 {
                        return Err(Infeasible::NoSlot);
                    }
                    1
                }
                GpuMode::EqualSize => {
                    let p = d.profile.ok_or(Infeasible::NoFit)?;
                    if gpu.profile != Some(p) {
                        if occupied > 0 {
                            return Err(Infeasible::ProfileMismatch);
                        }
                        reprofile = true;
                    }
                    if gpu.used.compute + d.compute > FULL_COMPUTE {
                        return Err(Infeasible::Compute);
                    }
                    self.catalog
                        .fit(gpu.spec, d.tier)
                        .equal
                        .map_or(0, |(_, slots)| slots)
                }
                GpuMode::MixedSize => {
                    let p = d.profile.ok_or(Infeasible::NoFit)?;
                    let limit = self
                        .catalog
                        .fit(gpu.spec, d.tier)
                        .mixed
                        .map_or(0, |(_, n)| n);
                    let same = u16::from(credit.profile == Some(p));
                    if count_profile(gpu, p) - same >= limit {
                        return Err(Infeasible::NoSlot);
                    }
                    if gpu.used.compute + d.compute > SOFT_COMPUTE_LIMIT {
                        return Err(Infeasible::Compute);
                    }
                    gpu.slot_cap
                }
                GpuMode::Mig => {
                    let p = d.profile.ok_or(Infeasible::NoFit)?;
                    let shape = self
                        .catalog
                        .profile(gpu.spec, GpuMode::Mig, p)
                        .ok_or(Infeasible::NoFit)?;
                    let same = u16::from(credit.profile == Some(p));
                    let slices_after =
                        gpu.used.mig_slices.saturating_sub(credit.mig_slices) + d.mig_slices;
                    if count_profile(gpu, p) - same >= shape.max_instances
                        || slices_after > u16::from(spec.mig_compute_slices)
                    {
                        return Err(Infeasible::MigSlices);
                    }
                    gpu.slot_cap
                }
            }
        };
        if fb_after > spec.framebuffer.get() {
            return Err(Infeasible::Framebuffer);
        }
        if gpu.used.encoder + d.encoder > spec.encoder_capacity.milli() {
            return Err(Infeasible::Encoder);
        }
        if spec
            .encoder_session_cap
            .is_some_and(|c| gpu.used.encoder_sessions >= c)
        {
            return Err(Infeasible::EncoderSessions);
        }
        if node
            .cpu_total
            .is_some_and(|total| node.cpu_used + d.cpu > total)
        {
            return Err(Infeasible::Cpu);
        }
        let usable = usize::from(cap).min(gpu.slots.len());
        let slot = match named {
            Some(slot) if usize::from(slot) < usable => slot,
            Some(_) => return Err(Infeasible::NoSlot),
            None => gpu
                .slots
                .iter()
                .take(usable)
                .position(|s| *s == Slot::Free)
                .and_then(|i| u16::try_from(i).ok())
                .ok_or(Infeasible::NoSlot)?,
        };
        Ok(SlotPlan {
            slot,
            warm: credit.warm && matches!(choice, SlotChoice::Warm(_)),
            reprofile,
        })
    }

    /// What the warm instance in `slot` of `gpu` occupies; nothing for other slots.
    fn warm_footprint(&self, gpu: &Gpu, slot: u16) -> Footprint {
        let i = usize::from(slot);
        if !matches!(gpu.slots.get(i), Some(Slot::Warm { .. })) {
            return Footprint::default();
        }
        let profile = gpu.slot_profile.get(i).copied().flatten();
        self.footprint(gpu, profile)
    }

    /// Framebuffer and MIG slices the warm instance in `slot` of `gpu` occupies (for audits).
    pub fn warm_usage(&self, gpu: &Gpu, slot: u16) -> (u64, u16) {
        let f = self.warm_footprint(gpu, slot);
        (f.fb_mb, f.mig_slices)
    }

    /// What a warm instance of `profile` occupies on `gpu`.
    fn footprint(&self, gpu: &Gpu, profile: Option<ProfileIdx>) -> Footprint {
        let shape = profile.and_then(|p| self.catalog.profile(gpu.spec, gpu.mode, p));
        Footprint {
            warm: true,
            fb_mb: shape.map_or(0, |p| p.framebuffer.megabytes().get()),
            mig_slices: match gpu.mode {
                GpuMode::Mig => shape.map_or(0, |p| u16::from(p.mig_slices.unwrap_or(1))),
                _ => 0,
            },
            profile,
        }
    }

    /// Puts `session` with demand `d` into `plan.slot` of `gpu`. The caller checked it.
    pub fn occupy(&mut self, gpu_idx: GpuIdx, plan: SlotPlan, session: SessionId, d: &Demand) {
        self.unindex(gpu_idx);
        // A warm instance in the slot gives its resources back before the session takes its own.
        let credit = self
            .gpu(gpu_idx)
            .map_or(Footprint::default(), |g| self.warm_footprint(g, plan.slot));
        let cap_for_profile = d
            .profile
            .and_then(|_| self.catalog_fit_slots(gpu_idx, d.tier));
        let Some(gpu) = self.gpus.get_mut(to_usize(gpu_idx)) else {
            return;
        };
        let slot = usize::from(plan.slot);
        if gpu.mode == GpuMode::EqualSize
            && !d.exclusive
            && (plan.reprofile || gpu.profile.is_none())
        {
            gpu.profile = d.profile;
            gpu.slot_cap = cap_for_profile.unwrap_or(0);
        }
        if let Some(s) = gpu.slots.get_mut(slot) {
            *s = Slot::Held { session };
        }
        if let Some(p) = gpu.slot_profile.get_mut(slot) {
            *p = d.profile;
        }
        if credit.warm {
            gpu.warm = gpu.warm.saturating_sub(1);
            gpu.used.fb_mb = gpu.used.fb_mb.saturating_sub(credit.fb_mb);
            gpu.used.mig_slices = gpu.used.mig_slices.saturating_sub(credit.mig_slices);
        }
        gpu.used.fb_mb += d.fb_mb;
        gpu.held += 1;
        gpu.used.compute += d.compute;
        gpu.used.encoder += d.encoder;
        gpu.used.encoder_sessions += 1;
        gpu.used.mig_slices += d.mig_slices;
        gpu.load += d.load;
        gpu.sensitivity += d.sensitivity;
        gpu.exclusive |= d.exclusive;
        let node = gpu.node;
        if let Some(n) = self.nodes.get_mut(to_usize(node)) {
            n.cpu_used += d.cpu;
        }
        self.index(gpu_idx);
    }

    /// Frees the slot `session` held on `gpu`, which had demand `d`. The slot becomes cold.
    pub fn vacate(&mut self, gpu_idx: GpuIdx, slot: u16, d: &Demand) {
        self.unindex(gpu_idx);
        let Some(gpu) = self.gpus.get_mut(to_usize(gpu_idx)) else {
            return;
        };
        if let Some(s) = gpu.slots.get_mut(usize::from(slot)) {
            *s = Slot::Free;
        }
        if let Some(p) = gpu.slot_profile.get_mut(usize::from(slot)) {
            *p = None;
        }
        gpu.held = gpu.held.saturating_sub(1);
        gpu.used.fb_mb = gpu.used.fb_mb.saturating_sub(d.fb_mb);
        gpu.used.compute = gpu.used.compute.saturating_sub(d.compute);
        gpu.used.encoder = gpu.used.encoder.saturating_sub(d.encoder);
        gpu.used.encoder_sessions = gpu.used.encoder_sessions.saturating_sub(1);
        gpu.used.mig_slices = gpu.used.mig_slices.saturating_sub(d.mig_slices);
        gpu.load = gpu.load.saturating_sub(d.load);
        gpu.sensitivity = gpu.sensitivity.saturating_sub(d.sensitivity);
        if d.exclusive {
            gpu.exclusive = false;
        }
        let node = gpu.node;
        if let Some(n) = self.nodes.get_mut(to_usize(node)) {
            n.cpu_used = n.cpu_used.saturating_sub(d.cpu);
        }
        self.index(gpu_idx);
    }

    /// Sets the warm instances of `gpu` to `warm` (slot, game, tier), replacing earlier ones.
    /// Slots holding sessions are left alone; so are entries that name them or no usable
    /// slot. Equal-size GPUs take `profile` first if they are empty.
    pub fn set_warm(
        &mut self,
        gpu_idx: GpuIdx,
        profile: Option<ProfileIdx>,
        warm: &[(u16, GameIdx, TierIdx)],
    ) {
        self.unindex(gpu_idx);
        let Some(gpu) = self.gpus.get(to_usize(gpu_idx)) else {
            return;
        };
        let mut gpu = gpu.clone();
        let Some(spec) = self.catalog.spec(gpu.spec) else {
            return;
        };
        for i in 0..gpu.slots.len() {
            if let Some(Slot::Warm { .. }) = gpu.slots.get(i) {
                let f = self.footprint(&gpu, gpu.slot_profile.get(i).copied().flatten());
                gpu.used.fb_mb = gpu.used.fb_mb.saturating_sub(f.fb_mb);
                gpu.used.mig_slices = gpu.used.mig_slices.saturating_sub(f.mig_slices);
                gpu.warm = gpu.warm.saturating_sub(1);
                if let Some(s) = gpu.slots.get_mut(i) {
                    *s = Slot::Free;
                }
                if let Some(p) = gpu.slot_profile.get_mut(i) {
                    *p = None;
                }
            }
        }
        if gpu.mode == GpuMode::EqualSize && gpu.held == 0 && profile.is_some() {
            gpu.profile = profile;
            gpu.slot_cap = profile
                .and_then(|p| self.catalog.profile(gpu.spec, GpuMode::EqualSize, p))
                .zip(self.catalog.spec(gpu.spec))
                .map_or(0, |(p, s)| p.max_instances.min(s.max_vgpus));
        }
        for &(slot, game, tier) in warm {
            let i = usize::from(slot);
            if slot >= gpu.slot_cap || gpu.slots.get(i) != Some(&Slot::Free) {
                continue;
            }
            let p = match gpu.mode {
                GpuMode::EqualSize => gpu.profile,
                GpuMode::MixedSize => self.catalog.fit(gpu.spec, tier).mixed.map(|(p, _)| p),
                GpuMode::Mig => self.catalog.fit(gpu.spec, tier).mig,
                GpuMode::Exclusive => None,
            };
            if gpu.mode != GpuMode::Exclusive && p.is_none() {
                continue;
            }
            // A report cannot make the GPU hold more than it has.
            let f = self.footprint(&gpu, p);
            let fits = gpu.used.fb_mb + f.fb_mb <= spec.framebuffer.get()
                && (gpu.mode != GpuMode::Mig
                    || gpu.used.mig_slices + f.mig_slices <= u16::from(spec.mig_compute_slices));
            if !fits {
                continue;
            }
            if let Some(s) = gpu.slots.get_mut(i) {
                *s = Slot::Warm { game, tier };
            }
            if let Some(sp) = gpu.slot_profile.get_mut(i) {
                *sp = p;
            }
            gpu.used.fb_mb += f.fb_mb;
            gpu.used.mig_slices += f.mig_slices;
            gpu.warm += 1;
        }
        if let Some(g) = self.gpu_mut(gpu_idx) {
            *g = gpu;
        }
        self.index(gpu_idx);
    }

    /// Gives `gpu` a new model and mode as its agent reports them: at once if no session holds
    /// a slot (warm instances are dropped; the agent reports them again), else once the last
    /// session has left.
    pub fn reshape(&mut self, gpu_idx: GpuIdx, spec: SpecIdx, mode: GpuMode) {
        let Some(gpu) = self.gpu(gpu_idx) else { return };
        if (gpu.spec, gpu.mode) == (spec, mode) {
            if gpu.pending_shape.is_some() {
                self.unindex(gpu_idx);
                if let Some(g) = self.gpu_mut(gpu_idx) {
                    g.pending_shape = None;
                }
                self.index(gpu_idx);
            }
            return;
        }
        if gpu.held > 0 {
            self.unindex(gpu_idx);
            if let Some(g) = self.gpu_mut(gpu_idx) {
                g.pending_shape = Some((spec, mode));
            }
            return;
        }
        let Some(max_vgpus) = self.catalog.spec(spec).map(|s| s.max_vgpus) else {
            return;
        };
        self.set_warm(gpu_idx, None, &[]);
        self.unindex(gpu_idx);
        let region = self.gpu(gpu_idx).map(|g| g.region);
        let slot_count = if mode == GpuMode::Exclusive {
            1
        } else {
            max_vgpus.max(1)
        };
        if let Some(g) = self.gpu_mut(gpu_idx) {
            g.spec = spec;
            g.mode = mode;
            g.profile = None;
            g.slots = vec![Slot::Free; usize::from(slot_count)];
            g.slot_profile = vec![None; usize::from(slot_count)];
            g.slot_cap = if mode == GpuMode::EqualSize {
                0
            } else {
                slot_count
            };
            g.used = Usage::default();
            g.pending_shape = None;
        }
        if let Some(region) = region {
            self.indices.add_spec(region, spec);
        }
        self.index(gpu_idx);
    }

    /// How many more sessions of `tier` fit on `gpu` now, counting it as if it took only that
    /// tier: exact for equal-size GPUs, bounded by free framebuffer and slots otherwise.
    pub fn free_sessions_of_tier(&self, gpu_idx: GpuIdx, tier: TierIdx) -> Option<u16> {
        let gpu = self.gpu(gpu_idx)?;
        if gpu.exclusive || gpu.pending_shape.is_some() || gpu.steered {
            return Some(0);
        }
        let fit = self.catalog.fit(gpu.spec, tier);
        let occupied = gpu.occupied();
        match gpu.mode {
            GpuMode::EqualSize => {
                let (profile, slots) = fit.equal?;
                Some(if occupied == 0 {
                    slots
                } else if gpu.profile == Some(profile) {
                    gpu.slot_cap.saturating_sub(occupied)
                } else {
                    0
                })
            }
            GpuMode::Exclusive => Some(u16::from(occupied == 0 && fit.exclusive)),
            GpuMode::MixedSize | GpuMode::Mig => {
                let spec = self.catalog.spec(gpu.spec)?;
                let per = self
                    .catalog
                    .tier(tier)?
                    .framebuffer
                    .megabytes()
                    .get()
                    .max(1);
                let by_fb = spec.framebuffer.get().saturating_sub(gpu.used.fb_mb) / per;
                let free_slots = gpu.slot_cap.saturating_sub(occupied);
                Some(u16::try_from(by_fb).unwrap_or(u16::MAX).min(free_slots))
            }
        }
    }

    /// Steers `gpu` away (`on`) or back: while steered it is in no index set, so no strategy
    /// offers it for a new session or hands out its warm instances. Its slots, sessions and
    /// accounting are not touched.
    pub fn set_steered(&mut self, gpu_idx: GpuIdx, on: bool) {
        self.unindex(gpu_idx);
        if let Some(g) = self.gpu_mut(gpu_idx) {
            g.steered = on;
        }
        self.index(gpu_idx);
    }

    /// Recomputes where `gpu` belongs in the indices (after a node changed state).
    pub fn reindex(&mut self, gpu_idx: GpuIdx) {
        self.unindex(gpu_idx);
        self.index(gpu_idx);
    }

    fn catalog_fit_slots(&self, gpu_idx: GpuIdx, tier: TierIdx) -> Option<u16> {
        let gpu = self.gpu(gpu_idx)?;
        self.catalog
            .fit(gpu.spec, tier)
            .equal
            .map(|(_, slots)| slots)
    }

    fn unindex(&mut self, gpu_idx: GpuIdx) {
        let Some(gpu) = self.gpus.get_mut(to_usize(gpu_idx)) else {
            return;
        };
        let m = std::mem::take(&mut gpu.membership);
        let (region, spec) = (gpu.region, gpu.spec);
        let warm: Vec<(u16, GameIdx, TierIdx)> = if gpu.warm > 0 {
            warm_slots(gpu)
        } else {
            Vec::new()
        };
        self.indices.remove(gpu_idx, region, spec, m);
        for (slot, game, tier) in warm {
            self.indices
                .set_warm((region, game, tier), (gpu_idx, slot), false);
        }
    }

    fn index(&mut self, gpu_idx: GpuIdx) {
        let Some(gpu) = self.gpu(gpu_idx) else { return };
        let accepting = gpu.present
            && !gpu.exclusive
            && !gpu.steered
            && gpu.pending_shape.is_none()
            && self.node(gpu.node).is_some_and(Node::accepts_sessions)
            && self.catalog.spec(gpu.spec).is_some_and(|s| s.can_stream());
        if !accepting {
            return;
        }
        let occupied = gpu.occupied();
        let m = Membership {
            partial: match (gpu.mode, gpu.profile) {
                (GpuMode::EqualSize, Some(p)) if occupied < gpu.slot_cap => {
                    Some((p, gpu.slot_cap - occupied))
                }
                _ => None,
            },
            empty: occupied == 0,
            flex: matches!(gpu.mode, GpuMode::MixedSize | GpuMode::Mig) && occupied < gpu.slot_cap,
        };
        let (region, spec) = (gpu.region, gpu.spec);
        let warm = if gpu.warm > 0 {
            warm_slots(gpu)
        } else {
            Vec::new()
        };
        self.indices.insert(gpu_idx, region, spec, m);
        for (slot, game, tier) in warm {
            self.indices
                .set_warm((region, game, tier), (gpu_idx, slot), true);
        }
        if let Some(g) = self.gpu_mut(gpu_idx) {
            g.membership = m;
        }
    }
}

fn warm_slots(gpu: &Gpu) -> Vec<(u16, GameIdx, TierIdx)> {
    gpu.slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Slot::Warm { game, tier } => Some((u16::try_from(i).ok()?, *game, *tier)),
            _ => None,
        })
        .collect()
}

fn count_profile(gpu: &Gpu, p: ProfileIdx) -> u16 {
    let n = gpu
        .slots
        .iter()
        .zip(&gpu.slot_profile)
        .filter(|(s, sp)| **s != Slot::Free && **sp == Some(p))
        .count();
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn profile_fb(catalog: &Catalog, spec: SpecIdx, mode: GpuMode, p: ProfileIdx) -> u64 {
    catalog
        .profile(spec, mode, p)
        .map_or(0, |p| p.framebuffer.megabytes().get())
}

/// `x` in thousandths, rounded; weights are validated to small positive ranges.
fn milli(x: f64) -> u32 {
    let m = (x * 1000.0).round();
    if m.is_finite() && m >= 0.0 && m <= f64::from(u32::MAX) {
        // In range by the check above.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let v = m as u32;
        v
    } else {
        0
    }
}

/// `base × weight_milli / 1000`, saturating.
fn scale(base: u32, weight_milli: u32) -> u32 {
    u32::try_from(u64::from(base) * u64::from(weight_milli) / 1000).unwrap_or(u32::MAX)
}

/// A `u32` index as `usize`.
pub fn to_usize(i: u32) -> usize {
    usize::try_from(i).unwrap_or(usize::MAX)
}

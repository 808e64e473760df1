//! Pre-allocation: bringing a host's vGPUs to what the broker's `PoolPlan` asks for.
//!
//! Each pass compares the plan with the pool and acts: removes idle vGPUs of another profile
//! (an equal-size GPU changes profile only when none of its vGPUs is in use), removes idle
//! surplus, creates what is missing. A failure stops that GPU's pass and is reported; what was
//! created stays in the pool's books, so nothing leaks and the next pass resumes from there.

use uuid::Uuid;

use framecast_shared::ids::GpuId;
use framecast_shared::protocol::PoolPlan;

use super::VgpuPool;

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanProgress {
    /// The plan applied.
    pub plan_generation: u64,
    /// vGPUs created.
    pub created: usize,
    /// vGPUs removed.
    pub removed: usize,
    /// What could not be done, one line per GPU.
    pub failures: Vec<String>,
}

impl PlanProgress {
    /// Whether the pool now matches the plan.
    pub fn complete(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Applies `plan` to `pool`. `in_use` says whether a vGPU holds a session or a warm instance;
/// those are never removed.
pub fn apply(
    pool: &mut VgpuPool,
    plan: &PoolPlan,
    in_use: &dyn Fn(&GpuId, Uuid) -> bool,
) -> PlanProgress {
    let mut progress = PlanProgress {
        plan_generation: plan.plan_generation,
        ..PlanProgress::default()
    };
    for target in &plan.gpus {
        if let Err(e) = apply_gpu(
            pool,
            &target.gpu,
            target.profile.as_deref(),
            usize::from(target.vgpus),
            in_use,
            &mut progress,
        ) {
            progress.failures.push(format!("{}: {e}", target.gpu));
        }
    }
    progress
}

fn apply_gpu(
    pool: &mut VgpuPool,
    gpu: &GpuId,
    profile: Option<&str>,
    want: usize,
    in_use: &dyn Fn(&GpuId, Uuid) -> bool,
    progress: &mut PlanProgress,
) -> Result<(), super::VgpuError> {
    if !pool.has_gpu(gpu) {
        return Err(super::VgpuError::Limit {
            gpu: gpu.clone(),
            rule: "not on this host".into(),
        });
    }
    let current = pool.vgpus_with_profile(gpu);
    // vGPUs of another profile (or all, when the plan names none), then surplus of the profile.
    let (keep, other): (Vec<_>, Vec<_>) = current
        .into_iter()
        .partition(|(_, p)| Some(p.as_str()) == profile);
    let surplus = keep.len().saturating_sub(want);
    let mut idle_keep: Vec<Uuid> = keep
        .iter()
        .map(|(v, _)| v.uuid)
        .filter(|u| !in_use(gpu, *u))
        .collect();
    idle_keep.truncate(surplus);
    for uuid in other
        .iter()
        .map(|(v, _)| v.uuid)
        .filter(|u| !in_use(gpu, *u))
        .chain(idle_keep)
    {
        pool.remove(gpu, uuid)?;
        progress.removed += 1;
    }
    let busy_other = other.iter().filter(|(v, _)| in_use(gpu, v.uuid)).count();
    if busy_other > 0 {
        return Err(super::VgpuError::Limit {
            gpu: gpu.clone(),
            rule: format!(
                "{busy_other} vGPUs of another profile are in use; the GPU changes profile once they are free"
            ),
        });
    }
    let Some(profile) = profile else {
        return Ok(());
    };
    // Idle surplus was removed above; busy surplus stays, and is still at least `want`.
    let have = keep.len().saturating_sub(surplus);
    for _ in have..want {
        pool.create(gpu, profile)?;
        progress.created += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use framecast_shared::gpu::{GpuMode, models};
    use framecast_shared::protocol::{GpuPlan, PoolPlan};

    use super::*;
    use crate::vgpu::GpuHandle;
    use crate::vgpu::simulated::SimulatedBackend;

    fn pool() -> (VgpuPool, GpuId) {
        let mut pool = VgpuPool::new(Box::new(SimulatedBackend::default()));
        let id = GpuId::new("sim-0").unwrap();
        pool.add_gpu(
            GpuHandle {
                id: id.clone(),
                pci: None,
            },
            models::l4(),
            GpuMode::EqualSize,
        )
        .unwrap();
        (pool, id)
    }

    fn plan(generation: u64, gpu: &GpuId, profile: Option<&str>, vgpus: u16) -> PoolPlan {
        PoolPlan {
            plan_generation: generation,
            gpus: vec![GpuPlan {
                gpu: gpu.clone(),
                mode: GpuMode::EqualSize,
                profile: profile.map(Into::into),
                vgpus,
                warm: Vec::new(),
            }],
        }
    }

    fn profiles(pool: &VgpuPool, gpu: &GpuId) -> Vec<String> {
        pool.vgpus_with_profile(gpu)
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    #[test]
    fn a_plan_creates_then_trims_then_switches_profile() {
        let (mut pool, gpu) = pool();
        let idle = |_: &GpuId, _: Uuid| false;
        let p = apply(&mut pool, &plan(1, &gpu, Some("L4-4Q"), 4), &idle);
        assert_eq!((p.created, p.removed, p.complete()), (4, 0, true));
        let p = apply(&mut pool, &plan(2, &gpu, Some("L4-4Q"), 2), &idle);
        assert_eq!((p.created, p.removed), (0, 2));
        let p = apply(&mut pool, &plan(3, &gpu, Some("L4-8Q"), 3), &idle);
        assert_eq!((p.created, p.removed, p.complete()), (3, 2, true));
        assert_eq!(profiles(&pool, &gpu), ["L4-8Q"; 3]);
        // Applying the same plan again changes nothing.
        assert_eq!(
            apply(&mut pool, &plan(3, &gpu, Some("L4-8Q"), 3), &idle),
            PlanProgress {
                plan_generation: 3,
                ..PlanProgress::default()
            }
        );
    }

    #[test]
    fn vgpus_in_use_are_never_removed() {
        let (mut pool, gpu) = pool();
        apply(&mut pool, &plan(1, &gpu, Some("L4-4Q"), 2), &|_, _| false);
        let busy = pool.vgpus(&gpu)[0].uuid;
        let in_use = move |_: &GpuId, u: Uuid| u == busy;
        let p = apply(&mut pool, &plan(2, &gpu, Some("L4-8Q"), 3), &in_use);
        assert_eq!(p.removed, 1);
        assert!(!p.complete());
        assert!(p.failures[0].contains("in use"), "{:?}", p.failures);
        assert_eq!(
            pool.vgpus(&gpu).iter().map(|v| v.uuid).collect::<Vec<_>>(),
            [busy]
        );
    }

    #[test]
    fn a_plan_past_the_limits_stops_without_leaking() {
        let (mut pool, gpu) = pool();
        let p = apply(&mut pool, &plan(1, &gpu, Some("L4-8Q"), 5), &|_, _| false);
        assert_eq!(p.created, 3);
        assert!(!p.complete());
        assert_eq!(
            pool.vgpus(&gpu).len(),
            3,
            "the three created stay in the books"
        );
        let unknown = GpuId::new("nope").unwrap();
        let p = apply(&mut pool, &plan(2, &unknown, Some("L4-8Q"), 1), &|_, _| {
            false
        });
        assert!(p.failures[0].starts_with("nope: "), "{:?}", p.failures);
    }
}

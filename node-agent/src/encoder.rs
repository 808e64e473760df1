//! NVENC encoder slots: per GPU, an accountant of encoder throughput and sessions, and the
//! lease a stream holds for its whole life.
//!
//! A lease is a value: dropping it gives its units and its session back, so no path that ends
//! a stream — a clean release, an error, a panic unwinding through the stream's task — can leak
//! a slot.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use framecast_shared::gpu::GpuSpec;
use framecast_shared::ids::GpuId;
use framecast_shared::units::EncoderUnits;

/// Why a lease was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncoderError {
    /// Not enough encoder throughput left.
    #[error("encoder on {gpu} is busy: {needed} needed, {free} free")]
    Busy {
        /// The GPU.
        gpu: GpuId,
        /// What the stream needs.
        needed: EncoderUnits,
        /// What is left.
        free: EncoderUnits,
    },
    /// The driver's cap on concurrent encoder sessions is reached (GeForce cards).
    #[error("encoder on {gpu} has reached its cap of {cap} sessions")]
    SessionCap {
        /// The GPU.
        gpu: GpuId,
        /// The cap.
        cap: u16,
    },
    /// The GPU has no NVENC at all.
    #[error("{gpu} has no video encoder")]
    NoEncoder {
        /// The GPU.
        gpu: GpuId,
    },
}

#[derive(Debug)]
struct Books {
    capacity: EncoderUnits,
    session_cap: Option<u16>,
    used: EncoderUnits,
    sessions: u16,
}

/// The encoder slots of one GPU. Cheap to clone; clones share the books.
#[derive(Clone)]
pub struct EncoderSlots {
    gpu: GpuId,
    books: Arc<Mutex<Books>>,
}

impl fmt::Debug for EncoderSlots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.books();
        f.debug_struct("EncoderSlots")
            .field("gpu", &self.gpu)
            .field("capacity", &b.capacity)
            .field("used", &b.used)
            .field("sessions", &b.sessions)
            .finish()
    }
}

/// A snapshot of a GPU's encoder use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderUsage {
    /// Throughput the GPU has for streams.
    pub capacity: EncoderUnits,
    /// Throughput leased.
    pub used: EncoderUnits,
    /// Leases held.
    pub sessions: u16,
    /// The driver's session cap, if any.
    pub session_cap: Option<u16>,
}

impl EncoderSlots {
    /// Slots for a GPU with `capacity` units and an optional driver session cap.
    pub fn new(gpu: GpuId, capacity: EncoderUnits, session_cap: Option<u16>) -> Self {
        Self {
            gpu,
            books: Arc::new(Mutex::new(Books {
                capacity,
                session_cap,
                used: EncoderUnits::ZERO,
                sessions: 0,
            })),
        }
    }

    /// Slots for a GPU of model `spec`. Where NVML reported the encoder's remaining capacity
    /// as a percentage (`nvml_capacity_pct`, which counts encoders other processes already
    /// run), the model's capacity is scaled by it; otherwise the model table's figure holds.
    pub fn for_gpu(gpu: GpuId, spec: &GpuSpec, nvml_capacity_pct: Option<u32>) -> Self {
        let table = spec.encoder_capacity.milli();
        let capacity = match nvml_capacity_pct {
            Some(pct) => {
                u32::try_from(u64::from(table) * u64::from(pct.min(100)) / 100).unwrap_or(table)
            }
            None => table,
        };
        Self::new(
            gpu,
            EncoderUnits::from_milli(capacity),
            spec.encoder_session_cap,
        )
    }

    /// Leases `units` of throughput and one session for a stream, until the lease is dropped.
    pub fn lease(&self, units: EncoderUnits) -> Result<EncoderLease, EncoderError> {
        let mut b = self.books();
        if b.capacity == EncoderUnits::ZERO {
            return Err(EncoderError::NoEncoder {
                gpu: self.gpu.clone(),
            });
        }
        if let Some(cap) = b.session_cap.filter(|cap| b.sessions >= *cap) {
            return Err(EncoderError::SessionCap {
                gpu: self.gpu.clone(),
                cap,
            });
        }
        let free = b.capacity.saturating_sub(b.used);
        if units > free {
            return Err(EncoderError::Busy {
                gpu: self.gpu.clone(),
                needed: units,
                free,
            });
        }
        b.used += units;
        b.sessions += 1;
        Ok(EncoderLease {
            gpu: self.gpu.clone(),
            units,
            books: Arc::clone(&self.books),
        })
    }

    /// What is in use now.
    pub fn usage(&self) -> EncoderUsage {
        let b = self.books();
        EncoderUsage {
            capacity: b.capacity,
            used: b.used,
            sessions: b.sessions,
            session_cap: b.session_cap,
        }
    }

    /// The GPU.
    pub fn gpu(&self) -> &GpuId {
        &self.gpu
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        // The books hold plain counters that every critical section leaves consistent, so a
        // panic elsewhere while the lock was held cannot have broken them.
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One stream's hold on an encoder; dropping it frees the slot.
#[derive(Debug)]
#[must_use = "dropping the lease frees the encoder slot at once"]
pub struct EncoderLease {
    gpu: GpuId,
    units: EncoderUnits,
    books: Arc<Mutex<Books>>,
}

impl EncoderLease {
    /// The GPU the stream encodes on.
    pub fn gpu(&self) -> &GpuId {
        &self.gpu
    }

    /// The throughput held.
    pub fn units(&self) -> EncoderUnits {
        self.units
    }
}

impl Drop for EncoderLease {
    fn drop(&mut self) {
        let mut b = self.books.lock().unwrap_or_else(PoisonError::into_inner);
        b.used = b.used.saturating_sub(self.units);
        b.sessions = b.sessions.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use framecast_shared::gpu::models;

    use super::*;

    fn units(milli: u32) -> EncoderUnits {
        EncoderUnits::from_milli(milli)
    }

    #[test]
    fn leases_take_units_and_give_them_back_on_drop() {
        let slots = EncoderSlots::for_gpu(GpuId::new("g0").unwrap(), &models::l4(), None);
        assert_eq!(slots.usage().capacity, units(12_000));
        let a = slots.lease(units(4_000)).unwrap();
        let b = slots.lease(units(4_000)).unwrap();
        let c = slots.lease(units(4_000)).unwrap();
        assert_eq!(
            slots.lease(units(445)).err(),
            Some(EncoderError::Busy {
                gpu: GpuId::new("g0").unwrap(),
                needed: units(445),
                free: units(0)
            })
        );
        drop(b);
        assert_eq!(slots.usage().used, units(8_000));
        let d = slots.lease(units(445)).unwrap();
        assert_eq!(slots.usage().sessions, 3);
        drop((a, c, d));
        assert_eq!(
            slots.usage(),
            EncoderUsage {
                capacity: units(12_000),
                used: units(0),
                sessions: 0,
                session_cap: None
            }
        );
    }

    #[test]
    fn consumer_cards_cap_sessions() {
        let slots = EncoderSlots::for_gpu(GpuId::new("g0").unwrap(), &models::rtx_4090(), None);
        let leases: Vec<_> = (0..8).map(|_| slots.lease(units(100)).unwrap()).collect();
        assert!(matches!(
            slots.lease(units(100)),
            Err(EncoderError::SessionCap { cap: 8, .. })
        ));
        drop(leases);
        assert!(slots.lease(units(100)).is_ok());
    }

    #[test]
    fn gpus_without_nvenc_lease_nothing() {
        let slots = EncoderSlots::for_gpu(GpuId::new("g0").unwrap(), &models::a100_40gb(), None);
        assert!(matches!(
            slots.lease(units(1)),
            Err(EncoderError::NoEncoder { .. })
        ));
    }

    #[test]
    fn nvml_remaining_capacity_scales_the_table() {
        let slots = EncoderSlots::for_gpu(GpuId::new("g0").unwrap(), &models::l4(), Some(50));
        assert_eq!(slots.usage().capacity, units(6_000));
        let slots = EncoderSlots::for_gpu(GpuId::new("g0").unwrap(), &models::l4(), Some(250));
        assert_eq!(
            slots.usage().capacity,
            units(12_000),
            "a bogus percentage is capped at 100"
        );
    }

    #[test]
    fn a_panicking_stream_still_frees_its_slot() {
        let slots = EncoderSlots::for_gpu(GpuId::new("g0").unwrap(), &models::l4(), None);
        let s = slots.clone();
        let joined = thread::spawn(move || {
            let _lease = s.lease(units(1_000)).unwrap();
            panic!("the stream task dies");
        })
        .join();
        assert!(joined.is_err());
        assert_eq!(slots.usage().sessions, 0);
        assert_eq!(slots.usage().used, units(0));
    }

    #[test]
    fn concurrent_leases_never_exceed_capacity() {
        let slots = EncoderSlots::for_gpu(GpuId::new("g0").unwrap(), &models::l4(), None);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = slots.clone();
                thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..2_000u32 {
                        if let Ok(l) = s.lease(units(445 + i % 3 * 555)) {
                            held.push(l);
                        }
                        let u = s.usage();
                        assert!(u.used <= u.capacity, "{u:?}");
                        if i % 3 == 0 {
                            held.pop();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(slots.usage().used, units(0));
        assert_eq!(slots.usage().sessions, 0);
    }
}

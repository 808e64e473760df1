//! Units of GPU capacity as newtypes.
//!
//! A session consumes three resources of a physical GPU (see `docs/ARCHITECTURE.md`,
//! capacity model): framebuffer in [`Megabytes`] (a vGPU's is a [`FramebufferSize`], a
//! multiple of 64 MB), compute as a [`ComputeShare`] of sixteenths, and encoder throughput in
//! [`EncoderUnits`]. Each constructor refuses values outside its rule, so a value of these
//! types is always valid.

use std::fmt;
use std::num::NonZeroU16;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

/// Why a number is not a valid unit value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// A framebuffer size that is not a multiple of the vGPU granularity.
    #[error("must be a multiple of {granularity} MB, got {value}")]
    NotMultiple {
        /// The value given, in MB.
        value: u64,
        /// The granularity, in MB.
        granularity: u64,
    },
    /// A value outside its allowed range.
    #[error("must be in {min}..={max}, got {value}")]
    OutOfRange {
        /// The value given, as text (it may be fractional).
        value: String,
        /// The smallest allowed value.
        min: String,
        /// The largest allowed value.
        max: String,
    },
}

/// An amount of GPU memory in megabytes, where one MB is 2^20 bytes (MiB), the unit NVIDIA's
/// vGPU documentation and NVML's framebuffer sizes use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Megabytes(u64);

impl Megabytes {
    /// Zero megabytes.
    pub const ZERO: Self = Self(0);

    /// `mb` megabytes.
    pub const fn new(mb: u64) -> Self {
        Self(mb)
    }

    /// `gb` gigabytes (1 GB = 1024 MB).
    pub const fn from_gb(gb: u64) -> Self {
        Self(gb * 1024)
    }

    /// The amount in MB.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// `self - other`, or `None` when `other` is larger.
    pub fn checked_sub(self, other: Self) -> Option<Self> {
        self.0.checked_sub(other.0).map(Self)
    }

    /// `self - other`, floored at zero.
    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }
}

impl Add for Megabytes {
    type Output = Self;
    fn add(self, rhs: Self) -> Self {
        Self(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Megabytes {
    fn add_assign(&mut self, rhs: Self) {
        *self = *self + rhs;
    }
}

impl fmt::Display for Megabytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MB", self.0)
    }
}

/// A vGPU framebuffer size: a non-zero multiple of [`FramebufferSize::GRANULARITY`] (64 MB).
///
/// ```
/// use framecast_shared::units::FramebufferSize;
///
/// assert_eq!(FramebufferSize::new(8192)?.megabytes().get(), 8192);
/// let err = FramebufferSize::new(8100).unwrap_err();
/// assert_eq!(err.to_string(), "must be a multiple of 64 MB, got 8100");
/// # Ok::<(), framecast_shared::units::UnitError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct FramebufferSize(Megabytes);

impl FramebufferSize {
    /// The step in which vGPU framebuffers are sized.
    pub const GRANULARITY: Megabytes = Megabytes::new(64);

    /// `mb` megabytes, refused unless it is a non-zero multiple of 64.
    pub fn new(mb: u64) -> Result<Self, UnitError> {
        let granularity = Self::GRANULARITY.get();
        if mb == 0 {
            return Err(UnitError::OutOfRange {
                value: "0".into(),
                min: granularity.to_string(),
                max: u64::MAX.to_string(),
            });
        }
        if !mb.is_multiple_of(granularity) {
            return Err(UnitError::NotMultiple {
                value: mb,
                granularity,
            });
        }
        Ok(Self(Megabytes::new(mb)))
    }

    /// `gb` gigabytes (1 GB = 1024 MB, so always a multiple of 64 MB).
    pub const fn from_gb(gb: NonZeroU16) -> Self {
        Self(Megabytes::from_gb(gb.get() as u64))
    }

    /// The size in MB.
    pub const fn megabytes(self) -> Megabytes {
        self.0
    }
}

impl TryFrom<u64> for FramebufferSize {
    type Error = UnitError;
    fn try_from(mb: u64) -> Result<Self, UnitError> {
        Self::new(mb)
    }
}

impl From<FramebufferSize> for u64 {
    fn from(fb: FramebufferSize) -> u64 {
        fb.0.get()
    }
}

impl fmt::Display for FramebufferSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A share of a GPU's compute, in sixteenths: 1 is 1/16 of the SMs' time, 16 the whole GPU.
///
/// The share is enforced only where the GPU mode enforces it (NVIDIA's fixed- or equal-share
/// vGPU schedulers, MIG); elsewhere the placer treats it as a soft, weighted dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct ComputeShare(u8);

impl ComputeShare {
    /// The smallest share, 1/16.
    pub const MIN: Self = Self(1);
    /// The whole GPU, 16/16.
    pub const FULL: Self = Self(16);

    /// `sixteenths`/16, refused outside 1..=16.
    pub fn new(sixteenths: u8) -> Result<Self, UnitError> {
        if (1..=16).contains(&sixteenths) {
            Ok(Self(sixteenths))
        } else {
            Err(UnitError::OutOfRange {
                value: sixteenths.to_string(),
                min: "1".into(),
                max: "16".into(),
            })
        }
    }

    /// `n / d` of the GPU rounded down to sixteenths, at least 1/16: the share of one of `d`
    /// equal instances that each get `n` slices. `d` of zero reads as the whole GPU.
    pub fn from_fraction(n: u32, d: u32) -> Self {
        let sixteenths = (16 * u64::from(n)).checked_div(u64::from(d)).unwrap_or(16);
        Self(u8::try_from(sixteenths.clamp(1, 16)).unwrap_or(16))
    }

    /// The share in sixteenths.
    pub const fn sixteenths(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for ComputeShare {
    type Error = UnitError;
    fn try_from(v: u8) -> Result<Self, UnitError> {
        Self::new(v)
    }
}

impl From<ComputeShare> for u8 {
    fn from(c: ComputeShare) -> u8 {
        c.0
    }
}

impl fmt::Display for ComputeShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/16", self.0)
    }
}

/// Encoder throughput, where one unit is one 1080p60 H.264 stream (about 124 Mpixel/s).
///
/// A 720p60 stream costs about 0.45 units and a 4K60 stream about 4. Held in thousandths so
/// sums are exact; written in config and on the wire as a decimal number (`0.45`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(try_from = "f64", into = "f64")]
pub struct EncoderUnits(u32);

impl EncoderUnits {
    /// No encoder load.
    pub const ZERO: Self = Self(0);
    /// One 1080p60 H.264 stream.
    pub const ONE: Self = Self(1000);
    /// The largest value accepted: far above any GPU's capacity, small enough that sums of
    /// many of them cannot overflow.
    pub const MAX: Self = Self(1_000_000);

    /// `milli` thousandths of a unit, capped at [`EncoderUnits::MAX`].
    pub const fn from_milli(milli: u32) -> Self {
        if milli > Self::MAX.0 {
            Self::MAX
        } else {
            Self(milli)
        }
    }

    /// The value in thousandths of a unit.
    pub const fn milli(self) -> u32 {
        self.0
    }

    /// The value as a decimal number of units.
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 1000.0
    }

    /// `self - other`, or `None` when `other` is larger.
    pub fn checked_sub(self, other: Self) -> Option<Self> {
        self.0.checked_sub(other.0).map(Self)
    }

    /// `self - other`, floored at zero.
    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }
}

impl TryFrom<f64> for EncoderUnits {
    type Error = UnitError;
    fn try_from(units: f64) -> Result<Self, UnitError> {
        let max = Self::MAX.as_f64();
        if !units.is_finite() || !(0.0..=max).contains(&units) {
            return Err(UnitError::OutOfRange {
                value: units.to_string(),
                min: "0".into(),
                max: max.to_string(),
            });
        }
        // In range by the check above, so the cast cannot truncate or lose the sign.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(Self((units * 1000.0).round() as u32))
    }
}

impl From<EncoderUnits> for f64 {
    fn from(u: EncoderUnits) -> f64 {
        u.as_f64()
    }
}

impl Add for EncoderUnits {
    type Output = Self;
    fn add(self, rhs: Self) -> Self {
        Self(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for EncoderUnits {
    fn add_assign(&mut self, rhs: Self) {
        *self = *self + rhs;
    }
}

impl fmt::Display for EncoderUnits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} units", self.as_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framebuffer_sizes_are_non_zero_multiples_of_64() {
        assert_eq!(
            FramebufferSize::new(8192).unwrap().megabytes(),
            Megabytes::from_gb(8)
        );
        assert_eq!(
            FramebufferSize::new(8100),
            Err(UnitError::NotMultiple {
                value: 8100,
                granularity: 64
            })
        );
        assert_eq!(
            FramebufferSize::new(8100).unwrap_err().to_string(),
            "must be a multiple of 64 MB, got 8100"
        );
        assert!(FramebufferSize::new(0).is_err());
        assert!(FramebufferSize::new(64).is_ok());
        let two = NonZeroU16::new(2).unwrap();
        assert_eq!(
            FramebufferSize::from_gb(two).megabytes(),
            Megabytes::new(2048)
        );
    }

    #[test]
    fn compute_shares_stay_in_sixteenths() {
        assert!(ComputeShare::new(0).is_err());
        assert!(ComputeShare::new(17).is_err());
        assert_eq!(ComputeShare::new(16).unwrap(), ComputeShare::FULL);
        assert_eq!(ComputeShare::from_fraction(1, 7).sixteenths(), 2);
        assert_eq!(ComputeShare::from_fraction(7, 7), ComputeShare::FULL);
        assert_eq!(ComputeShare::from_fraction(1, 24), ComputeShare::MIN);
        assert_eq!(ComputeShare::from_fraction(1, 0), ComputeShare::FULL);
    }

    #[test]
    fn encoder_units_round_trip_through_decimals() {
        let u = EncoderUnits::try_from(0.45).unwrap();
        assert_eq!(u.milli(), 450);
        assert_eq!(EncoderUnits::try_from(u.as_f64()).unwrap(), u);
        assert!(EncoderUnits::try_from(-0.1).is_err());
        assert!(EncoderUnits::try_from(f64::NAN).is_err());
        assert!(EncoderUnits::try_from(f64::INFINITY).is_err());
        assert_eq!(EncoderUnits::from_milli(u32::MAX), EncoderUnits::MAX);
        assert_eq!(u.checked_sub(EncoderUnits::ONE), None);
    }

    #[test]
    fn megabyte_arithmetic_cannot_wrap() {
        assert_eq!(
            Megabytes::new(u64::MAX) + Megabytes::new(1),
            Megabytes::new(u64::MAX)
        );
        assert_eq!(Megabytes::new(1).checked_sub(Megabytes::new(2)), None);
        assert_eq!(
            Megabytes::new(1).saturating_sub(Megabytes::new(2)),
            Megabytes::ZERO
        );
    }
}

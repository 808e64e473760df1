//! Arbitrary values of the domain types, for property tests.
//!
//! Types whose every bit pattern is valid derive `Arbitrary`; the ones below hold an invariant,
//! so their strategies only produce valid values.

use proptest::prelude::*;

use crate::ids::{GameId, GenreName, GpuId, NodeId, RegionName, SessionId, TenantId, TierName};
use crate::time::Timestamp;
use crate::units::{ComputeShare, EncoderUnits, FramebufferSize};

/// A short vector, so nested messages stay small enough to test quickly.
pub(crate) fn small_vec<T: Arbitrary>() -> impl Strategy<Value = Vec<T>> {
    proptest::collection::vec(any::<T>(), 0..4)
}

macro_rules! arbitrary_token {
    ($($ty:ty => $regex:literal),* $(,)?) => {$(
        impl Arbitrary for $ty {
            type Parameters = ();
            type Strategy = BoxedStrategy<Self>;
            fn arbitrary_with(_: ()) -> Self::Strategy {
                proptest::string::string_regex($regex)
                    .expect("valid regex")
                    .prop_map(|s| <$ty>::new(s).expect("regex yields valid ids"))
                    .boxed()
            }
        }
    )*};
}

arbitrary_token! {
    NodeId => "[A-Za-z0-9._:-]{1,128}",
    GpuId => "[A-Za-z0-9._:-]{1,128}",
    TenantId => "[a-z0-9._-]{1,64}",
    GameId => "[a-z0-9._-]{1,64}",
    RegionName => "[a-z0-9._-]{1,64}",
    TierName => "[a-z0-9._-]{1,64}",
    GenreName => "[a-z0-9._-]{1,64}",
}

impl Arbitrary for SessionId {
    type Parameters = ();
    type Strategy = BoxedStrategy<Self>;
    fn arbitrary_with(_: ()) -> Self::Strategy {
        // UUIDv7 holds 48 bits of milliseconds.
        (0..(1u64 << 48), any::<u128>())
            .prop_map(|(ms, r)| SessionId::new(Timestamp::from_millis(ms), r))
            .boxed()
    }
}

impl Arbitrary for FramebufferSize {
    type Parameters = ();
    type Strategy = BoxedStrategy<Self>;
    fn arbitrary_with(_: ()) -> Self::Strategy {
        (1u64..=(u64::MAX / 64))
            .prop_map(|n| FramebufferSize::new(n * 64).expect("multiple of 64"))
            .boxed()
    }
}

impl Arbitrary for ComputeShare {
    type Parameters = ();
    type Strategy = BoxedStrategy<Self>;
    fn arbitrary_with(_: ()) -> Self::Strategy {
        (1u8..=16)
            .prop_map(|n| ComputeShare::new(n).expect("in range"))
            .boxed()
    }
}

impl Arbitrary for EncoderUnits {
    type Parameters = ();
    type Strategy = BoxedStrategy<Self>;
    fn arbitrary_with(_: ()) -> Self::Strategy {
        (0..=EncoderUnits::MAX.milli())
            .prop_map(EncoderUnits::from_milli)
            .boxed()
    }
}

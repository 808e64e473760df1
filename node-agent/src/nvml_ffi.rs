//! The NVML calls nvml-wrapper 0.13 does not wrap, made through its raw bindings
//! (`nvml-wrapper-sys`): MIG GPU and compute instances, and the AV1 encoder capacity.
//!
//! This is the agent's only `unsafe` code, and none of it leaks: every function here is safe
//! to call. Each one
//!
//! - takes an nvml-wrapper [`Device`], whose borrow of `Nvml` keeps the library loaded and
//!   initialised for the whole call (`Nvml` shuts NVML down and unloads it only on drop);
//! - resolves its symbol from the table `Nvml::init` filled, as a `Result`, so a driver too old
//!   to have it gives [`NvmlError::FailedToLoadSymbol`] instead of the panic the bindings'
//!   convenience methods would raise;
//! - calls it with the signature `bindgen` generated from `nvml.h`, passing pointers only to
//!   locals of the declared type that outlive the call;
//! - lets no raw handle out: GPU and compute instances leave this module as their ids and are
//!   looked up again for each operation, as NVML's documentation asks of MIG handles.
//!
//! NVML itself is thread-safe, so none of this needs a lock.

#![allow(unsafe_code)]

use std::ffi::c_uint;
use std::fmt::Display;
use std::ptr;

use nvml_wrapper::Device;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper_sys::bindings::{
    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, NVML_COMPUTE_INSTANCE_PROFILE_COUNT,
    nvmlComputeInstance_t, nvmlComputeInstanceInfo_t, nvmlComputeInstancePlacement_t,
    nvmlComputeInstanceProfileInfo_t, nvmlDevice_t,
    nvmlEncoderQueryType_enum_NVML_ENCODER_QUERY_AV1, nvmlGpuInstance_t, nvmlGpuInstanceInfo_t,
    nvmlGpuInstancePlacement_t, nvmlGpuInstanceProfileInfo_v2_t,
    nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES,
};

pub(crate) use nvml_wrapper_sys::bindings::NVML_GPU_INSTANCE_PROFILE_COUNT;

/// `nvmlGpuInstanceProfileInfo_v2`: `NVML_STRUCT_VERSION(GpuInstanceProfileInfo, 2)` in
/// `nvml.h`, the struct's size with the version in the top byte.
#[allow(clippy::cast_possible_truncation)] // the struct is 152 bytes
const GPU_INSTANCE_PROFILE_INFO_V2: c_uint =
    size_of::<nvmlGpuInstanceProfileInfo_v2_t>() as c_uint | (2 << 24);

/// What NVML says about one GPU instance profile (`MIG 1g.10gb`) of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GpuInstanceProfileInfo {
    /// The profile id that creating an instance takes (not the `NVML_GPU_INSTANCE_PROFILE_*`
    /// index it was asked for).
    pub(crate) id: u32,
    /// NVML's name for it, e.g. `MIG 1g.10gb`.
    pub(crate) name: String,
    /// Compute slices it takes.
    pub(crate) slices: u32,
    /// Most instances of it the GPU holds.
    pub(crate) instances: u32,
    /// Its memory, MB.
    pub(crate) memory_mb: u64,
}

/// Whether `e` is `NVML_ERROR_INSUFFICIENT_RESOURCES`, which nvml-wrapper has no variant for
/// and reports as [`NvmlError::UnexpectedVariant`]: the GPU has no room for that instance.
pub(crate) fn is_insufficient_resources(e: &NvmlError) -> bool {
    matches!(e, NvmlError::UnexpectedVariant(code)
        if *code == nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES)
}

/// Remaining AV1 encoder capacity of `device`, percent (`nvmlDeviceGetEncoderCapacity` with
/// `NVML_ENCODER_QUERY_AV1`, which nvml-wrapper's `EncoderType` lacks).
pub(crate) fn av1_encoder_capacity(device: &Device<'_>) -> Result<u32, NvmlError> {
    let query = *symbol(&device.nvml().lib().nvmlDeviceGetEncoderCapacity)?;
    let mut capacity: c_uint = 0;
    // SAFETY: `query` is `nvmlDeviceGetEncoderCapacity` with its `nvml.h` signature, from a
    // library `device` keeps loaded; the handle is `device`'s own, valid while it is borrowed;
    // `capacity` is a live `c_uint` NVML writes once.
    let code = unsafe {
        query(
            raw(device),
            nvmlEncoderQueryType_enum_NVML_ENCODER_QUERY_AV1,
            &mut capacity,
        )
    };
    nvml_try(code)?;
    Ok(capacity)
}

/// The GPU instance profile at `index` (one of `NVML_GPU_INSTANCE_PROFILE_*`, below
/// [`NVML_GPU_INSTANCE_PROFILE_COUNT`]); `NotSupported` or `InvalidArg` where the device has
/// none there.
pub(crate) fn gpu_instance_profile(
    device: &Device<'_>,
    index: u32,
) -> Result<GpuInstanceProfileInfo, NvmlError> {
    let query = *symbol(&device.nvml().lib().nvmlDeviceGetGpuInstanceProfileInfoV)?;
    let mut info = nvmlGpuInstanceProfileInfo_v2_t {
        version: GPU_INSTANCE_PROFILE_INFO_V2,
        id: 0,
        isP2pSupported: 0,
        sliceCount: 0,
        instanceCount: 0,
        multiprocessorCount: 0,
        copyEngineCount: 0,
        decoderCount: 0,
        encoderCount: 0,
        jpegCount: 0,
        ofaCount: 0,
        memorySizeMB: 0,
        name: [0; 96],
    };
    // SAFETY: `query` is `nvmlDeviceGetGpuInstanceProfileInfoV` with its `nvml.h` signature;
    // the handle is `device`'s; `info` is a live v2 struct whose `version` word says so, which
    // is what NVML checks before it writes at most `size_of` of it.
    let code = unsafe { query(raw(device), index, &mut info) };
    nvml_try(code)?;
    Ok(GpuInstanceProfileInfo {
        id: info.id,
        name: c_chars_to_string(&info.name),
        slices: info.sliceCount,
        instances: info.instanceCount,
        memory_mb: info.memorySizeMB,
    })
}

/// How many more instances of profile `profile_id` the device can take now.
pub(crate) fn gpu_instance_remaining_capacity(
    device: &Device<'_>,
    profile_id: u32,
) -> Result<u32, NvmlError> {
    let query = *symbol(
        &device
            .nvml()
            .lib()
            .nvmlDeviceGetGpuInstanceRemainingCapacity,
    )?;
    let mut count: c_uint = 0;
    // SAFETY: `nvmlDeviceGetGpuInstanceRemainingCapacity` with its `nvml.h` signature; the
    // handle is `device`'s; `count` is a live `c_uint`.
    let code = unsafe { query(raw(device), profile_id, &mut count) };
    nvml_try(code)?;
    Ok(count)
}

/// Creates a GPU instance of profile `profile_id` where the driver places it; its id.
pub(crate) fn create_gpu_instance(device: &Device<'_>, profile_id: u32) -> Result<u32, NvmlError> {
    let lib = device.nvml().lib();
    let create = *symbol(&lib.nvmlDeviceCreateGpuInstance)?;
    let mut instance: nvmlGpuInstance_t = ptr::null_mut();
    // SAFETY: `nvmlDeviceCreateGpuInstance` with its `nvml.h` signature; the handle is
    // `device`'s; `instance` is a live handle slot NVML fills on success.
    let code = unsafe { create(raw(device), profile_id, &mut instance) };
    nvml_try(code)?;
    match gpu_instance_info(device, instance) {
        Ok(info) => Ok(info.id),
        Err(e) => {
            // Without its id nobody could remove it: take it back now.
            let _ = destroy_gpu_instance_handle(device, instance);
            Err(e)
        }
    }
}

/// Creates, in GPU instance `gpu_instance`, one compute instance that spans all of it (the
/// shared-engine compute profile with the most slices the instance offers); its id.
pub(crate) fn create_compute_instance(
    device: &Device<'_>,
    gpu_instance: u32,
) -> Result<u32, NvmlError> {
    let lib = device.nvml().lib();
    let profile_info = *symbol(&lib.nvmlGpuInstanceGetComputeInstanceProfileInfo)?;
    let create = *symbol(&lib.nvmlGpuInstanceCreateComputeInstance)?;
    let info_of = *symbol(&lib.nvmlComputeInstanceGetInfo_v2)?;
    let destroy = *symbol(&lib.nvmlComputeInstanceDestroy)?;
    let gi = gpu_instance_by_id(device, gpu_instance)?;
    // The largest compute profile: (slices, id).
    let mut widest: Option<(u32, u32)> = None;
    for index in 0..NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
        let mut info = nvmlComputeInstanceProfileInfo_t {
            id: 0,
            sliceCount: 0,
            instanceCount: 0,
            multiprocessorCount: 0,
            sharedCopyEngineCount: 0,
            sharedDecoderCount: 0,
            sharedEncoderCount: 0,
            sharedJpegCount: 0,
            sharedOfaCount: 0,
        };
        // SAFETY: `nvmlGpuInstanceGetComputeInstanceProfileInfo` with its `nvml.h` signature;
        // `gi` was looked up from `device` just above and is not kept; `info` is a live
        // (unversioned, v1) struct of the declared type.
        let code = unsafe {
            profile_info(
                gi,
                index,
                NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                &mut info,
            )
        };
        if nvml_try(code).is_ok() && widest.is_none_or(|(slices, _)| info.sliceCount > slices) {
            widest = Some((info.sliceCount, info.id));
        }
    }
    let (_, profile_id) = widest.ok_or(NvmlError::NotSupported)?;
    let mut instance: nvmlComputeInstance_t = ptr::null_mut();
    // SAFETY: `nvmlGpuInstanceCreateComputeInstance` with its `nvml.h` signature; `gi` as
    // above; `instance` is a live handle slot NVML fills on success.
    let code = unsafe { create(gi, profile_id, &mut instance) };
    nvml_try(code)?;
    let mut info = nvmlComputeInstanceInfo_t {
        device: ptr::null_mut(),
        gpuInstance: ptr::null_mut(),
        id: 0,
        profileId: 0,
        placement: nvmlComputeInstancePlacement_t { start: 0, size: 0 },
    };
    // SAFETY: `nvmlComputeInstanceGetInfo_v2` with its `nvml.h` signature; `instance` was
    // returned by the successful create above; `info` is a live struct of the declared type.
    let code = unsafe { info_of(instance, &mut info) };
    match nvml_try(code) {
        Ok(()) => Ok(info.id),
        Err(e) => {
            // Without its id nobody could remove it: take it back now.
            // SAFETY: `nvmlComputeInstanceDestroy` on the handle the create above returned,
            // which nothing else holds.
            let _ = unsafe { destroy(instance) };
            Err(e)
        }
    }
}

/// Destroys compute instance `compute_instance` (where given and still there), then GPU
/// instance `gpu_instance`. NVML refuses the second (`InUse`) while the GPU instance holds
/// other compute instances.
pub(crate) fn destroy_instance(
    device: &Device<'_>,
    gpu_instance: u32,
    compute_instance: Option<u32>,
) -> Result<(), NvmlError> {
    let lib = device.nvml().lib();
    let gi = gpu_instance_by_id(device, gpu_instance)?;
    if let Some(ci_id) = compute_instance {
        let by_id = *symbol(&lib.nvmlGpuInstanceGetComputeInstanceById)?;
        let destroy = *symbol(&lib.nvmlComputeInstanceDestroy)?;
        let mut ci: nvmlComputeInstance_t = ptr::null_mut();
        // SAFETY: `nvmlGpuInstanceGetComputeInstanceById` with its `nvml.h` signature; `gi` was
        // looked up from `device` just above; `ci` is a live handle slot.
        let code = unsafe { by_id(gi, ci_id, &mut ci) };
        match nvml_try(code) {
            // SAFETY: `nvmlComputeInstanceDestroy` on the handle NVML just returned.
            Ok(()) => nvml_try(unsafe { destroy(ci) })?,
            // Already gone: the GPU instance can still go.
            Err(NvmlError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    destroy_gpu_instance_handle(device, gi)
}

/// The profile id of GPU instance `gpu_instance`.
pub(crate) fn gpu_instance_profile_id(
    device: &Device<'_>,
    gpu_instance: u32,
) -> Result<u32, NvmlError> {
    let gi = gpu_instance_by_id(device, gpu_instance)?;
    gpu_instance_info(device, gi).map(|info| info.profileId)
}

/// The GPU and compute instance ids of a MIG device (a handle from `mig_device_by_index`).
pub(crate) fn mig_device_instance_ids(mig_device: &Device<'_>) -> Result<(u32, u32), NvmlError> {
    let lib = mig_device.nvml().lib();
    let gi_of = *symbol(&lib.nvmlDeviceGetGpuInstanceId)?;
    let ci_of = *symbol(&lib.nvmlDeviceGetComputeInstanceId)?;
    let (mut gi, mut ci): (c_uint, c_uint) = (0, 0);
    // SAFETY: `nvmlDeviceGetGpuInstanceId` with its `nvml.h` signature; the handle is
    // `mig_device`'s, valid while it is borrowed; `gi` is a live `c_uint`.
    nvml_try(unsafe { gi_of(raw(mig_device), &mut gi) })?;
    // SAFETY: as above, for `nvmlDeviceGetComputeInstanceId` and `ci`.
    nvml_try(unsafe { ci_of(raw(mig_device), &mut ci) })?;
    Ok((gi, ci))
}

fn gpu_instance_by_id(device: &Device<'_>, id: u32) -> Result<nvmlGpuInstance_t, NvmlError> {
    let by_id = *symbol(&device.nvml().lib().nvmlDeviceGetGpuInstanceById)?;
    let mut gi: nvmlGpuInstance_t = ptr::null_mut();
    // SAFETY: `nvmlDeviceGetGpuInstanceById` with its `nvml.h` signature; the handle is
    // `device`'s; `gi` is a live handle slot NVML fills on success.
    nvml_try(unsafe { by_id(raw(device), id, &mut gi) })?;
    Ok(gi)
}

fn gpu_instance_info(
    device: &Device<'_>,
    gi: nvmlGpuInstance_t,
) -> Result<nvmlGpuInstanceInfo_t, NvmlError> {
    let info_of = *symbol(&device.nvml().lib().nvmlGpuInstanceGetInfo)?;
    let mut info = nvmlGpuInstanceInfo_t {
        device: ptr::null_mut(),
        id: 0,
        profileId: 0,
        placement: nvmlGpuInstancePlacement_t { start: 0, size: 0 },
    };
    // SAFETY: `nvmlGpuInstanceGetInfo` with its `nvml.h` signature; every caller passes a
    // handle NVML returned for `device` within the same call of ours; `info` is a live struct
    // of the declared type.
    nvml_try(unsafe { info_of(gi, &mut info) })?;
    Ok(info)
}

fn destroy_gpu_instance_handle(
    device: &Device<'_>,
    gi: nvmlGpuInstance_t,
) -> Result<(), NvmlError> {
    let destroy = *symbol(&device.nvml().lib().nvmlGpuInstanceDestroy)?;
    // SAFETY: `nvmlGpuInstanceDestroy` with its `nvml.h` signature, on a handle NVML returned
    // for `device` within the same call of ours; it is not used again after this.
    nvml_try(unsafe { destroy(gi) })
}

/// `device`'s raw handle.
fn raw(device: &Device<'_>) -> nvmlDevice_t {
    // SAFETY: `Device::handle` has no precondition; it is `unsafe` only so that the raw
    // pointer is used with care. Here it goes only to the NVML calls of this module, each made
    // while `device`, and with it the `Nvml` that keeps the handle valid, is borrowed.
    unsafe { device.handle() }
}

/// A symbol from the table `Nvml::init` filled: `Err` where the loaded driver lacks it.
fn symbol<T, E: Display>(entry: &Result<T, E>) -> Result<&T, NvmlError> {
    entry
        .as_ref()
        .map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))
}

/// A NUL-terminated C string in a fixed buffer; the whole buffer if NVML left no NUL.
fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| u8::from_ne_bytes(c.to_ne_bytes()))
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_info_version_word_is_nvmls() {
        // 11 `unsigned int`s, padding to 8, one `unsigned long long`, `char name[96]`.
        assert_eq!(size_of::<nvmlGpuInstanceProfileInfo_v2_t>(), 152);
        assert_eq!(GPU_INSTANCE_PROFILE_INFO_V2, 0x0200_0098);
    }

    #[test]
    fn c_strings_stop_at_the_first_nul_or_the_buffer_end() {
        let mut buf = [0 as std::ffi::c_char; 16];
        for (slot, b) in buf.iter_mut().zip(b"MIG 1g.10gb") {
            *slot = std::ffi::c_char::from_ne_bytes(b.to_ne_bytes());
        }
        assert_eq!(c_chars_to_string(&buf), "MIG 1g.10gb");
        let full = [std::ffi::c_char::from_ne_bytes([b'x']); 4];
        assert_eq!(c_chars_to_string(&full), "xxxx");
    }

    #[test]
    fn insufficient_resources_is_recognised() {
        assert!(is_insufficient_resources(&NvmlError::UnexpectedVariant(23)));
        assert!(!is_insufficient_resources(&NvmlError::NotFound));
    }
}

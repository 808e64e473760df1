//! Reports of simulated nodes, for the simulator, the benchmarks and tests: the `hello` a node
//! agent on a simulated inventory would send.

use framecast_shared::gpu::{GpuMode, GpuSpec};
use framecast_shared::ids::{GpuId, IdError, NodeId, RegionName};
use framecast_shared::protocol::{GpuInventory, Hello, PROTOCOL_VERSION};

/// The `hello` of a node `node` in `region` with `gpus` idle GPUs of `spec` in `mode`, named
/// `<node>-gpu<i>`.
pub fn hello(
    node: &str,
    region: &str,
    spec: &GpuSpec,
    mode: GpuMode,
    gpus: usize,
    generation: u64,
) -> Result<Hello, IdError> {
    let node_id = NodeId::new(node)?;
    let gpus = (0..gpus)
        .map(|i| {
            Ok(GpuInventory {
                gpu: GpuId::new(format!("{node}-gpu{i}"))?,
                spec: spec.clone(),
                mode,
                profile: None,
                free_framebuffer: spec.framebuffer,
                free_encoder: spec.encoder_capacity,
                vgpus: 0,
            })
        })
        .collect::<Result<Vec<_>, IdError>>()?;
    Ok(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        node_id,
        region: RegionName::new(region)?,
        generation,
        gpus,
        sessions: Vec::new(),
        warm: Vec::new(),
        cpu_millicores: None,
        whep_url: None,
        draining: None,
    })
}

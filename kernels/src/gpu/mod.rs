//! WGSL kernels through wgpu: one process-wide context, cached pipelines, pooled buffers and
//! batched dispatches. Each launcher mirrors its CPU twin in `cpu/<stem>.rs` (same semantics,
//! same `=`/`+=` contract) with `GpuBuffer`s in place of slices.
mod context;
mod pipelines;
mod pool;

pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod flash_attention;
pub mod matmul;
pub mod optim;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod slice;
pub mod softmax;

pub use context::{
    AdapterChoice, Batch, GpuBuffer, GpuContext, GpuError, adapters, fail_next_downloads,
    select_adapter,
};
pub use pipelines::SHADERS;
pub use pool::DEFAULT_POOL_LIMIT;

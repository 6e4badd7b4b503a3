//! WGSL kernels through wgpu: one process-wide context, cached pipelines, pooled buffers and
//! batched dispatches. Each launcher mirrors its CPU twin in `cpu/<stem>.rs` (same semantics,
//! same `=`/`+=` contract) with `GpuBuffer`s in place of slices.
mod context;
mod pipelines;
mod pool;

pub mod elementwise;
pub mod matmul;
pub mod rmsnorm;

pub use context::{Batch, GpuBuffer, GpuContext, GpuError};
pub use pipelines::SHADERS;

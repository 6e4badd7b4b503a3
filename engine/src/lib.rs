//! femtochat engine: tensors on a runtime `Device`, and graph-based reverse-mode autograd over
//! the kernels crate.
//!
//! - [`Tensor`] is an `Arc` around shape, f32 storage and (when tracked) the [`op`] that made it.
//!   Trainable leaves come from [`Tensor::param`]; every op on a tensor that requires grad
//!   records itself, unless a [`no_grad`] guard is alive on the thread.
//! - Ops are `Tensor` methods returning `Result` on bad shapes, dims or ids: broadcasting
//!   `add`/`sub`/`mul`, `scale`, `linear` (x W^T), `relu2`, `sigmoid`, `tanh`, `softcap`,
//!   `softmax`, `log_softmax`, `rmsnorm`, `rope`, `narrow`, `select`, `cat`, `reshape`,
//!   `embedding`, `attention`, `cross_entropy`, `sum`, `mean`, `sum_dim`, `mean_dim`.
//! - [`Tensor::backward`] on a single-element loss returns [`Grads`] for the trainable leaves.
//! - [`ParamStore`] holds parameters by name in a stable order.
//! - [`scalar`] is a separate scalar (f64, micrograd-style) autograd: the tensor engine's test
//!   oracle and the engine of `train micro --mode scalar`.
//!
//! Kernels run on rayon's global pool; binaries choose its size. Large buffers are recycled
//! through [`pool`] (a caching allocator; cap it with [`set_pool_limit`]).
pub mod autograd;
mod checkpoint;
pub mod device;
pub mod error;
pub mod op;
mod op_backward;
mod op_gpu;
pub mod optim;
pub mod param;
pub mod pool;
pub mod scalar;
pub mod tensor;

/// The CPU kernels' instruction set: `cpu_isa::Isa::detect()` (the best, or `FEMTOCHAT_ISA`),
/// and `cpu_isa::check_env()` for binaries to refuse a bad `FEMTOCHAT_ISA` at startup.
pub use femtochat_kernels::cpu::isa as cpu_isa;

pub use autograd::{Grads, NoGradGuard, is_grad_enabled, no_grad};
pub use device::{Device, gpu_dispatch_count, sync};
pub use error::{EngineError, Result};
/// Which GPU adapter `Device::Gpu` opens (`train --gpu-index`, one GPU per local rank).
pub use femtochat_kernels::gpu::{AdapterChoice, adapters as gpu_adapters, select_adapter};
/// Live and peak memory, host and GPU (see `femtochat_kernels::mem`).
pub use femtochat_kernels::mem;
pub use op::{IGNORE_INDEX, RMSNORM_EPS, Reduction, RopeTable};
pub use optim::{GroupKind, MuonAdamW, ParamGroup};
pub use param::ParamStore;
pub use pool::{pooled_bytes, set_pool_limit, trim_pool};
pub use tensor::{Data, Ids, Storage, Tensor, TensorId};

#[cfg(test)]
mod gradcheck;

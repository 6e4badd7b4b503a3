//! femtochat kernels: pure compute over slices, no autograd, no allocation policy.
//!
//! `cpu/` holds the rayon + SIMD kernels, each with a `_naive` twin that serves as reference and
//! test oracle. Buffers are row-major `f32` slices; shapes are passed explicitly and every public
//! kernel checks its buffers against them with `assert!`, in release builds too (callers validate
//! user input before it reaches a kernel, so a failed check is a bug, never UB).
pub mod cpu;
pub mod gpu;
pub mod mem;

//! femtochat kernels: pure compute over slices, no autograd, no allocation policy.
//!
//! `cpu/` holds the rayon + SIMD kernels, each with a `_naive` twin that serves as reference and
//! test oracle. Buffers are row-major `f32` slices; shapes are passed explicitly and checked with
//! `debug_assert!` (callers validate user input before it reaches a kernel).
pub mod cpu;
pub mod gpu;
pub mod mem;

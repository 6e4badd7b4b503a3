//! CPU kernels. One file per op family; the same stems name the WGSL kernels under `wgsl/`.
pub mod matmul;

//! CPU kernels. One file per op family; the same stems name the WGSL kernels under `wgsl/`.
pub mod attention;
pub mod attention_decode;
pub mod elementwise;
pub mod embedding;
pub mod flash_attention;
pub mod isa;
pub mod matmul;
pub mod matvec;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod simd;
pub mod slice;
pub mod softmax;

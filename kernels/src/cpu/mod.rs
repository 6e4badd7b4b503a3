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

/// Test inputs shared by the kernels' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// `n` values in [-0.5, 0.5), a multiple of 2^-24 each (exact under scaling by powers of two),
    /// from an xorshift stream seeded by `seed`.
    pub(crate) fn uniform(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }
}

/// A raw pointer into an output buffer that parallel tasks share, each writing only its own
/// disjoint elements (tiles of C, columns of a matvec, attention rows): the callers' SAFETY
/// comments say why no two tasks write one element. `get()` inside a closure captures the whole
/// wrapper, which is `Sync`, rather than the bare pointer field, which is not.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: the pointer is only dereferenced by tasks on disjoint elements (see each user).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

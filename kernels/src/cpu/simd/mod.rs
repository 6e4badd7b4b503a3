//! Shared SIMD building blocks for the CPU kernels.
//!
//! - `Lanes`: dot, axpy and two 4-row register-tiled micro-kernels (the hot loops of
//!   attention), in two flavours: `Portable` (plain Rust the compiler vectorises for the build
//!   target) and, on x86_64 CPUs that have them, explicit AVX2 + FMA intrinsics (`Avx2Fma`).
//!   Callers monomorphise their block function over `Lanes` and call the AVX2 instance from a
//!   `#[target_feature(enable = "avx2,fma")]` wrapper, so the intrinsics inline into it.
//!   The methods take the marker value, and `Avx2Fma` / `Avx512` values exist only through
//!   constructors that check the CPU (`Avx2Fma::new()`), so safe code cannot run an
//!   instruction the CPU lacks.
//! - `BlockGemm`: C (m, n) (+)= A (m, k) · B (k, n) on small strided blocks (the tiles of flash
//!   attention), register-blocked with AVX-512 (8 x 32), AVX2 + FMA (6 x 16) or plain loops.
//! - `vectorized`: runs a plain loop compiled for AVX2 + FMA when available.
//! - `fast_exp`, `fast_tanh`: branch-free approximations (a few ulp) that vectorise.
//!
//! The default build target is baseline x86_64 (SSE2, no FMA), so runtime dispatch is what makes
//! the wide units available without `-C target-cpu`.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod math;
mod portable;
#[cfg(test)]
mod tests;

#[cfg(target_arch = "x86_64")]
pub use avx2::Avx2Fma;
#[cfg(target_arch = "x86_64")]
pub use avx512::Avx512;
pub use math::{fast_exp, fast_exp_by, fast_tanh, sum_lanes};
pub use portable::Portable;

use super::isa::Isa;

/// Rows per register tile of the `gemm_*_4` micro-kernels.
pub const TILE: usize = 4;

/// Vector loops of one ISA; a value of the implementing type proves the CPU runs it.
pub trait Lanes: Copy + Send + Sync {
    /// a . b over the shorter of the two.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
    /// y += a x over the shorter of the two.
    fn axpy(self, y: &mut [f32], a: f32, x: &[f32]);
    /// out (4, n) = A (4, d) B^T: out[r n + j] = a[r] . b[j stride..][..d]. B rows are strided
    /// (a head inside a (T, H, D) buffer), so `b` only needs (n - 1) stride + d elements.
    /// Panics when a buffer is shorter.
    fn gemm_nt_4(
        self,
        out: &mut [f32],
        a: [&[f32]; TILE],
        b: &[f32],
        stride: usize,
        n: usize,
        d: usize,
    );
    /// out (4, d) += P (4, n) B: out[r d + c] += sum_j p[r n + j] b[j stride + c]. Panics
    /// when a buffer is shorter.
    fn gemm_nn_4(self, out: &mut [f32], p: &[f32], b: &[f32], stride: usize, n: usize, d: usize);
}

/// Small-block GEMM for tiled attention: C (m, n) (+)= A (m, k) · B (k, n) with
/// A (i, p) = a[i a_rs + p a_cs] (row-major when a_cs = 1, a transposed view when a_rs = 1),
/// B row p = b[p ldb..][..n] and C row i = c[i ldc..][..n]. Strided rows let the kernel read and
/// write heads of (B, T, H, D) buffers in place; raw pointers because C rows of one head
/// interleave with rows other tasks own, so no `&mut` slice may cover them.
pub trait BlockGemm: Copy + Send + Sync {
    /// a b + c, fused where the ISA has FMA (`f32::mul_add` without it is a slow libm call).
    fn mul_add(a: f32, b: f32, c: f32) -> f32;

    /// # Safety
    /// Every addressed element of a, b and c is in bounds; c overlaps neither a nor b, and no
    /// other thread accesses the m x n block of c during the call. Implementations other than
    /// `Portable` may only run on CPUs with their features (callers check `Isa::supported`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: usize,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    );
}

/// Operands of one `BlockGemm::gemm` call (see the trait for the layout).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Gemm {
    pub c: *mut f32,
    pub ldc: usize,
    pub a: *const f32,
    pub a_rs: usize,
    pub a_cs: usize,
    pub b: *const f32,
    pub ldb: usize,
    pub k: usize,
    pub accumulate: bool,
}

/// Runs `f` compiled for AVX2 + FMA when the selected ISA has them (else as built). For a chunk
/// of a plain loop (an elementwise map, a row of a softmax): `f` is inlined into a
/// `#[target_feature]` caller, so the compiler vectorises it 8 wide instead of SSE2's 4.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn call<R>(_: Avx2Fma, f: impl FnOnce() -> R) -> R {
            f()
        }
        if let Some(t) = avx2() {
            // SAFETY: an `Avx2Fma` exists only on CPUs with the features `call` was compiled for.
            return unsafe { call(t, f) };
        }
    }
    f()
}

/// True when the selected ISA (`Isa::detect`: the best, or `FEMTOCHAT_ISA`) includes AVX2 +
/// FMA; then the CPU has them.
#[inline]
pub fn has_avx2_fma() -> bool {
    Isa::detect().has_avx2() && Isa::Avx2.supported()
}

/// The AVX2 + FMA marker when the selected ISA includes it.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx2() -> Option<Avx2Fma> {
    if Isa::detect().has_avx2() { Avx2Fma::new() } else { None }
}

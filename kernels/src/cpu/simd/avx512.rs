//! AVX-512F `BlockGemm` (8 x 32 register tiles).
use super::{BlockGemm, Gemm};
use crate::cpu::isa::Isa;

/// AVX-512F kernels. A value exists only on a CPU that has AVX-512F (and AVX2 + FMA, which the
/// kernels mix in; `new` checks), the features its `gemm` executes.
#[derive(Clone, Copy, Debug)]
pub struct Avx512 {
    _checked: (),
}

impl Avx512 {
    /// The marker, when this CPU has AVX-512F, AVX2 and FMA.
    #[inline]
    pub fn new() -> Option<Avx512> {
        Isa::Avx512.supported().then_some(Avx512 { _checked: () })
    }
}

#[cfg(target_arch = "x86_64")]
impl BlockGemm for Avx512 {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    #[inline(always)]
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
    ) {
        let g = Gemm { c, ldc, a, a_rs, a_cs, b, ldb, k, accumulate };
        // SAFETY: the caller guarantees bounds, exclusivity and the CPU features.
        unsafe { x86::gemm_512(g, m, n) }
    }
}

mod x86 {
    use std::arch::x86_64::*;

    use crate::cpu::simd::Gemm;

    /// Lanes 0..w of a 16-lane mask.
    #[inline(always)]
    fn mask16(w: usize) -> __mmask16 {
        if w >= 16 { 0xFFFF } else { (1u16 << w) - 1 }
    }

    /// 8 x 32 register tiles (16 zmm accumulators hide the FMA latency on two pipes); ragged
    /// rows take a smaller const tile, ragged columns masked loads and stores (masked-off lanes
    /// never fault, so B and C are read only where they exist).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn gemm_512(g: Gemm, m: usize, n: usize) {
        let mut j = 0;
        while j < n {
            let w = (n - j).min(32);
            let mut i = 0;
            while i < m {
                let r = (m - i).min(8);
                // SAFETY: rows i..i+r and columns j..j+w are inside the caller's block.
                unsafe {
                    match r {
                        8 => tile_512::<8>(g, i, j, w),
                        7 => tile_512::<7>(g, i, j, w),
                        6 => tile_512::<6>(g, i, j, w),
                        5 => tile_512::<5>(g, i, j, w),
                        4 => tile_512::<4>(g, i, j, w),
                        3 => tile_512::<3>(g, i, j, w),
                        2 => tile_512::<2>(g, i, j, w),
                        _ => tile_512::<1>(g, i, j, w),
                    }
                }
                i += r;
            }
            j += 32;
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_512<const R: usize>(g: Gemm, i: usize, j: usize, w: usize) {
        let (m0, m1) = (mask16(w), mask16(w.saturating_sub(16)));
        let mut t = [[_mm512_setzero_ps(); 2]; R];
        // SAFETY: A rows i..i+R, B columns j..j+w of rows 0..k and C rows i..i+R are in bounds
        // (caller); lanes past w are masked off. `wrapping_add` because a masked-off half may
        // start past the end of B's allocation.
        unsafe {
            let a = g.a.add(i * g.a_rs);
            for p in 0..g.k {
                let bp = g.b.wrapping_add(p * g.ldb + j);
                let b0 = _mm512_maskz_loadu_ps(m0, bp);
                let b1 = _mm512_maskz_loadu_ps(m1, bp.wrapping_add(16));
                let ap = a.add(p * g.a_cs);
                for (r, tr) in t.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ap.add(r * g.a_rs));
                    tr[0] = _mm512_fmadd_ps(x, b0, tr[0]);
                    tr[1] = _mm512_fmadd_ps(x, b1, tr[1]);
                }
            }
            for (r, tr) in t.iter().enumerate() {
                let cr = g.c.wrapping_add((i + r) * g.ldc + j);
                let (mut c0, mut c1) = (tr[0], tr[1]);
                if g.accumulate {
                    c0 = _mm512_add_ps(c0, _mm512_maskz_loadu_ps(m0, cr));
                    c1 = _mm512_add_ps(c1, _mm512_maskz_loadu_ps(m1, cr.wrapping_add(16)));
                }
                _mm512_mask_storeu_ps(cr, m0, c0);
                _mm512_mask_storeu_ps(cr.wrapping_add(16), m1, c1);
            }
        }
    }
}

//! AVX2 + FMA `Lanes` and `BlockGemm` (6 x 16 register tiles).
use super::{BlockGemm, Gemm, Lanes, TILE};
use crate::cpu::isa::Isa;

/// AVX2 + FMA kernels. A value exists only on a CPU that has both (`new` checks), so its safe
/// methods, which execute those instructions, cannot fault.
#[derive(Clone, Copy, Debug)]
pub struct Avx2Fma {
    _checked: (),
}

impl Avx2Fma {
    /// The marker, when this CPU has AVX2 and FMA (whatever `FEMTOCHAT_ISA` says: callers
    /// consult `Isa::detect` for the choice, this for the proof).
    #[inline]
    pub fn new() -> Option<Avx2Fma> {
        Isa::Avx2.supported().then_some(Avx2Fma { _checked: () })
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2Fma {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `self` exists, so the CPU has AVX2 + FMA.
        unsafe { x86::dot(a, b) }
    }

    #[inline(always)]
    fn axpy(self, y: &mut [f32], a: f32, x: &[f32]) {
        // SAFETY: as above.
        unsafe { x86::axpy(y, a, x) }
    }

    #[inline(always)]
    fn gemm_nt_4(
        self,
        out: &mut [f32],
        a: [&[f32]; TILE],
        b: &[f32],
        stride: usize,
        n: usize,
        d: usize,
    ) {
        assert!(out.len() >= TILE * n && a.iter().all(|r| r.len() >= d));
        assert!(n == 0 || b.len() >= (n - 1) * stride + d);
        // SAFETY: as above; the asserts bound every access.
        unsafe { x86::gemm_nt_4(out, a, b, stride, n, d) }
    }

    #[inline(always)]
    fn gemm_nn_4(self, out: &mut [f32], p: &[f32], b: &[f32], stride: usize, n: usize, d: usize) {
        assert!(out.len() >= TILE * d && p.len() >= TILE * n);
        assert!(n == 0 || b.len() >= (n - 1) * stride + d);
        // SAFETY: as above; the asserts bound every access.
        unsafe { x86::gemm_nn_4(out, p, b, stride, n, d) }
    }
}

#[cfg(target_arch = "x86_64")]
impl BlockGemm for Avx2Fma {
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
        unsafe { x86::gemm_256(g, m, n) }
    }
}

#[cfg(target_arch = "x86_64")]
// Tile loops index several parallel arrays (accumulators, row pointers) by the same row.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::TILE;

    use crate::cpu::simd::Gemm;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        _mm_cvtss_f32(h)
    }

    /// 4 query rows x 2 key rows per step: 6 loads feed 8 FMAs (vs 2 loads per FMA for dots
    /// one pair at a time). Callers guarantee the bounds (see `Lanes::gemm_nt_4`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn gemm_nt_4(
        out: &mut [f32],
        a: [&[f32]; TILE],
        b: &[f32],
        stride: usize,
        n: usize,
        d: usize,
    ) {
        let d8 = d & !7;
        let pa: [*const f32; TILE] = std::array::from_fn(|r| a[r].as_ptr());
        let mut j = 0;
        // SAFETY: rows j, j+1 < n start at j * stride and extend d <= stride-bounded elements
        // of `b`; column c + 8 <= d8 <= d of every `a` row.
        unsafe {
            while j + 2 <= n {
                let (b0, b1) = (b.as_ptr().add(j * stride), b.as_ptr().add((j + 1) * stride));
                let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
                let mut c = 0;
                while c < d8 {
                    let k0 = _mm256_loadu_ps(b0.add(c));
                    let k1 = _mm256_loadu_ps(b1.add(c));
                    for r in 0..TILE {
                        let x = _mm256_loadu_ps(pa[r].add(c));
                        acc[r][0] = _mm256_fmadd_ps(x, k0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(x, k1, acc[r][1]);
                    }
                    c += 8;
                }
                for r in 0..TILE {
                    let (mut s0, mut s1) = (hsum(acc[r][0]), hsum(acc[r][1]));
                    for cc in d8..d {
                        s0 += *pa[r].add(cc) * *b0.add(cc);
                        s1 += *pa[r].add(cc) * *b1.add(cc);
                    }
                    out[r * n + j] = s0;
                    out[r * n + j + 1] = s1;
                }
                j += 2;
            }
            if j < n {
                let bj = &b[j * stride..j * stride + d];
                for r in 0..TILE {
                    out[r * n + j] = dot(&a[r][..d], bj);
                }
            }
        }
    }

    /// A 4 x 16 output tile stays in 8 registers while all n rows of B stream past it.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn gemm_nn_4(
        out: &mut [f32],
        p: &[f32],
        b: &[f32],
        stride: usize,
        n: usize,
        d: usize,
    ) {
        let (po, pp, pb) = (out.as_mut_ptr(), p.as_ptr(), b.as_ptr());
        let mut c = 0;
        // SAFETY: out has TILE * d elements, p has TILE * n, and row j of b covers
        // j * stride + d; every access below is within those.
        unsafe {
            while c + 16 <= d {
                let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
                for j in 0..n {
                    let bj = pb.add(j * stride + c);
                    let (b0, b1) = (_mm256_loadu_ps(bj), _mm256_loadu_ps(bj.add(8)));
                    for r in 0..TILE {
                        let pr = _mm256_broadcast_ss(&*pp.add(r * n + j));
                        acc[r][0] = _mm256_fmadd_ps(pr, b0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(pr, b1, acc[r][1]);
                    }
                }
                for r in 0..TILE {
                    let o = po.add(r * d + c);
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[r][0]));
                    _mm256_storeu_ps(o.add(8), _mm256_add_ps(_mm256_loadu_ps(o.add(8)), acc[r][1]));
                }
                c += 16;
            }
            while c + 8 <= d {
                let mut acc = [_mm256_setzero_ps(); TILE];
                for j in 0..n {
                    let b0 = _mm256_loadu_ps(pb.add(j * stride + c));
                    for r in 0..TILE {
                        let pr = _mm256_broadcast_ss(&*pp.add(r * n + j));
                        acc[r] = _mm256_fmadd_ps(pr, b0, acc[r]);
                    }
                }
                for r in 0..TILE {
                    let o = po.add(r * d + c);
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[r]));
                }
                c += 8;
            }
            for cc in c..d {
                for r in 0..TILE {
                    let mut acc = 0.0f32;
                    for j in 0..n {
                        acc += *pp.add(r * n + j) * *pb.add(j * stride + cc);
                    }
                    *po.add(r * d + cc) += acc;
                }
            }
        }
    }

    /// Lanes 0..w of an 8-lane `maskload` mask.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn mask8(w: usize) -> __m256i {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(w.min(8) as i32), lanes)
    }

    /// 6 x 16 register tiles (12 ymm accumulators), ragged edges as in `gemm_512`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn gemm_256(g: Gemm, m: usize, n: usize) {
        let mut j = 0;
        while j < n {
            let w = (n - j).min(16);
            let mut i = 0;
            while i < m {
                let r = (m - i).min(6);
                // SAFETY: rows i..i+r and columns j..j+w are inside the caller's block.
                // Full 16-wide tiles take plain loads and stores: the two masks of a ragged
                // tile would hold two of the 16 ymm registers, and 12 accumulators + 2 B
                // vectors + 1 broadcast + 2 masks spill (measured: accumulators went through
                // the stack and flash attention ran slower than its reference kernel).
                unsafe {
                    match (r, w == 16) {
                        (6, true) => tile_256::<6, true>(g, i, j, w),
                        (6, false) => tile_256::<6, false>(g, i, j, w),
                        (5, _) => tile_256::<5, false>(g, i, j, w),
                        (4, _) => tile_256::<4, false>(g, i, j, w),
                        (3, _) => tile_256::<3, false>(g, i, j, w),
                        (2, _) => tile_256::<2, false>(g, i, j, w),
                        _ => tile_256::<1, false>(g, i, j, w),
                    }
                }
                i += r;
            }
            j += 16;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_256<const R: usize, const FULL: bool>(g: Gemm, i: usize, j: usize, w: usize) {
        let (m0, m1) = (mask8(w), mask8(w.saturating_sub(8)));
        let mut t = [[_mm256_setzero_ps(); 2]; R];
        // SAFETY: as in `tile_512`; `maskload` does not fault on masked-off lanes, and FULL
        // tiles (w = 16) read and write only columns j..j+16, inside the block.
        unsafe {
            let a = g.a.add(i * g.a_rs);
            for p in 0..g.k {
                let bp = g.b.wrapping_add(p * g.ldb + j);
                let (b0, b1) = if FULL {
                    (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)))
                } else {
                    (_mm256_maskload_ps(bp, m0), _mm256_maskload_ps(bp.wrapping_add(8), m1))
                };
                let ap = a.add(p * g.a_cs);
                for (r, tr) in t.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*ap.add(r * g.a_rs));
                    tr[0] = _mm256_fmadd_ps(x, b0, tr[0]);
                    tr[1] = _mm256_fmadd_ps(x, b1, tr[1]);
                }
            }
            for (r, tr) in t.iter().enumerate() {
                let cr = g.c.wrapping_add((i + r) * g.ldc + j);
                let (mut c0, mut c1) = (tr[0], tr[1]);
                if FULL {
                    if g.accumulate {
                        c0 = _mm256_add_ps(c0, _mm256_loadu_ps(cr));
                        c1 = _mm256_add_ps(c1, _mm256_loadu_ps(cr.add(8)));
                    }
                    _mm256_storeu_ps(cr, c0);
                    _mm256_storeu_ps(cr.add(8), c1);
                    continue;
                }
                if g.accumulate {
                    c0 = _mm256_add_ps(c0, _mm256_maskload_ps(cr, m0));
                    c1 = _mm256_add_ps(c1, _mm256_maskload_ps(cr.wrapping_add(8), m1));
                }
                _mm256_maskstore_ps(cr, m0, c0);
                _mm256_maskstore_ps(cr.wrapping_add(8), m1, c1);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        // lengths: reads the first min(len) elements of each.
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 floats at i < n - 7 (or < n - 31 for the unrolled loop).
        unsafe {
            while i + 32 <= n {
                for (u, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(pa.add(i + 8 * u));
                    *acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(pb.add(i + 8 * u)), *acc);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
                i += 8;
            }
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        let mut s = _mm_cvtss_f32(h);
        for j in i..n {
            s += a[j] * b[j];
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        // lengths: touches the first min(len) elements of each.
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        // SAFETY: every access covers 8 floats at i <= n - 8.
        unsafe {
            while i + 8 <= n {
                let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), r);
                i += 8;
            }
        }
        for j in i..n {
            y[j] += a * x[j];
        }
    }
}

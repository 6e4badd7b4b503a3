//! Shared SIMD building blocks for the CPU kernels.
//!
//! - `Lanes`: dot, axpy and two 4-row register-tiled micro-kernels (the hot loops of
//!   attention), in two flavours: `Portable` (plain Rust the compiler vectorises for the build
//!   target) and, on x86_64 CPUs that have them, explicit AVX2 + FMA intrinsics (`Avx2Fma`).
//!   Callers monomorphise their block function over `Lanes` and call the AVX2 instance from a
//!   `#[target_feature(enable = "avx2,fma")]` wrapper, so the intrinsics inline into it.
//! - `BlockGemm`: C (m, n) (+)= A (m, k) · B (k, n) on small strided blocks (the tiles of flash
//!   attention), register-blocked with AVX-512 (8 x 32), AVX2 + FMA (6 x 16) or plain loops.
//! - `vectorized`: runs a plain loop compiled for AVX2 + FMA when available.
//! - `fast_exp`, `fast_tanh`: branch-free approximations (a few ulp) that vectorise.
//!
//! The default build target is baseline x86_64 (SSE2, no FMA), so runtime dispatch is what makes
//! the wide units available without `-C target-cpu`.

/// Rows per register tile of the `gemm_*_4` micro-kernels.
pub const TILE: usize = 4;

pub trait Lanes: Copy + Send + Sync {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// y += a x
    fn axpy(y: &mut [f32], a: f32, x: &[f32]);
    /// out (4, n) = A (4, d) B^T: out[r n + j] = a[r] . b[j stride..][..d]. B rows are strided
    /// (a head inside a (T, H, D) buffer), so `b` only needs (n - 1) stride + d elements.
    fn gemm_nt_4(out: &mut [f32], a: [&[f32]; TILE], b: &[f32], stride: usize, n: usize, d: usize);
    /// out (4, d) += P (4, n) B: out[r d + c] += sum_j p[r n + j] b[j stride + c].
    fn gemm_nn_4(out: &mut [f32], p: &[f32], b: &[f32], stride: usize, n: usize, d: usize);
}

#[derive(Clone, Copy, Debug)]
pub struct Portable;

impl Lanes for Portable {
    /// 8 independent accumulators, so the loop vectorises without reassociation licence.
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for k in 0..8 {
                acc[k] += x[k] * y[k];
            }
        }
        let s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
        s + tail
    }

    #[inline(always)]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
    }

    #[inline(always)]
    fn gemm_nt_4(out: &mut [f32], a: [&[f32]; TILE], b: &[f32], stride: usize, n: usize, d: usize) {
        for j in 0..n {
            let bj = &b[j * stride..][..d];
            for (r, ar) in a.iter().enumerate() {
                out[r * n + j] = Self::dot(&ar[..d], bj);
            }
        }
    }

    #[inline(always)]
    fn gemm_nn_4(out: &mut [f32], p: &[f32], b: &[f32], stride: usize, n: usize, d: usize) {
        for j in 0..n {
            let bj = &b[j * stride..][..d];
            for r in 0..TILE {
                Self::axpy(&mut out[r * d..(r + 1) * d], p[r * n + j], bj);
            }
        }
    }
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

impl BlockGemm for Portable {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
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
        // Row by row, saxpy over B rows: the inner loop is contiguous and vectorises.
        // SAFETY: the caller guarantees the bounds and exclusivity (see the trait).
        unsafe {
            for i in 0..m {
                let ci = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
                if !accumulate {
                    ci.fill(0.0);
                }
                for p in 0..k {
                    let av = *a.add(i * a_rs + p * a_cs);
                    let bp = std::slice::from_raw_parts(b.add(p * ldb), n);
                    ci.iter_mut().zip(bp).for_each(|(c, &b)| *c += av * b);
                }
            }
        }
    }
}

/// Only meaningful after `Isa::Avx512.supported()`: its methods execute AVX-512F instructions.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx512;

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
        let g = x86::Gemm { c, ldc, a, a_rs, a_cs, b, ldb, k, accumulate };
        // SAFETY: the caller guarantees bounds, exclusivity and the CPU features.
        unsafe { x86::gemm_512(g, m, n) }
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
        let g = x86::Gemm { c, ldc, a, a_rs, a_cs, b, ldb, k, accumulate };
        // SAFETY: the caller guarantees bounds, exclusivity and the CPU features.
        unsafe { x86::gemm_256(g, m, n) }
    }
}

/// Sum in 8 lanes so it vectorises.
#[inline(always)]
pub fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// e^x to ~2 ulp, branch-free so loops over it vectorise (libm's `expf` is an opaque call).
/// Inputs are clamped to [-87.3, 88.3]: results below ~1e-38 come out as ~1e-38 instead of a
/// subnormal or 0, which is harmless in the max-shifted sums it serves; NaN stays NaN.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    fast_exp_by(x, |a, b, c| a * b + c)
}

/// `fast_exp` with a given multiply-add: `BlockGemm::mul_add` fuses it where the CPU has FMA,
/// which halves the instructions of the reduction and the polynomial.
#[inline(always)]
pub fn fast_exp_by(x: f32, mul_add: impl Fn(f32, f32, f32) -> f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so n * LN2_HI is exact for |n| < 2^9 (Cody-Waite reduction).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding then subtracting 1.5 * 2^23 rounds to nearest without SSE4.1's roundps.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = mul_add(x, LOG2E, ROUND);
    let n = t - ROUND;
    let f = mul_add(n, -LN2_LO, mul_add(n, -LN2_HI, x)); // |f| <= ln2 / 2
    // Taylor to degree 7: truncation error f^8 / 8! < 6e-9 on that interval.
    let p = 1.0 / 5040.0;
    let p = mul_add(p, f, 1.0 / 720.0);
    let p = mul_add(p, f, 1.0 / 120.0);
    let p = mul_add(p, f, 1.0 / 24.0);
    let p = mul_add(p, f, 1.0 / 6.0);
    let p = mul_add(p, f, 0.5);
    let p = mul_add(p, f, 1.0);
    let p = mul_add(p, f, 1.0);
    // t's low mantissa bits hold n itself (t = 1.5 * 2^23 + n), which spares a saturating
    // float-to-int cast that would block vectorisation; wrapping ops keep it branch-free under
    // overflow checks too.
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    p * scale
}

/// tanh(x) to ~1e-7 absolute (and relative near 0), branch-free like `fast_exp`.
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    // 1 - 2 / (e^2x + 1) cancels near 0, so small |x| takes the odd Taylor series (error
    // 62 x^9 / 2835 < 6e-9 relative below 0.2).
    let big = 1.0 - 2.0 / (fast_exp(2.0 * x) + 1.0);
    let x2 = x * x;
    let small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))));
    if x.abs() < 0.2 { small } else { big }
}

/// Runs `f` compiled for AVX2 + FMA when the CPU has them (else as built). For a chunk of a
/// plain loop (an elementwise map, a row of a softmax): `f` is inlined into a
/// `#[target_feature]` caller, so the compiler vectorises it 8 wide instead of SSE2's 4.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn call<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if has_avx2_fma() {
            // SAFETY: the CPU supports the features `call` was compiled for.
            return unsafe { call(f) };
        }
    }
    f()
}

/// True when `Avx2Fma` may be used on this CPU (checked once, then cached by std).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Only meaningful after `has_avx2_fma()` returned true: its methods execute AVX2/FMA
/// instructions.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx2Fma;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2Fma {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: an `Avx2Fma` instance is only used behind a `has_avx2_fma()` check.
        unsafe { x86::dot(a, b) }
    }

    #[inline(always)]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        // SAFETY: as above.
        unsafe { x86::axpy(y, a, x) }
    }

    #[inline(always)]
    fn gemm_nt_4(out: &mut [f32], a: [&[f32]; TILE], b: &[f32], stride: usize, n: usize, d: usize) {
        assert!(out.len() >= TILE * n && a.iter().all(|r| r.len() >= d));
        assert!(n == 0 || b.len() >= (n - 1) * stride + d);
        // SAFETY: as above; the asserts bound every access.
        unsafe { x86::gemm_nt_4(out, a, b, stride, n, d) }
    }

    #[inline(always)]
    fn gemm_nn_4(out: &mut [f32], p: &[f32], b: &[f32], stride: usize, n: usize, d: usize) {
        assert!(out.len() >= TILE * d && p.len() >= TILE * n);
        assert!(n == 0 || b.len() >= (n - 1) * stride + d);
        // SAFETY: as above; the asserts bound every access.
        unsafe { x86::gemm_nn_4(out, p, b, stride, n, d) }
    }
}

#[cfg(target_arch = "x86_64")]
// Tile loops index several parallel arrays (accumulators, row pointers) by the same row.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::TILE;

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

    /// Operands of one `BlockGemm::gemm` call (see the trait for the layout).
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
                unsafe {
                    match r {
                        6 => tile_256::<6>(g, i, j, w),
                        5 => tile_256::<5>(g, i, j, w),
                        4 => tile_256::<4>(g, i, j, w),
                        3 => tile_256::<3>(g, i, j, w),
                        2 => tile_256::<2>(g, i, j, w),
                        _ => tile_256::<1>(g, i, j, w),
                    }
                }
                i += r;
            }
            j += 16;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_256<const R: usize>(g: Gemm, i: usize, j: usize, w: usize) {
        let (m0, m1) = (mask8(w), mask8(w.saturating_sub(8)));
        let mut t = [[_mm256_setzero_ps(); 2]; R];
        // SAFETY: as in `tile_512`; `maskload` does not fault on masked-off lanes.
        unsafe {
            let a = g.a.add(i * g.a_rs);
            for p in 0..g.k {
                let bp = g.b.wrapping_add(p * g.ldb + j);
                let b0 = _mm256_maskload_ps(bp, m0);
                let b1 = _mm256_maskload_ps(bp.wrapping_add(8), m1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_tanh_are_accurate() {
        let mut worst = (0.0f64, 0.0f64);
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.3e-4; // [-86, 86]
            let (e, t) = (fast_exp(x) as f64, fast_tanh(x * 0.1) as f64);
            let (we, wt) = ((x as f64).exp(), (x as f64 * 0.1).tanh());
            let fused = fast_exp_by(x, f32::mul_add) as f64;
            worst.0 = worst.0.max(((e - we) / we).abs()).max(((fused - we) / we).abs());
            worst.1 = worst.1.max((t - wt).abs() / wt.abs().max(1.0));
        }
        assert!(worst.0 < 5e-7, "exp rel err {}", worst.0);
        assert!(worst.1 < 3e-7, "tanh err {}", worst.1);
        assert!(fast_exp(f32::NAN).is_nan());
        assert!(fast_exp(-1000.0) < 1e-37);
        assert_eq!(fast_tanh(50.0), 1.0);
        assert_eq!(fast_tanh(-50.0), -1.0);
    }

    #[test]
    fn gemm_tiles_agree() {
        for (n, d, stride) in
            [(0usize, 8usize, 8usize), (1, 3, 5), (5, 17, 20), (8, 64, 64), (7, 40, 96)]
        {
            let a: Vec<Vec<f32>> = (0..TILE)
                .map(|r| (0..d).map(|c| ((r * 31 + c * 7) % 13) as f32 - 6.0).collect())
                .collect();
            let b: Vec<f32> =
                (0..n * stride + d).map(|i| ((i * 11) % 17) as f32 * 0.25 - 2.0).collect();
            let rows: [&[f32]; TILE] = std::array::from_fn(|r| a[r].as_slice());
            let mut want = vec![0.0; TILE * n];
            for r in 0..TILE {
                for j in 0..n {
                    want[r * n + j] = (0..d).map(|c| a[r][c] * b[j * stride + c]).sum();
                }
            }
            let p: Vec<f32> = (0..TILE * n).map(|i| (i % 5) as f32 - 2.0).collect();
            let mut want_nn = vec![1.0; TILE * d];
            for r in 0..TILE {
                for c in 0..d {
                    want_nn[r * d + c] +=
                        (0..n).map(|j| p[r * n + j] * b[j * stride + c]).sum::<f32>();
                }
            }
            let mut got = vec![0.0; TILE * n];
            let mut got_nn = vec![1.0; TILE * d];
            Portable::gemm_nt_4(&mut got, rows, &b, stride, n, d);
            Portable::gemm_nn_4(&mut got_nn, &p, &b, stride, n, d);
            assert_eq!(got, want);
            assert_eq!(got_nn, want_nn);
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                Avx2Fma::gemm_nt_4(&mut got, rows, &b, stride, n, d);
                let mut got_nn = vec![1.0; TILE * d];
                Avx2Fma::gemm_nn_4(&mut got_nn, &p, &b, stride, n, d);
                // Small integers: exact in any summation order.
                assert_eq!(got, want);
                assert_eq!(got_nn, want_nn);
            }
        }
    }

    /// `BlockGemm::gemm` of one implementation.
    type GemmFn = unsafe fn(
        *mut f32,
        usize,
        *const f32,
        usize,
        usize,
        *const f32,
        usize,
        usize,
        usize,
        usize,
        bool,
    );

    #[test]
    fn block_gemm_matches_naive() {
        // Shapes straddle both register tiles (8 x 32, 6 x 16) and their ragged edges; A is read
        // row-major and transposed; C and B rows are strided.
        let cases = [(1usize, 1usize, 1usize), (3, 5, 2), (8, 32, 64), (13, 37, 9), (64, 72, 64)];
        for (m, n, k) in cases {
            for transposed in [false, true] {
                let (a_rs, a_cs) = if transposed { (1, m + 1) } else { (k + 2, 1) };
                let a: Vec<f32> =
                    (0..m * a_rs + k * a_cs + 1).map(|i| (i % 7) as f32 - 3.0).collect();
                let (ldb, ldc) = (n + 3, n + 5);
                let b: Vec<f32> = (0..k * ldb).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
                let c0: Vec<f32> = (0..m * ldc).map(|i| (i % 3) as f32).collect();
                for accumulate in [false, true] {
                    let mut want = c0.clone();
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f32 =
                                (0..k).map(|p| a[i * a_rs + p * a_cs] * b[p * ldb + j]).sum();
                            let w = &mut want[i * ldc + j];
                            *w = if accumulate { *w + dot } else { dot };
                        }
                    }
                    let run = |f: GemmFn| {
                        let mut c = c0.clone();
                        // SAFETY: the buffers above cover every addressed element.
                        unsafe {
                            f(
                                c.as_mut_ptr(),
                                ldc,
                                a.as_ptr(),
                                a_rs,
                                a_cs,
                                b.as_ptr(),
                                ldb,
                                m,
                                n,
                                k,
                                accumulate,
                            )
                        };
                        c
                    };
                    // Small integers and halves: exact in any summation order.
                    assert_eq!(run(Portable::gemm), want, "portable {m}x{n}x{k}");
                    #[cfg(target_arch = "x86_64")]
                    {
                        use crate::cpu::matmul::Isa;
                        if Isa::Avx2.supported() {
                            assert_eq!(run(Avx2Fma::gemm), want, "avx2 {m}x{n}x{k}");
                        }
                        if Isa::Avx512.supported() {
                            assert_eq!(run(Avx512::gemm), want, "avx512 {m}x{n}x{k}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn flavours_agree() {
        for n in [0usize, 1, 7, 8, 31, 32, 33, 64, 100, 128] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((Portable::dot(&a, &b) as f64 - want).abs() < 1e-4);
            let mut y1 = b.clone();
            Portable::axpy(&mut y1, 0.5, &a);
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                assert!((Avx2Fma::dot(&a, &b) as f64 - want).abs() < 1e-4);
                let mut y2 = b.clone();
                Avx2Fma::axpy(&mut y2, 0.5, &a);
                for (p, q) in y1.iter().zip(&y2) {
                    assert!((p - q).abs() < 1e-6);
                }
            }
        }
    }
}

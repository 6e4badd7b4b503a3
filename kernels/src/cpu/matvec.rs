//! Skinny matmul for decoding: out (M, N) = x (M, K) · W (N, K)^T, M small (one row per
//! sequence in the batch, 1..=64), W a linear layer's weight in its stored (out, in) layout.
//!
//! Why not `matmul`: the BLIS path packs W into panels on every call, which for M = 1..8 costs
//! as much as the product itself, and spawns threads for problems that finish in microseconds.
//! Here W is read in place (its rows are already the dot-product operands, so no packed copy
//! is needed), once per step: a register tile of R weight rows x MR input rows keeps R * MR
//! accumulators while K streams past, so each loaded weight vector feeds MR FMAs and each
//! loaded input vector R. Weight row blocks are the outer loop and input row groups the inner
//! one, so a block of W (R x K floats) stays in L1 while every input row group uses it.
//!
//! Threads: rayon over column ranges of `out` (disjoint weight rows), only when the product is
//! at least `PAR_MACS` multiply-adds; below that, waking a second thread costs more than it
//! saves (measured on the d4 decode step, docs/perf/infer.md).
//!
//! Weights are f32 or bf16 (`Weight`): a bf16 weight is widened to f32 as it is loaded (exact:
//! a bf16 is the high half of an f32), so products and sums are f32 either way and only the
//! bytes read halve — what a memory-bound decode step is paid for. (AVX-512 BF16's `vdpbf16ps`
//! would also need the activations rounded to bf16; widening keeps them f32.)
//!
//! Tiles (R x MR) by ISA: AVX-512F 8x1, 8x2, 4x3, 4x4 (at most 16 zmm accumulators); AVX2 + FMA
//! 8x1, 4x2, 3x3, 2x4 (at most 9 ymm accumulators, 16 registers in all); other CPUs (NEON
//! included, for now) a portable loop the compiler vectorises.
use rayon::prelude::*;

use super::SyncPtr;
use super::matmul::Isa;

/// Multiply-adds below which the product runs on the calling thread alone.
pub const PAR_MACS: usize = 1 << 19;

/// Input rows per register tile, at most (x86 tiles; other CPUs run the portable loop).
#[cfg(target_arch = "x86_64")]
const MR: usize = 4;

/// Input rows above which narrow weights are widened once per block (`columns`).
const GROUP_ROWS: usize = 4;

/// Floats per 4-row tile group widened at once for `columns`' narrow-weight path (x 4 = 16 KiB).
const WIDEN_FLOATS: usize = 1024;

thread_local! {
    /// Per-thread scratch of widened weight rows (grows to the largest block seen, then is
    /// reused).
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An element of the weight matrix: f32, or bf16 widened on load.
pub trait Weight: Copy + Send + Sync + 'static + private::Sealed {
    /// Bytes per element (for bandwidth accounting).
    const BYTES: usize;
    fn to_f32(self) -> f32;
}

impl Weight for f32 {
    const BYTES: usize = 4;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Weight for half::bf16 {
    const BYTES: usize = 2;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

// Sealed: the kernels know how to load each weight type (on x86, `x86::Lanes`).
mod private {
    #[cfg(target_arch = "x86_64")]
    pub trait Sealed: super::x86::Lanes {}
    #[cfg(not(target_arch = "x86_64"))]
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// The instruction set `matvec_nt` runs on this CPU.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(Isa::detect)
}

/// Reference: f64 dot products. Test oracle for `matvec_nt`.
pub fn matvec_nt_naive<W: Weight>(
    out: &mut [f32],
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "matvec_nt: short buffers");
    for i in 0..m {
        for j in 0..n {
            let xr = &x[i * k..(i + 1) * k];
            let wr = &w[j * k..(j + 1) * k];
            out[i * n + j] =
                xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b.to_f32() as f64).sum::<f64>() as f32;
        }
    }
}

/// out (M, N) = x (M, K) · W (N, K)^T with the best kernel this CPU runs.
pub fn matvec_nt<W: Weight>(out: &mut [f32], x: &[f32], w: &[W], m: usize, k: usize, n: usize) {
    matvec_nt_with(isa(), out, x, w, m, k, n)
}

/// `matvec_nt` with a given ISA (tests compare them); the portable kernel when the CPU lacks it.
pub fn matvec_nt_with<W: Weight>(
    isa: Isa,
    out: &mut [f32],
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "matvec_nt: short buffers");
    if m == 0 || n == 0 {
        return;
    }
    let isa = if isa.supported() { isa } else { Isa::Portable };
    let ptr = SyncPtr(out.as_mut_ptr());
    let run = |j0: usize, j1: usize| {
        // SAFETY: the asserts above bound x, w and out; ranges [j0, j1) of different calls are
        // disjoint, so no two threads write the same element of out.
        unsafe { columns(isa, ptr.get(), x.as_ptr(), w.as_ptr(), m, k, n, j0, j1) }
    };
    let threads = rayon::current_num_threads();
    if m * k * n < PAR_MACS || threads == 1 || n < 16 {
        return run(0, n);
    }
    // Ranges of whole 8-row weight blocks, two per thread so a slow thread is not the bottleneck.
    let chunks = (threads * 2).min(n / 8);
    let per = n.div_ceil(chunks).next_multiple_of(8);
    (0..n.div_ceil(per)).into_par_iter().for_each(|c| run(c * per, ((c + 1) * per).min(n)));
}

/// Columns j0..j1 of out (all M rows).
///
/// # Safety
/// x holds m * k floats, w n * k, out m * n; no other thread writes columns j0..j1 of out.
#[allow(clippy::too_many_arguments)]
unsafe fn columns<W: Weight>(
    isa: Isa,
    out: *mut f32,
    x: *const f32,
    w: *const W,
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
) {
    if W::BYTES < 4 && m > GROUP_ROWS {
        // The tiles widen a narrow weight once per group of input rows, so with several groups
        // the conversions (three instructions per vector) cost more than the loads they save:
        // bf16 ran batch 8 at 0.83x f32. Widen a block of weight rows once into a per-thread
        // f32 scratch and run the f32 tiles on it.
        // A block of whole 4-row tiles, about 16 KiB, so it stays in L1 across the row groups.
        let block = (WIDEN_FLOATS / k.max(1)).clamp(1, 16) * 4;
        return WIDE.with_borrow_mut(|wide| {
            wide.resize(wide.len().max(block * k), 0.0);
            let mut j = j0;
            while j < j1 {
                let rows = block.min(j1 - j);
                // SAFETY: rows j..j + rows of w are in bounds (caller).
                unsafe { widen(isa, &mut wide[..rows * k], w.add(j * k)) };
                // SAFETY: the block's rows, as rows 0..rows of `wide`, write columns
                // j..j + rows of out (out shifted by j, same row stride n).
                unsafe { columns(isa, out.add(j), x, wide.as_ptr(), m, k, n, 0, rows) };
                j += rows;
            }
        });
    }
    // SAFETY: forwarded from the caller; each ISA branch runs only where `supported()` held.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::columns_512(out, x, w, m, k, n, j0, j1),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::columns_256(out, x, w, m, k, n, j0, j1),
            _ => columns_portable(out, x, w, m, k, n, j0, j1),
        }
    }
}

/// dst = the dst.len() weights at w, as f32.
///
/// # Safety
/// dst.len() elements are readable at w; `isa` is supported.
unsafe fn widen<W: Weight>(isa: Isa, dst: &mut [f32], w: *const W) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::widen_512(dst, w),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::widen_256(dst, w),
            _ => {
                let src = std::slice::from_raw_parts(w, dst.len());
                dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
            }
        }
    }
}

/// Plain dot products in 8 lanes (vectorised by the compiler for the build target).
#[allow(clippy::too_many_arguments)]
unsafe fn columns_portable<W: Weight>(
    out: *mut f32,
    x: *const f32,
    w: *const W,
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
) {
    for j in j0..j1 {
        // SAFETY: row j of w and row i of x are in bounds (caller).
        let wr = unsafe { std::slice::from_raw_parts(w.add(j * k), k) };
        for i in 0..m {
            let xr = unsafe { std::slice::from_raw_parts(x.add(i * k), k) };
            let mut acc = [0.0f32; 8];
            let (cw, cx) = (wr.chunks_exact(8), xr.chunks_exact(8));
            let tail: f32 =
                cw.remainder().iter().zip(cx.remainder()).map(|(a, b)| a.to_f32() * b).sum();
            for (a, b) in cw.zip(cx) {
                for l in 0..8 {
                    acc[l] += a[l].to_f32() * b[l];
                }
            }
            let s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
            // SAFETY: (i, j) is inside out.
            unsafe { *out.add(i * n + j) = s + tail };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, Weight};

    /// Vector loads of weight elements as f32 lanes.
    pub trait Lanes {
        /// Elements p..p + min(left, 16) as 16 f32 lanes, zeros past `left`.
        ///
        /// # Safety
        /// AVX-512F enabled in the caller; min(left, 16) elements readable at p.
        unsafe fn load16(p: *const Self, left: usize) -> __m512;
        /// Eight elements as f32 lanes.
        ///
        /// # Safety
        /// AVX2 enabled in the caller; eight elements readable at p.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32, left: usize) -> __m512 {
            // SAFETY: the mask covers only readable elements (caller).
            unsafe { _mm512_maskz_loadu_ps(mask16(left), p) }
        }
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: caller.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Lanes for half::bf16 {
        #[inline(always)]
        unsafe fn load16(p: *const half::bf16, left: usize) -> __m512 {
            // SAFETY: a full load reads 16 elements, a tail only `left` (copied; masked 16-bit
            // loads would need AVX-512BW, which `Isa::Avx512` does not require).
            unsafe {
                let h = if left >= 16 {
                    _mm256_loadu_si256(p as *const __m256i)
                } else {
                    let mut buf = [0u16; 16];
                    std::ptr::copy_nonoverlapping(p as *const u16, buf.as_mut_ptr(), left);
                    _mm256_loadu_si256(buf.as_ptr() as *const __m256i)
                };
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        unsafe fn load8(p: *const half::bf16) -> __m256 {
            // SAFETY: caller.
            unsafe {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    }

    /// Lanes 0..w of a 16-lane mask.
    #[inline(always)]
    fn mask16(w: usize) -> __mmask16 {
        if w >= 16 { 0xFFFF } else { (1u16 << w) - 1 }
    }

    /// dst = the weights at w as f32, 16 lanes at a time, prefetching the next block of as
    /// many weights (the tiles then work on this one while memory delivers that one).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_512<W: Weight>(dst: &mut [f32], w: *const W) {
        // lengths: dst sets the count; that w holds as many is the caller's (unsafe) contract.
        let mut p = 0;
        let n = dst.len();
        // SAFETY: dst.len() weights are readable at w (caller); stores stay inside dst; the
        // prefetched addresses are never dereferenced.
        unsafe {
            while p < n {
                if (p * W::BYTES) % 64 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(n + p) as *const i8);
                }
                let left = n - p;
                let v = W::load16(w.add(p), left);
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(p), mask16(left), v);
                p += 16;
            }
        }
    }

    /// dst = the weights at w as f32, 8 lanes at a time, prefetching as `widen_512` does.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn widen_256<W: Weight>(dst: &mut [f32], w: *const W) {
        // lengths: as in `widen_512`.
        let (n, n8) = (dst.len(), dst.len() & !7);
        // SAFETY: as in `widen_512`.
        unsafe {
            for p in (0..n8).step_by(8) {
                if (p * W::BYTES) % 64 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(n + p) as *const i8);
                }
                _mm256_storeu_ps(dst.as_mut_ptr().add(p), W::load8(w.add(p)));
            }
            for (p, d) in dst.iter_mut().enumerate().skip(n8) {
                *d = (*w.add(p)).to_f32();
            }
        }
    }

    /// Dispatch on the weight rows left (R) and input rows left (MR) to const-size tiles.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn columns_512<W: Weight>(
        out: *mut f32,
        x: *const f32,
        w: *const W,
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        j1: usize,
    ) {
        let mut j = j0;
        // SAFETY: every tile reads rows j..j+R of w and i..i+MR of x, writes their products
        // into out, all in bounds (caller).
        unsafe {
            while j < j1 {
                let left = j1 - j;
                let mut i = 0;
                // Input rows in groups of MR; the weight block (R x K) stays in L1 across them.
                let r = if m == 1 || m == 2 { left.min(8) } else { left.min(4) };
                while i < m {
                    let mi = (m - i).min(MR);
                    let t =
                        Tile { out: out.add(i * n + j), x: x.add(i * k), w: w.add(j * k), k, n };
                    match (r, mi) {
                        (8, 1) => tile_512::<W, 8, 1>(t),
                        (8, 2) => tile_512::<W, 8, 2>(t),
                        (4, 1) => tile_512::<W, 4, 1>(t),
                        (4, 2) => tile_512::<W, 4, 2>(t),
                        (4, 3) => tile_512::<W, 4, 3>(t),
                        (4, 4) => tile_512::<W, 4, 4>(t),
                        (_, 1) => rows_512::<W, 1>(t, r),
                        (_, 2) => rows_512::<W, 2>(t, r),
                        (_, 3) => rows_512::<W, 3>(t, r),
                        _ => rows_512::<W, 4>(t, r),
                    }
                    i += mi;
                }
                j += r;
            }
        }
    }

    /// Operands of one tile: out, x and w point at its first element; x and w rows are k apart,
    /// out rows n apart.
    #[derive(Clone, Copy)]
    pub struct Tile<W> {
        out: *mut f32,
        x: *const f32,
        w: *const W,
        k: usize,
        n: usize,
    }

    /// A ragged weight block (fewer than R rows left): one weight row at a time.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_512<W: Weight, const M: usize>(t: Tile<W>, r: usize) {
        for rr in 0..r {
            // SAFETY: row rr < r of this block is in bounds (caller).
            unsafe { tile_512::<W, 1, M>(Tile { out: t.out.add(rr), w: t.w.add(rr * t.k), ..t }) }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile_512<W: Weight, const R: usize, const M: usize>(t: Tile<W>) {
        let mut acc = [[_mm512_setzero_ps(); M]; R];
        let mut p = 0;
        // SAFETY: R weight rows and M input rows of t.k floats each are in bounds; the tail
        // loads are masked to the elements that exist.
        unsafe {
            while p < t.k {
                let msk = mask16(t.k - p);
                let xs: [__m512; M] =
                    std::array::from_fn(|i| _mm512_maskz_loadu_ps(msk, t.x.add(i * t.k + p)));
                for (r, ar) in acc.iter_mut().enumerate() {
                    // The next block's rows, a tile ahead: rows are only K floats long, too
                    // short for the hardware prefetcher to pick up the stream in time.
                    // (`wrapping_add`: past the last block the address is never dereferenced.)
                    _mm_prefetch::<_MM_HINT_T0>(t.w.wrapping_add((R + r) * t.k + p) as *const i8);
                    let wv = W::load16(t.w.add(r * t.k + p), t.k - p);
                    for (a, xv) in ar.iter_mut().zip(&xs) {
                        *a = _mm512_fmadd_ps(wv, *xv, *a);
                    }
                }
                p += 16;
            }
            // Accumulator (r, i) is lane r * M + i of the transposed sums.
            let mut flat = [_mm512_setzero_ps(); 16];
            for (r, ar) in acc.iter().enumerate() {
                flat[r * M..(r + 1) * M].copy_from_slice(ar);
            }
            let mut sums = [0.0f32; 16];
            _mm512_storeu_ps(sums.as_mut_ptr(), sum_lanes_16(&flat));
            for r in 0..R {
                for i in 0..M {
                    *t.out.add(i * t.n + r) = sums[r * M + i];
                }
            }
        }
    }

    /// Lane s of the result is the sum of v[s]'s 16 lanes: sixteen horizontal sums as a
    /// transpose-and-add tree (45 instructions instead of ~10 per `_mm512_reduce_add_ps`), which
    /// at K = 256 was a third of a 4x4 tile's time. Every slot is summed in the same order,
    /// ((e0 + e2) + (e1 + e3)) within each 128-bit quarter, then (q0 + q1) + (q2 + q3), so an
    /// output does not depend on the tile it was computed in (batch rows equal single rows bit
    /// for bit).
    #[inline(always)]
    fn sum_lanes_16(v: &[__m512; 16]) -> __m512 {
        // SAFETY: AVX-512F is enabled in every caller.
        unsafe {
            // Pairs: per quarter, [a0+a2, b0+b2, a1+a3, b1+b3].
            let p: [__m512; 8] = std::array::from_fn(|j| {
                let (a, b) = (v[2 * j], v[2 * j + 1]);
                _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
            });
            // Quads: per quarter, [A, B, C, D], each the sum of that quarter's four elements.
            let q: [__m512; 4] = std::array::from_fn(|j| {
                let (ab, cd) = (p[2 * j], p[2 * j + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_ps::<0b01_00_01_00>(ab, cd),
                    _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd),
                )
            });
            // Quarters: h[0] = [q0.(Q0+Q1), q0.(Q2+Q3), q1.(Q0+Q1), q1.(Q2+Q3)], h[1] likewise.
            let h: [__m512; 2] = std::array::from_fn(|j| {
                let (x, y) = (q[2 * j], q[2 * j + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                    _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
                )
            });
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(h[0], h[1]),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(h[0], h[1]),
            )
        }
    }

    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        // SAFETY: SSE and AVX are implied by the avx2 feature of every caller.
        unsafe {
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
            _mm_cvtss_f32(h)
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn columns_256<W: Weight>(
        out: *mut f32,
        x: *const f32,
        w: *const W,
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        j1: usize,
    ) {
        let mut j = j0;
        // SAFETY: as in `columns_512`.
        unsafe {
            while j < j1 {
                let left = j1 - j;
                let r = match m {
                    1 => left.min(8),
                    2 => left.min(4),
                    3 => left.min(3),
                    _ => left.min(2),
                };
                let mut i = 0;
                while i < m {
                    let mi = (m - i).min(MR);
                    let t =
                        Tile { out: out.add(i * n + j), x: x.add(i * k), w: w.add(j * k), k, n };
                    match (r, mi) {
                        (8, 1) => tile_256::<W, 8, 1>(t),
                        (4, 2) => tile_256::<W, 4, 2>(t),
                        (3, 1) => tile_256::<W, 3, 1>(t),
                        (3, 2) => tile_256::<W, 3, 2>(t),
                        (3, 3) => tile_256::<W, 3, 3>(t),
                        (2, 1) => tile_256::<W, 2, 1>(t),
                        (2, 2) => tile_256::<W, 2, 2>(t),
                        (2, 3) => tile_256::<W, 2, 3>(t),
                        (2, 4) => tile_256::<W, 2, 4>(t),
                        (_, 1) => rows_256::<W, 1>(t, r),
                        (_, 2) => rows_256::<W, 2>(t, r),
                        (_, 3) => rows_256::<W, 3>(t, r),
                        _ => rows_256::<W, 4>(t, r),
                    }
                    i += mi;
                }
                j += r;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_256<W: Weight, const M: usize>(t: Tile<W>, r: usize) {
        for rr in 0..r {
            // SAFETY: row rr < r of this block is in bounds (caller).
            unsafe { tile_256::<W, 1, M>(Tile { out: t.out.add(rr), w: t.w.add(rr * t.k), ..t }) }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_256<W: Weight, const R: usize, const M: usize>(t: Tile<W>) {
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        let k8 = t.k & !7;
        let mut p = 0;
        // SAFETY: full 8-lane loads stop at k8 <= k; the tail is scalar.
        unsafe {
            while p < k8 {
                let xs: [__m256; M] =
                    std::array::from_fn(|i| _mm256_loadu_ps(t.x.add(i * t.k + p)));
                for (r, ar) in acc.iter_mut().enumerate() {
                    // As in `tile_512`, a tile ahead; one prefetch per 64-byte line.
                    if (p * W::BYTES) % 64 == 0 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            t.w.wrapping_add((R + r) * t.k + p) as *const i8
                        );
                    }
                    let wv = W::load8(t.w.add(r * t.k + p));
                    for (a, xv) in ar.iter_mut().zip(&xs) {
                        *a = _mm256_fmadd_ps(wv, *xv, *a);
                    }
                }
                p += 8;
            }
            for (r, ar) in acc.iter().enumerate() {
                for (i, a) in ar.iter().enumerate() {
                    let mut s = hsum(*a);
                    for q in k8..t.k {
                        s += (*t.w.add(r * t.k + q)).to_f32() * *t.x.add(i * t.k + q);
                    }
                    *t.out.add(i * t.n + r) = s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::testing::uniform as fill;

    fn isas() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()).collect()
    }

    /// Every tile shape and ragged edge (rows of W, rows of x, K tails), serial and threaded.
    #[test]
    fn matches_naive() {
        let shapes = [
            (1, 1, 1),
            (1, 24, 1),
            (1, 64, 9),
            (2, 33, 13),
            (3, 100, 7),
            (4, 256, 31),
            (5, 17, 40),
            (8, 64, 67),
            (11, 129, 5),
            (1, 256, 4096), // above PAR_MACS: split across threads
            (8, 256, 1030),
            (16, 96, 515),
        ];
        for isa in isas() {
            for &(m, k, n) in &shapes {
                let (x, w) = (fill(m * k, 1), fill(n * k, 2));
                check(isa, &x, &w, m, k, n);
                // The same weights rounded to bf16: the kernel must compute exactly what the
                // f64 oracle does with those bf16 values (widening is exact).
                check(isa, &x, &to_bf16(&w), m, k, n);
            }
        }
    }

    fn to_bf16(w: &[f32]) -> Vec<half::bf16> {
        w.iter().map(|&v| half::bf16::from_f32(v)).collect()
    }

    fn check<W: Weight + std::fmt::Debug>(
        isa: Isa,
        x: &[f32],
        w: &[W],
        m: usize,
        k: usize,
        n: usize,
    ) {
        let mut want = vec![0.0; m * n];
        matvec_nt_naive(&mut want, x, w, m, k, n);
        let mut got = vec![f32::NAN; m * n];
        matvec_nt_with(isa, &mut got, x, w, m, k, n);
        for (g, e) in got.iter().zip(&want) {
            assert!(
                (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                "{isa:?} {}-byte weights {m}x{k}x{n}: {g} vs {e}",
                W::BYTES
            );
        }
    }

    /// bf16 weights against the f32 weights they were rounded from: within bf16's rounding
    /// (relative 2^-9 per weight, so about 2^-9 * sqrt(K) * typical |x w| on a sum of K terms).
    #[test]
    fn bf16_weights_stay_close_to_f32() {
        let (m, k, n) = (3, 256, 70);
        let (x, w) = (fill(m * k, 5), fill(n * k, 6));
        let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
        matvec_nt(&mut a, &x, &w, m, k, n);
        matvec_nt(&mut b, &x, &to_bf16(&w), m, k, n);
        let l2 = |v: &[f32]| v.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
        let diff: Vec<f32> = a.iter().zip(&b).map(|(p, q)| p - q).collect();
        let rel = l2(&diff) / l2(&a);
        assert!(rel < 4e-3 && rel > 0.0, "relative L2 {rel}");
    }

    /// Rows are independent: row i of a batch equals the batch-1 product of x row i bit for bit,
    /// on every ISA, though the two run in different tiles (8-row weight blocks for one input
    /// row, 4-row blocks and ragged edges for six): every tile sums in the same order.
    #[test]
    fn batch_rows_equal_single_rows() {
        let (m, k, n) = (6, 80, 50);
        let (x, w) = (fill(m * k, 3), fill(n * k, 4));
        let wb = to_bf16(&w);
        for isa in isas() {
            rows_match(isa, &x, &w, m, k, n);
            rows_match(isa, &x, &wb, m, k, n);
        }
    }

    fn rows_match<W: Weight>(isa: Isa, x: &[f32], w: &[W], m: usize, k: usize, n: usize) {
        let mut all = vec![0.0; m * n];
        matvec_nt_with(isa, &mut all, x, w, m, k, n);
        for i in 0..m {
            let mut one = vec![0.0; n];
            matvec_nt_with(isa, &mut one, &x[i * k..(i + 1) * k], w, 1, k, n);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&all[i * n..(i + 1) * n]), "{isa:?} {}B row {i}", W::BYTES);
        }
    }
}

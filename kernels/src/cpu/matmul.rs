//! Matrix multiplication: C (M, N) (=|+=) op(A) (M, K) · op(B) (K, N).
//!
//! Layouts are row-major. `trans_a` means A is stored as (K, M); `trans_b` means B is stored as
//! (N, K) (the `x W^T` of a linear layer). `accumulate` selects `C += A·B` over `C = A·B`.
//!
//! The fast path is BLIS-style (Goto's algorithm): for each (KC x NC) block of op(B), packed
//! once into NR-wide column panels, every (MC x KC) block of op(A) is packed into MR-tall row
//! panels and a register-blocked micro-kernel computes MR x NR tiles of C from them. Packing
//! absorbs the transposes, so one micro-kernel serves all four layouts. Block sizes keep an A
//! block in L2 and stream B panels from L2.
//!
//! Parallelism: rayon over a grid of (MC rows of C) x (column chunks of C) tasks for each packed B
//! block; tasks write disjoint tiles of C, so there are no races. The K loop stays sequential:
//! the first K block writes C (`=` unless accumulating), the later ones add to it.
//!
//! Micro-kernels, chosen at run time: AVX-512F (8 x 32), AVX2+FMA (6 x 16), NEON (8 x 8) on
//! aarch64, and a portable one (4 x 8) that the compiler vectorises as it can.
use rayon::prelude::*;

use super::SyncPtr;

/// Moved to `cpu::isa`; re-exported so `matmul::Isa` keeps working.
pub use super::isa::Isa;

/// Shape of one matmul problem, shared by the naive and fast kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl MatmulShape {
    pub fn new(m: usize, k: usize, n: usize, trans_a: bool, trans_b: bool) -> Self {
        Self { m, k, n, trans_a, trans_b }
    }

    /// Element (i, p) of op(A).
    #[inline]
    fn a_at(&self, a: &[f32], i: usize, p: usize) -> f32 {
        if self.trans_a { a[p * self.m + i] } else { a[i * self.k + p] }
    }

    /// Element (p, j) of op(B).
    #[inline]
    fn b_at(&self, b: &[f32], p: usize, j: usize) -> f32 {
        if self.trans_b { b[j * self.k + p] } else { b[p * self.n + j] }
    }

    /// Panics unless A, B and C hold exactly `batch` problems of this shape (in release builds
    /// too: the fast path writes C through raw pointers).
    fn check(&self, a: usize, b: usize, c: usize, batch: usize) {
        let want = |x: usize, y: usize| x.checked_mul(y).and_then(|n| n.checked_mul(batch));
        assert!(
            Some(a) == want(self.m, self.k)
                && Some(b) == want(self.k, self.n)
                && Some(c) == want(self.m, self.n),
            "matmul {self:?} x {batch}: buffers of {a}, {b}, {c} floats"
        );
    }

    /// FLOPs of one problem (a multiply-add counts 2).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// Reference triple loop, accumulated in f64. Test oracle for `matmul`.
pub fn matmul_naive(c: &mut [f32], a: &[f32], b: &[f32], s: MatmulShape, accumulate: bool) {
    s.check(a.len(), b.len(), c.len(), 1);
    for i in 0..s.m {
        for j in 0..s.n {
            let mut acc = 0.0f64;
            for p in 0..s.k {
                acc += s.a_at(a, i, p) as f64 * s.b_at(b, p, j) as f64;
            }
            let out = &mut c[i * s.n + j];
            *out = if accumulate { *out + acc as f32 } else { acc as f32 };
        }
    }
}

/// Micro-tile (MR, NR) of `isa`.
fn tile_of(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (8, 32),
        Isa::Avx2 => (6, 16),
        Isa::Neon => (8, 8),
        Isa::Portable => (4, 8),
    }
}

/// Below this many multiply-adds, packing and threads cost more than they save.
const SMALL: usize = 48 * 48 * 48;
/// K block (at most). Long K runs amortise the C tile's load/store; measured best at 512-1024
/// on Zen 4 (docs/perf/cpu-matmul.md), where the KC x NR sliver of B streams from L2.
const KC: usize = 768;
/// M block (at most): an MC x KC block of A (384 KiB) stays in the 1 MiB L2; 128 rather than
/// 256 also gives two threads enough blocks at M = 1024.
const MC: usize = 128;
/// N block: a KC x NC block of B (12 MiB at most) is shared by all threads from L3.
const NC: usize = 4096;

/// C (M, N) (=|+=) op(A) · op(B).
pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], s: MatmulShape, accumulate: bool) {
    matmul_with(Isa::detect(), c, a, b, s, accumulate)
}

/// `matmul` with a given micro-kernel (tests and benchmarks compare them). Falls back to the
/// portable kernel when the CPU lacks `isa`. Panics when a buffer is shorter than the shape.
pub fn matmul_with(
    isa: Isa,
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    s: MatmulShape,
    accumulate: bool,
) {
    s.check(a.len(), b.len(), c.len(), 1);
    if s.m == 0 || s.n == 0 {
        return;
    }
    if s.k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    if s.m * s.n * s.k <= SMALL {
        return matmul_small(c, a, b, s, accumulate);
    }
    let isa = if isa.supported() { isa } else { Isa::Portable };
    let (mr, nr) = tile_of(isa);
    // Even blocks: K = 1024 splits 512 + 512, not 768 + 256 (a thin last block wastes a pass).
    let kc_blk = s.k.div_ceil(s.k.div_ceil(KC));
    let mc_blk = s.m.div_ceil(s.m.div_ceil(MC)).next_multiple_of(mr);
    let c_ptr = SyncPtr(c.as_mut_ptr());
    let mut bpack = Vec::new();
    for jc in (0..s.n).step_by(NC) {
        let nc = NC.min(s.n - jc);
        for pc in (0..s.k).step_by(kc_blk) {
            let kc = kc_blk.min(s.k - pc);
            pack_b(&mut bpack, b, s, pc, kc, jc, nc, nr);
            let overwrite = pc == 0 && !accumulate;
            // Tasks: MC row blocks x column chunks, enough of them to keep every thread busy.
            let m_blocks = s.m.div_ceil(mc_blk);
            let panels = nc.div_ceil(nr);
            let want = rayon::current_num_threads() * 4;
            let n_chunks = want.div_ceil(m_blocks).clamp(1, panels);
            let per_chunk = panels.div_ceil(n_chunks);
            let bpack = &bpack;
            (0..m_blocks * n_chunks).into_par_iter().for_each(|task| {
                let (ib, jb) = (task / n_chunks, task % n_chunks);
                let ic = ib * mc_blk;
                let mc = mc_blk.min(s.m - ic);
                let (p0, p1) = (jb * per_chunk, ((jb + 1) * per_chunk).min(panels));
                if p0 >= p1 {
                    return;
                }
                APACK.with_borrow_mut(|apack| {
                    pack_a(apack, a, s, ic, mc, pc, kc, mr);
                    for jp in p0..p1 {
                        let j = jc + jp * nr;
                        let nv = nr.min(s.n - j);
                        let bp = &bpack[jp * kc * nr..(jp + 1) * kc * nr];
                        for (ip, ap) in apack.chunks_exact(kc * mr).enumerate() {
                            let i = ic + ip * mr;
                            let mv = mr.min(s.m - i);
                            // SAFETY: tile (i..i+mv, j..j+nv) lies inside C and belongs to this task
                            // alone (tasks split rows by MC blocks and columns by panel ranges).
                            unsafe {
                                let cp = c_ptr.get().add(i * s.n + j);
                                tile(isa, kc, ap, bp, cp, s.n, mv, nv, overwrite);
                            }
                        }
                    }
                });
            });
        }
    }
}

thread_local! {
    /// Per-thread packed A block, reused across calls.
    static APACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Pack op(B)[pc..pc+kc, jc..jc+nc] as NR-wide panels (kc, NR), zero-padded past N.
#[allow(clippy::too_many_arguments)]
fn pack_b(
    out: &mut Vec<f32>,
    b: &[f32],
    s: MatmulShape,
    pc: usize,
    kc: usize,
    jc: usize,
    nc: usize,
    nr: usize,
) {
    let panels = nc.div_ceil(nr);
    out.clear();
    out.resize(panels * kc * nr, 0.0);
    out.par_chunks_mut(kc * nr).enumerate().for_each(|(jp, panel)| {
        let j0 = jc + jp * nr;
        let nv = nr.min(jc + nc - j0);
        for p in 0..kc {
            let dst = &mut panel[p * nr..p * nr + nv];
            if s.trans_b {
                // B stored (N, K): a strided gather.
                for (jj, d) in dst.iter_mut().enumerate() {
                    *d = b[(j0 + jj) * s.k + pc + p];
                }
            } else {
                let row = (pc + p) * s.n + j0;
                dst.copy_from_slice(&b[row..row + nv]);
            }
        }
    });
}

/// Pack op(A)[ic..ic+mc, pc..pc+kc] as MR-tall panels (kc, MR), zero-padded past M.
///
/// Packing costs one pass over the block per call, against kc * N multiply-adds per element: a
/// small N (the backward's dW = dY^T X of a C-wide layer) leaves it a tenth of the matmul, so
/// full panels go through fixed-size copies (A stored (K, M)) or 8 x 8 register transposes (A
/// stored (M, K)), and only partial panels are zero-filled.
#[allow(clippy::too_many_arguments)]
fn pack_a(
    out: &mut Vec<f32>,
    a: &[f32],
    s: MatmulShape,
    ic: usize,
    mc: usize,
    pc: usize,
    kc: usize,
    mr: usize,
) {
    let panels = mc.div_ceil(mr);
    let len = panels * kc * mr;
    // Full panels are overwritten whole, so only a grown tail is zeroed (`resize`, no `clear`).
    out.resize(len, 0.0);
    for (ip, panel) in out.chunks_exact_mut(kc * mr).enumerate() {
        let i0 = ic + ip * mr;
        let mv = mr.min(ic + mc - i0);
        match (s.trans_a, mv == mr, mr) {
            (true, true, 8) => pack_a_cols::<8>(panel, a, s.m, i0, pc, kc),
            (true, true, 6) => pack_a_cols::<6>(panel, a, s.m, i0, pc, kc),
            (true, true, 4) => pack_a_cols::<4>(panel, a, s.m, i0, pc, kc),
            (false, true, 8) => pack_a_rows_8(panel, a, s.k, i0, pc, kc),
            (false, true, 6) => pack_a_rows::<6>(panel, a, s.k, i0, pc, kc),
            (false, true, 4) => pack_a_rows::<4>(panel, a, s.k, i0, pc, kc),
            (true, ..) => {
                // A stored (K, M): each k gives mv contiguous values; rows past M stay zero.
                panel.fill(0.0);
                for p in 0..kc {
                    let row = (pc + p) * s.m + i0;
                    panel[p * mr..p * mr + mv].copy_from_slice(&a[row..row + mv]);
                }
            }
            (false, ..) => {
                panel.fill(0.0);
                for ii in 0..mv {
                    let row = &a[(i0 + ii) * s.k + pc..][..kc];
                    for (p, &x) in row.iter().enumerate() {
                        panel[p * mr + ii] = x;
                    }
                }
            }
        }
    }
}

/// A full panel from A stored (K, M): MR contiguous values per k, copied as one fixed-size block.
fn pack_a_cols<const MR: usize>(
    panel: &mut [f32],
    a: &[f32],
    m: usize,
    i0: usize,
    pc: usize,
    kc: usize,
) {
    for (p, dst) in panel.chunks_exact_mut(MR).take(kc).enumerate() {
        let src: &[f32; MR] = a[(pc + p) * m + i0..][..MR].try_into().expect("MR values");
        dst.copy_from_slice(src);
    }
}

/// A full panel from A stored (M, K): MR row streams gathered one k at a time.
fn pack_a_rows<const MR: usize>(
    panel: &mut [f32],
    a: &[f32],
    k: usize,
    i0: usize,
    pc: usize,
    kc: usize,
) {
    let rows: [&[f32]; MR] = std::array::from_fn(|ii| &a[(i0 + ii) * k + pc..][..kc]);
    for (p, dst) in panel.chunks_exact_mut(MR).take(kc).enumerate() {
        for (d, row) in dst.iter_mut().zip(&rows) {
            *d = row[p];
        }
    }
}

/// `pack_a_rows::<8>` with 8 x 8 blocks transposed in AVX registers where the CPU has AVX2.
fn pack_a_rows_8(panel: &mut [f32], a: &[f32], k: usize, i0: usize, pc: usize, kc: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = super::simd::avx2() {
        let rows: [&[f32]; 8] = std::array::from_fn(|ii| &a[(i0 + ii) * k + pc..][..kc]);
        let k8 = kc & !7;
        assert!(panel.len() >= kc * 8);
        // SAFETY: t proves AVX2; each row holds kc >= k8 values and panel kc * 8.
        unsafe { x86::transpose_8x8_blocks(t, panel.as_mut_ptr(), rows.map(|r| r.as_ptr()), k8) };
        for p in k8..kc {
            for (ii, row) in rows.iter().enumerate() {
                panel[p * 8 + ii] = row[p];
            }
        }
        return;
    }
    pack_a_rows::<8>(panel, a, k, i0, pc, kc)
}

/// One MR x NR tile of C from packed panels. Full x86 tiles are stored (or added) straight into
/// C by the micro-kernel's registers; partial tiles, and other ISAs, go through a scratch tile
/// and a scalar copy (at K = 256 that copy was ~4% of a training step). Either way each element
/// of C is `acc` or `C + acc`: the same arithmetic.
///
/// # Safety
/// `c` points at row i, column j of C with row stride `ldc`, and the `mv` x `nv` block there is
/// inside C and not written concurrently.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    isa: Isa,
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    c: *mut f32,
    ldc: usize,
    mv: usize,
    nv: usize,
    overwrite: bool,
) {
    let (mr, nr) = tile_of(isa);
    #[cfg(target_arch = "x86_64")]
    if mv == mr && nv == nr {
        let acc = !overwrite;
        // SAFETY: the panels hold kc * MR and kc * NR values; the full MR x NR block at c is
        // inside C and this task's alone (caller).
        unsafe {
            match isa {
                Isa::Avx512 => return x86::kernel_8x32(kc, ap.as_ptr(), bp.as_ptr(), c, ldc, acc),
                Isa::Avx2 => return x86::kernel_6x16(kc, ap.as_ptr(), bp.as_ptr(), c, ldc, acc),
                _ => {}
            }
        }
    }
    let mut acc = [0.0f32; 8 * 32]; // (MR, NR) of the largest tile
    let acc = &mut acc[..mr * nr];
    // SAFETY: the panels hold kc * MR and kc * NR values and acc holds MR x NR.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                x86::kernel_8x32(kc, ap.as_ptr(), bp.as_ptr(), acc.as_mut_ptr(), nr, false)
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                x86::kernel_6x16(kc, ap.as_ptr(), bp.as_ptr(), acc.as_mut_ptr(), nr, false)
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => arm::kernel_8x8(kc, ap.as_ptr(), bp.as_ptr(), acc.as_mut_ptr()),
            _ => kernel_portable(kc, ap, bp, acc),
        }
        for i in 0..mv {
            let row = c.add(i * ldc);
            for j in 0..nv {
                let v = acc[i * nr + j];
                *row.add(j) = if overwrite { v } else { *row.add(j) + v };
            }
        }
    }
}

/// Portable 4 x 8 micro-kernel: acc (4, 8) = A panel (kc, 4)^T · B panel (kc, 8).
fn kernel_portable(kc: usize, ap: &[f32], bp: &[f32], acc: &mut [f32]) {
    let mut t = [[0.0f32; 8]; 4];
    for p in 0..kc {
        let a = &ap[p * 4..p * 4 + 4];
        let b = &bp[p * 8..p * 8 + 8];
        for i in 0..4 {
            for j in 0..8 {
                t[i][j] += a[i] * b[j];
            }
        }
    }
    for i in 0..4 {
        acc[i * 8..i * 8 + 8].copy_from_slice(&t[i]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::cpu::simd::Avx2Fma;

    /// panel[p * 8 + i] = rows[i][p] for p < k8 (a multiple of 8), one 8 x 8 block at a time:
    /// eight row loads, the classic unpack / shuffle / 128-bit permute transpose, eight stores.
    ///
    /// # Safety
    /// Each row holds k8 floats and the panel k8 * 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn transpose_8x8_blocks(
        _: Avx2Fma,
        panel: *mut f32,
        rows: [*const f32; 8],
        k8: usize,
    ) {
        let mut p = 0;
        // SAFETY: reads rows[i][p..p + 8] and writes panel[p * 8..p * 8 + 64], p + 8 <= k8.
        unsafe {
            while p < k8 {
                let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].add(p)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0b01_00_01_00>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0b11_10_11_10>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0b01_00_01_00>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0b11_10_11_10>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0b01_00_01_00>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0b11_10_11_10>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0b01_00_01_00>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0b11_10_11_10>(t5, t7);
                // Column c of the block (k = p + c) is rows 0..8 at that k.
                let cols = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (c, v) in cols.iter().enumerate() {
                    _mm256_storeu_ps(panel.add((p + c) * 8), *v);
                }
                p += 8;
            }
        }
    }

    /// c (8, 32) (=|+=) A panel (kc, 8)^T · B panel (kc, 32), c's rows `ldc` apart: 16 zmm
    /// accumulators, two B vectors and one broadcast A value live per k.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_8x32(
        kc: usize,
        a: *const f32,
        b: *const f32,
        out: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        unsafe {
            let mut c = [[_mm512_setzero_ps(); 2]; 8];
            for p in 0..kc {
                let b0 = _mm512_loadu_ps(b.add(p * 32));
                let b1 = _mm512_loadu_ps(b.add(p * 32 + 16));
                for (i, ci) in c.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*a.add(p * 8 + i));
                    ci[0] = _mm512_fmadd_ps(ai, b0, ci[0]);
                    ci[1] = _mm512_fmadd_ps(ai, b1, ci[1]);
                }
            }
            for (i, ci) in c.iter().enumerate() {
                let row = out.add(i * ldc);
                let (mut c0, mut c1) = (ci[0], ci[1]);
                if accumulate {
                    c0 = _mm512_add_ps(_mm512_loadu_ps(row), c0);
                    c1 = _mm512_add_ps(_mm512_loadu_ps(row.add(16)), c1);
                }
                _mm512_storeu_ps(row, c0);
                _mm512_storeu_ps(row.add(16), c1);
            }
        }
    }

    /// c (6, 16) (=|+=) A panel (kc, 6)^T · B panel (kc, 16), c's rows `ldc` apart: 12 ymm
    /// accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_6x16(
        kc: usize,
        a: *const f32,
        b: *const f32,
        out: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        unsafe {
            let mut c = [[_mm256_setzero_ps(); 2]; 6];
            for p in 0..kc {
                let b0 = _mm256_loadu_ps(b.add(p * 16));
                let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
                for (i, ci) in c.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*a.add(p * 6 + i));
                    ci[0] = _mm256_fmadd_ps(ai, b0, ci[0]);
                    ci[1] = _mm256_fmadd_ps(ai, b1, ci[1]);
                }
            }
            for (i, ci) in c.iter().enumerate() {
                let row = out.add(i * ldc);
                let (mut c0, mut c1) = (ci[0], ci[1]);
                if accumulate {
                    c0 = _mm256_add_ps(_mm256_loadu_ps(row), c0);
                    c1 = _mm256_add_ps(_mm256_loadu_ps(row.add(8)), c1);
                }
                _mm256_storeu_ps(row, c0);
                _mm256_storeu_ps(row.add(8), c1);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    /// acc (8, 8) = A panel (kc, 8)^T · B panel (kc, 8): 16 q-register accumulators.
    #[target_feature(enable = "neon")]
    pub unsafe fn kernel_8x8(kc: usize, a: *const f32, b: *const f32, acc: *mut f32) {
        unsafe {
            let mut c = [[vdupq_n_f32(0.0); 2]; 8];
            for p in 0..kc {
                let b0 = vld1q_f32(b.add(p * 8));
                let b1 = vld1q_f32(b.add(p * 8 + 4));
                for (i, ci) in c.iter_mut().enumerate() {
                    let ai = vdupq_n_f32(*a.add(p * 8 + i));
                    ci[0] = vfmaq_f32(ci[0], ai, b0);
                    ci[1] = vfmaq_f32(ci[1], ai, b1);
                }
            }
            for (i, ci) in c.iter().enumerate() {
                vst1q_f32(acc.add(i * 8), ci[0]);
                vst1q_f32(acc.add(i * 8 + 4), ci[1]);
            }
        }
    }
}

/// Small problems: row-by-row saxpy over op(B) rows, no packing, no threads.
fn matmul_small(c: &mut [f32], a: &[f32], b: &[f32], s: MatmulShape, accumulate: bool) {
    let mut brow = vec![0.0f32; s.n];
    if !accumulate {
        c.fill(0.0);
    }
    for p in 0..s.k {
        let row: &[f32] = if s.trans_b {
            for (j, v) in brow.iter_mut().enumerate() {
                *v = b[j * s.k + p];
            }
            &brow
        } else {
            &b[p * s.n..(p + 1) * s.n]
        };
        for i in 0..s.m {
            let av = s.a_at(a, i, p);
            for (cv, &bv) in c[i * s.n..(i + 1) * s.n].iter_mut().zip(row) {
                *cv += av * bv;
            }
        }
    }
}

/// `batch` independent problems laid out contiguously: A (batch, M, K), B (batch, K, N),
/// C (batch, M, N) (with the per-problem layouts of `s`). Small problems run one per task.
pub fn matmul_batched(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    batch: usize,
    s: MatmulShape,
    accumulate: bool,
) {
    s.check(a.len(), b.len(), c.len(), batch);
    let (sa, sb, sc) = (s.m * s.k, s.k * s.n, s.m * s.n);
    if sc == 0 {
        return;
    }
    if s.m * s.n * s.k <= SMALL {
        c.par_chunks_mut(sc).enumerate().for_each(|(i, ci)| {
            matmul_small(ci, &a[i * sa..(i + 1) * sa], &b[i * sb..(i + 1) * sb], s, accumulate)
        });
    } else {
        for i in 0..batch {
            let ci = &mut c[i * sc..(i + 1) * sc];
            matmul(ci, &a[i * sa..(i + 1) * sa], &b[i * sb..(i + 1) * sb], s, accumulate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::cpu::testing::uniform as fill;

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    }

    fn check(isa: Isa, m: usize, k: usize, n: usize, ta: bool, tb: bool, accumulate: bool) {
        let s = MatmulShape::new(m, k, n, ta, tb);
        let (a, b) = (fill(m * k, 1), fill(k * n, 2));
        let c0 = fill(m * n, 3);
        let (mut want, mut got) = (c0.clone(), c0.clone());
        matmul_naive(&mut want, &a, &b, s, accumulate);
        matmul_with(isa, &mut got, &a, &b, s, accumulate);
        let e = rel(&got, &want);
        assert!(e < 1e-5, "{isa:?} {s:?} acc={accumulate}: rel err {e}");
    }

    fn isas() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Portable]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    #[test]
    fn every_isa_layout_and_ragged_edge() {
        for isa in isas() {
            for (m, k, n) in
                [(67, 300, 45), (129, 257, 33), (1, 700, 90), (90, 700, 1), (200, 5, 77)]
            {
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    for acc in [false, true] {
                        check(isa, m, k, n, ta, tb, acc);
                    }
                }
            }
        }
    }

    #[test]
    fn degenerate_sizes() {
        let s = MatmulShape::new(3, 0, 2, false, false);
        let mut c = vec![5.0; 6];
        matmul(&mut c, &[], &[], s, true);
        assert_eq!(c, vec![5.0; 6]);
        matmul(&mut c, &[], &[], s, false);
        assert_eq!(c, vec![0.0; 6]);
        matmul(&mut [], &[], &[1.0; 4], MatmulShape::new(0, 2, 2, false, false), false);
    }

    #[test]
    fn batched_matches_single() {
        for (m, k, n) in [(5, 7, 3), (70, 90, 60)] {
            let s = MatmulShape::new(m, k, n, true, false);
            let batch = 3;
            let (a, b) = (fill(batch * m * k, 4), fill(batch * k * n, 5));
            let mut c = vec![0.0; batch * m * n];
            matmul_batched(&mut c, &a, &b, batch, s, false);
            for i in 0..batch {
                let mut want = vec![0.0; m * n];
                matmul_naive(
                    &mut want,
                    &a[i * m * k..(i + 1) * m * k],
                    &b[i * k * n..(i + 1) * k * n],
                    s,
                    false,
                );
                assert!(rel(&c[i * m * n..(i + 1) * m * n], &want) < 1e-5);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn fast_equals_naive(m in 1usize..90, k in 1usize..90, n in 1usize..90, ta: bool, tb: bool, acc: bool) {
            for isa in isas() {
                check(isa, m, k, n, ta, tb, acc);
            }
        }

        /// A·(B1 + B2) = A·B1 + A·B2 within rounding.
        #[test]
        fn distributes_over_addition(m in 40usize..80, k in 40usize..80, n in 40usize..80) {
            let s = MatmulShape::new(m, k, n, false, false);
            let (a, b1, b2) = (fill(m * k, 6), fill(k * n, 7), fill(k * n, 8));
            let bsum: Vec<f32> = b1.iter().zip(&b2).map(|(x, y)| x + y).collect();
            let mut lhs = vec![0.0; m * n];
            matmul(&mut lhs, &a, &bsum, s, false);
            let mut rhs = vec![0.0; m * n];
            matmul(&mut rhs, &a, &b1, s, false);
            matmul(&mut rhs, &a, &b2, s, true);
            prop_assert!(rel(&lhs, &rhs) < 1e-5);
        }
    }
}

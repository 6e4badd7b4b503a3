//! Tiled forward: one task per (b, h, block of Br query rows), online softmax over key tiles.
//! AVX-512 and AVX2 instances of the task functions are monomorphised inside a
//! `#[target_feature]` function so the micro-kernels inline and the exp/max/sum loops
//! vectorise at that width. They are entered with the markers that prove the CPU features.
use rayon::prelude::*;

use super::*;
use crate::cpu::simd::{BlockGemm, Lanes, fast_exp, fast_exp_by};

/// Forward of query rows i0..i0+Br of (batch b, head h): out rows (Br, D) of that head, lse.
///
/// Scores are computed transposed, St (nc, nr) = K (nc, D) · Qt (D, nr), so the query block is
/// packed once per task instead of a key block per tile, and the softmax statistics of all nr
/// rows update together along contiguous St rows.
#[inline(always)]
fn forward_task<G: BlockGemm, L: Lanes>(
    _: (G, L),
    sc: &mut Scratch,
    cx: &Fwd,
    b: usize,
    h: usize,
    i0: usize,
) {
    let (s, bc) = (cx.s, cx.bl.bc);
    let (d, qs, kvs, scale) = (s.d, s.h * s.d, s.hkv * s.d, s.scale());
    let nr = cx.bl.br.min(s.tq - i0);
    let g = h / (s.h / s.hkv);
    let q0 = s.q_at(b, i0, h);
    // SAFETY (pointer use below): out rows (b, i0..i0+nr, h) and their lse entries belong to
    // this task alone (tasks split (b, h, query block)); every offset stays inside out.
    let o = unsafe { cx.out.0.add(q0) };
    for r in 0..nr {
        unsafe { row_mut(o.add(r * qs), d) }.fill(0.0);
    }
    let qt = &mut sc.kt[..d * nr];
    pack_t(qt, cx.q, q0, qs, nr, d);
    let (m, l, tm) = (&mut sc.m[..nr], &mut sc.l[..nr], &mut sc.tm[..nr]);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let (lo, hi) = (s.key_range(i0).0, s.key_range(i0 + nr - 1).1);
    let mut j0 = lo;
    while j0 <= hi {
        let nc = bc.min(hi + 1 - j0);
        let k0 = s.kv_at(b, j0, g);
        let st = &mut sc.s[..nc * nr];
        // St (nc, nr) = K (nc, D) · Qt (D, nr); bounds: nc key rows and the packed block.
        unsafe {
            let kp = cx.k.as_ptr().add(k0);
            G::gemm(st.as_mut_ptr(), nr, kp, kvs, 1, qt.as_ptr(), nr, nc, nr, d, false);
        }
        let full = full_tile(&s, i0, nr, j0, nc);
        if !full {
            for (c, row) in st.chunks_exact_mut(nr).enumerate() {
                let (a, z) = qcols(&s, j0 + c, i0, nr).unwrap_or((nr, nr));
                row[..a].fill(f32::NEG_INFINITY);
                row[(z + 1).min(nr)..].fill(f32::NEG_INFINITY);
            }
        }
        tm.fill(f32::NEG_INFINITY);
        for row in st.chunks_exact(nr) {
            tm.iter_mut().zip(row).for_each(|(t, &x)| *t = if x > *t { x } else { *t });
        }
        // m_new = max(m, scale tm); old terms were weighted e^(s - m), now e^(s - m_new), so l
        // and out rows scale by alpha. tm becomes the shift of this tile's exps: a row with
        // nothing visible yet shifts by 0 (its exps of -inf stay finite and are zeroed below)
        // and keeps m = -inf, so alpha = 0 drops nothing real once its first key arrives.
        let al = &mut sc.al[..nr];
        for (((t, mr), lr), a) in
            tm.iter_mut().zip(m.iter_mut()).zip(l.iter_mut()).zip(al.iter_mut())
        {
            let m_new = mr.max(scale * *t);
            *a = if *mr == f32::NEG_INFINITY { 0.0 } else { fast_exp(*mr - m_new) };
            *lr *= *a;
            *mr = m_new;
            *t = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
        }
        for (c, row) in st.chunks_exact_mut(nr).enumerate() {
            let exp = |x: f32, mx: f32| fast_exp_by(G::mul_add(x, scale, -mx), G::mul_add);
            row.iter_mut().zip(&*tm).for_each(|(x, &mx)| *x = exp(*x, mx));
            if !full {
                let (a, z) = qcols(&s, j0 + c, i0, nr).unwrap_or((nr, nr));
                row[..a].fill(0.0);
                row[(z + 1).min(nr)..].fill(0.0);
            }
            l.iter_mut().zip(&*row).for_each(|(l, &p)| *l += p);
        }
        for (r, &alpha) in al.iter().enumerate() {
            if alpha != 1.0 {
                unsafe { row_mut(o.add(r * qs), d) }.iter_mut().for_each(|x| *x *= alpha);
            }
        }
        // out (nr, D) += P (nr, nc) · V (nc, D), P read through St's strides.
        unsafe {
            let vp = cx.v.as_ptr().add(k0);
            G::gemm(o, qs, st.as_ptr(), 1, nr, vp, kvs, nr, d, nc, true);
        }
        j0 += nc;
    }
    for r in 0..nr {
        let inv = 1.0 / l[r];
        unsafe { row_mut(o.add(r * qs), d) }.iter_mut().for_each(|x| *x *= inv);
        unsafe { *cx.lse.0.add((b * s.tq + i0 + r) * s.h + h) = m[r] + l[r].ln() };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use super::*;
    use crate::cpu::simd::Avx512;

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn forward_task(
        k: (Avx512, Avx2Fma),
        sc: &mut Scratch,
        cx: &Fwd,
        b: usize,
        h: usize,
        i0: usize,
    ) {
        super::forward_task(k, sc, cx, b, h, i0)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_256 {
    use super::*;
    use crate::cpu::simd::Avx2Fma;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn forward_task(
        k: (Avx2Fma, Avx2Fma),
        sc: &mut Scratch,
        cx: &Fwd,
        b: usize,
        h: usize,
        i0: usize,
    ) {
        super::forward_task(k, sc, cx, b, h, i0)
    }
}

/// The tiled forward (any Tq) with a given instruction set (tests and benchmarks compare them).
#[allow(clippy::too_many_arguments)]
pub fn flash_forward_with(
    isa: Isa,
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    bl: FlashBlocks,
) {
    check_sizes(s, bl, &[q.len(), k.len(), v.len(), out.len()], lse.len());
    if s.h * s.d == 0 || s.tq == 0 {
        return;
    }
    let kern = kernels(isa);
    let cx = Fwd { s, bl, q, k, v, out: SyncPtr(out.as_mut_ptr()), lse: SyncPtr(lse.as_mut_ptr()) };
    let nqb = s.tq.div_ceil(bl.br);
    // Heads vary fastest (a GQA group shares its K/V blocks in cache); the last query blocks,
    // which see the most keys, are handed out first so no long task starts last.
    (0..s.b * nqb * s.h).into_par_iter().for_each_init(
        || Scratch::new(s, bl, false),
        |sc, t| {
            let (h, qb, b) = (t % s.h, nqb - 1 - t / s.h % nqb, t / (s.h * nqb));
            dispatch!(kern, forward_task(sc, &cx, b, h, qb * bl.br))
        },
    );
}

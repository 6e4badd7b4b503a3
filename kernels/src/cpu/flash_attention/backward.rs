//! Backward: pass 1 dk, dv per (b, kv head, key block); pass 2 dq per (b, h, query block).
//! AVX-512 and AVX2 instances of the task functions are monomorphised inside a
//! `#[target_feature]` function so the micro-kernels inline and the exp/max/sum loops
//! vectorise at that width. They are entered with the markers that prove the CPU features.
use rayon::prelude::*;

use super::*;
use crate::cpu::simd::{BlockGemm, Lanes, fast_exp_by};

/// lse and delta = dout . out of query rows i0..i0+nr of (b, h), into `lse_r`, `delta_r`.
#[inline(always)]
fn row_stats<L: Lanes>(
    lanes: L,
    cx: &Bwd,
    b: usize,
    h: usize,
    i0: usize,
    lse_r: &mut [f32],
    delta_r: &mut [f32],
) {
    let s = cx.s;
    for (r, (l, dl)) in lse_r.iter_mut().zip(delta_r.iter_mut()).enumerate() {
        let at = s.q_at(b, i0 + r, h);
        *l = cx.lse[(b * s.tq + i0 + r) * s.h + h];
        *dl = lanes.dot(&cx.dout[at..at + s.d], &cx.out[at..at + s.d]);
    }
}

/// S and dP of one tile from the packed kt, vt: s = P, dp = scale dS, both (nr, nc) with zeros
/// at masked keys. dS = P (dP - delta), and the scale of S = scale Q K^T folds into it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_grads<G: BlockGemm>(
    sc: &mut Scratch,
    cx: &Bwd,
    b: usize,
    h: usize,
    i0: usize,
    nr: usize,
    j0: usize,
    nc: usize,
) {
    let s = cx.s;
    let (d, qs, scale) = (s.d, s.h * s.d, s.scale());
    let q0 = s.q_at(b, i0, h);
    let (st, dp) = (&mut sc.s[..nr * nc], &mut sc.dp[..nr * nc]);
    // S = Q Kt, dP = dout Vt: nr rows of q and dout, the packed (D, nc) blocks.
    unsafe {
        let (qp, dop) = (cx.q.as_ptr().add(q0), cx.dout.as_ptr().add(q0));
        G::gemm(st.as_mut_ptr(), nc, qp, qs, 1, sc.kt.as_ptr(), nc, nr, nc, d, false);
        G::gemm(dp.as_mut_ptr(), nc, dop, qs, 1, sc.vt.as_ptr(), nc, nr, nc, d, false);
    }
    let rows = st.chunks_exact_mut(nc).zip(dp.chunks_exact_mut(nc));
    for (r, (pr, dpr)) in rows.enumerate() {
        let Some((a, z)) = cols(&s, i0 + r, j0, nc) else {
            pr.fill(0.0);
            dpr.fill(0.0);
            continue;
        };
        let (l, dl) = (sc.m[r], sc.l[r]);
        for (x, y) in pr[a..=z].iter_mut().zip(&mut dpr[a..=z]) {
            let p = fast_exp_by(G::mul_add(*x, scale, -l), G::mul_add);
            *x = p;
            *y = scale * p * (*y - dl);
        }
        for buf in [&mut *pr, &mut *dpr] {
            buf[..a].fill(0.0);
            buf[z + 1..].fill(0.0);
        }
    }
}

/// Backward pass 1 for keys j0..j0+Bc of (batch b, kv head g): dk, dv rows +=.
#[inline(always)]
fn dkv_task<G: BlockGemm, L: Lanes>(
    (_, l): (G, L),
    sc: &mut Scratch,
    cx: &Bwd,
    b: usize,
    g: usize,
    j0: usize,
) {
    let (s, br) = (cx.s, cx.bl.br);
    let (d, qs, kvs, group) = (s.d, s.h * s.d, s.hkv * s.d, s.h / s.hkv);
    let nc = cx.bl.bc.min(s.tk - j0);
    // Query ranges grow with j, so the first and last keys that any query sees bound them all.
    let mut seen = (j0..j0 + nc).filter_map(|j| s.query_range(j));
    let Some((qlo, mut qhi)) = seen.next() else {
        return;
    };
    if let Some((_, last)) = seen.next_back() {
        qhi = last;
    }
    let k0 = s.kv_at(b, j0, g);
    pack_t(&mut sc.kt, cx.k, k0, kvs, nc, d);
    pack_t(&mut sc.vt, cx.v, k0, kvs, nc, d);
    // SAFETY (pointer use below): dk, dv rows (b, j0..j0+nc, g) belong to this task alone.
    let (dkp, dvp) = unsafe { (cx.dk.0.add(k0), cx.dv.0.add(k0)) };
    for h in g * group..(g + 1) * group {
        let mut i0 = qlo;
        while i0 <= qhi {
            let nr = br.min(qhi + 1 - i0);
            row_stats(l, cx, b, h, i0, &mut sc.m[..nr], &mut sc.l[..nr]);
            tile_grads::<G>(sc, cx, b, h, i0, nr, j0, nc);
            let q0 = s.q_at(b, i0, h);
            // dv (nc, D) += P^T (nc, nr) · dout (nr, D); dk += (scale dS)^T · Q. A^T is read
            // through strides (a_rs = 1, a_cs = nc), so nothing is transposed in memory.
            unsafe {
                let (qp, dop) = (cx.q.as_ptr().add(q0), cx.dout.as_ptr().add(q0));
                G::gemm(dvp, kvs, sc.s.as_ptr(), 1, nc, dop, qs, nc, d, nr, true);
                G::gemm(dkp, kvs, sc.dp.as_ptr(), 1, nc, qp, qs, nc, d, nr, true);
            }
            i0 += nr;
        }
    }
}

/// Backward pass 2 for query rows i0..i0+Br of (batch b, head h): dq rows +=. Transposed
/// like the forward: Qt and dout^T are packed once, St = K Qt and dPt = V dout^T per tile.
#[inline(always)]
fn dq_task<G: BlockGemm, L: Lanes>(
    (_, l): (G, L),
    sc: &mut Scratch,
    cx: &Bwd,
    b: usize,
    h: usize,
    i0: usize,
) {
    let (s, bc) = (cx.s, cx.bl.bc);
    let (d, qs, kvs, scale) = (s.d, s.h * s.d, s.hkv * s.d, s.scale());
    let nr = cx.bl.br.min(s.tq - i0);
    let g = h / (s.h / s.hkv);
    let q0 = s.q_at(b, i0, h);
    row_stats(l, cx, b, h, i0, &mut sc.m[..nr], &mut sc.l[..nr]);
    let (qt, dot) = (&mut sc.kt[..d * nr], &mut sc.vt[..d * nr]);
    pack_t(qt, cx.q, q0, qs, nr, d);
    pack_t(dot, cx.dout, q0, qs, nr, d);
    let (lse_r, delta_r) = (&sc.m[..nr], &sc.l[..nr]);
    let (lo, hi) = (s.key_range(i0).0, s.key_range(i0 + nr - 1).1);
    let mut j0 = lo;
    while j0 <= hi {
        let nc = bc.min(hi + 1 - j0);
        let k0 = s.kv_at(b, j0, g);
        let (st, dpt) = (&mut sc.s[..nc * nr], &mut sc.dp[..nc * nr]);
        // St (nc, nr) = K Qt, dPt = V dout^T: nc key rows and the packed (D, nr) blocks.
        unsafe {
            let (kp, vp) = (cx.k.as_ptr().add(k0), cx.v.as_ptr().add(k0));
            G::gemm(st.as_mut_ptr(), nr, kp, kvs, 1, qt.as_ptr(), nr, nc, nr, d, false);
            G::gemm(dpt.as_mut_ptr(), nr, vp, kvs, 1, dot.as_ptr(), nr, nc, nr, d, false);
        }
        let full = full_tile(&s, i0, nr, j0, nc);
        for (c, (sr, dr)) in st.chunks_exact(nr).zip(dpt.chunks_exact_mut(nr)).enumerate() {
            let (a, z) =
                if full { (0, nr - 1) } else { qcols(&s, j0 + c, i0, nr).unwrap_or((nr, nr)) };
            if a < nr {
                let vis = sr[a..=z].iter().zip(&mut dr[a..=z]);
                for ((&x, y), (&l, &dl)) in vis.zip(lse_r[a..=z].iter().zip(&delta_r[a..=z])) {
                    *y = scale * fast_exp_by(G::mul_add(x, scale, -l), G::mul_add) * (*y - dl);
                }
            }
            dr[..a.min(nr)].fill(0.0);
            dr[(z + 1).min(nr)..].fill(0.0);
        }
        // dq (nr, D) += (scale dS) (nr, nc) · K (nc, D), dS read through dPt's strides.
        // SAFETY: dq rows (b, i0..i0+nr, h) belong to this task alone.
        unsafe {
            let kp = cx.k.as_ptr().add(k0);
            G::gemm(cx.dq.0.add(q0), qs, dpt.as_ptr(), 1, nr, kp, kvs, nr, d, nc, true);
        }
        j0 += nc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use super::*;
    use crate::cpu::simd::{Avx2Fma, Avx512};

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn dkv_task(
        k: (Avx512, Avx2Fma),
        sc: &mut Scratch,
        cx: &Bwd,
        b: usize,
        g: usize,
        j0: usize,
    ) {
        super::dkv_task(k, sc, cx, b, g, j0)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn dq_task(
        k: (Avx512, Avx2Fma),
        sc: &mut Scratch,
        cx: &Bwd,
        b: usize,
        h: usize,
        i0: usize,
    ) {
        super::dq_task(k, sc, cx, b, h, i0)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_256 {
    use super::*;
    use crate::cpu::simd::Avx2Fma;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dkv_task(
        k: (Avx2Fma, Avx2Fma),
        sc: &mut Scratch,
        cx: &Bwd,
        b: usize,
        g: usize,
        j0: usize,
    ) {
        super::dkv_task(k, sc, cx, b, g, j0)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dq_task(
        k: (Avx2Fma, Avx2Fma),
        sc: &mut Scratch,
        cx: &Bwd,
        b: usize,
        h: usize,
        i0: usize,
    ) {
        super::dq_task(k, sc, cx, b, h, i0)
    }
}

// Gradients as in `attention.rs`: with p_ij = e^(s_ij - lse_i), s_ij = scale q_i . k_j,
//   dv_j = sum_i p_ij do_i;  dp_ij = do_i . v_j;  ds_ij = p_ij (dp_ij - delta_i),
//   delta_i = do_i . o_i;  dq_i = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i.
/// dq (B, Tq, H, D) +=, dk, dv (B, Tk, Hkv, D) += attention backward from the saved out and lse,
/// recomputing probabilities tile by tile.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttnShape,
    bl: FlashBlocks,
) {
    flash_backward_with(Isa::detect(), dq, dk, dv, dout, q, k, v, out, lse, s, bl)
}

/// `flash_attention_backward` with a given instruction set.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward_with(
    isa: Isa,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttnShape,
    bl: FlashBlocks,
) {
    let lens = [q.len(), k.len(), v.len(), out.len(), dq.len(), dk.len(), dv.len(), dout.len()];
    check_sizes(s, bl, &lens, lse.len());
    if s.h * s.d == 0 || s.tq == 0 {
        return;
    }
    let kern = kernels(isa);
    let (dq, dk, dv) =
        (SyncPtr(dq.as_mut_ptr()), SyncPtr(dk.as_mut_ptr()), SyncPtr(dv.as_mut_ptr()));
    let cx = Bwd { s, bl, dout, q, k, v, out, lse, dq, dk, dv };
    let nkb = s.tk.div_ceil(bl.bc);
    (0..s.b * s.hkv * nkb).into_par_iter().for_each_init(
        || Scratch::new(s, bl, true),
        |sc, t| {
            let (g, kb, b) = (t % s.hkv, t / s.hkv % nkb, t / (s.hkv * nkb));
            dispatch!(kern, dkv_task(sc, &cx, b, g, kb * bl.bc))
        },
    );
    let nqb = s.tq.div_ceil(bl.br);
    (0..s.b * nqb * s.h).into_par_iter().for_each_init(
        || Scratch::new(s, bl, true),
        |sc, t| {
            let (h, qb, b) = (t % s.h, nqb - 1 - t / s.h % nqb, t / (s.h * nqb));
            dispatch!(kern, dq_task(sc, &cx, b, h, qb * bl.br))
        },
    );
}

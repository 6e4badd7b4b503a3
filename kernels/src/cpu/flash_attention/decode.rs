//! Split-K forward for few query rows against a long cache ("flash-decoding").
//! AVX-512 and AVX2 instances of the task functions are monomorphised inside a
//! `#[target_feature]` function so the micro-kernels inline and the exp/max/sum loops
//! vectorise at that width. They are entered with the markers that prove the CPU features.
use rayon::prelude::*;

use super::*;
use crate::cpu::simd::{Lanes, TILE, fast_exp, sum_lanes};

/// Split-K partials of one (b, kv head g, key chunk c): for each of the group's query rows
/// v = hh Tq + i, the chunk's max pm, sum pl and unnormalised out po (D).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_task<L: Lanes>(
    l: L,
    sc: &mut Scratch,
    cx: &Fwd,
    b: usize,
    g: usize,
    c0: usize,
    n: usize,
    po: &mut [f32],
    pm: &mut [f32],
    pl: &mut [f32],
) {
    let s = cx.s;
    let (d, kvs, scale, group) = (s.d, s.hkv * s.d, s.scale(), s.h / s.hkv);
    let nv = group * s.tq;
    let (kb, vb) = (&cx.k[s.kv_at(b, c0, g)..], &cx.v[s.kv_at(b, c0, g)..]);
    let q_row = |vv: usize| {
        let (hh, i) = (vv / s.tq, vv % s.tq);
        &cx.q[s.q_at(b, i, g * group + hh)..][..d]
    };
    let (p, ot) = (&mut sc.s[..TILE * n], &mut sc.kt[..TILE * d]);
    for v0 in (0..nv).step_by(TILE) {
        let nr = TILE.min(nv - v0);
        if nr == 1 {
            // One row (MHA decode): the 4-row micro-kernel would compute 4x the scores.
            let qv = q_row(v0);
            for (jj, x) in p[..n].iter_mut().enumerate() {
                *x = l.dot(qv, &kb[jj * kvs..][..d]);
            }
        } else {
            let qa = std::array::from_fn(|r| q_row(v0 + r.min(nr - 1)));
            l.gemm_nt_4(p, qa, kb, kvs, n, d);
        }
        for (r, row) in p.chunks_exact_mut(n).enumerate() {
            let vv = v0 + r;
            let vis = if r < nr { cols(&s, vv % s.tq, c0, n) } else { None };
            let Some((a, z)) = vis else {
                row.fill(0.0);
                if r < nr {
                    (pm[vv], pl[vv]) = (f32::NEG_INFINITY, 0.0);
                }
                continue;
            };
            let m = scale * max_lanes(&row[a..=z]);
            row[a..=z].iter_mut().for_each(|x| *x = fast_exp(*x * scale - m));
            (pm[vv], pl[vv]) = (m, sum_lanes(&row[a..=z]));
            row[..a].fill(0.0);
            row[z + 1..].fill(0.0);
        }
        ot.fill(0.0);
        if nr == 1 {
            for (jj, &pj) in p[..n].iter().enumerate() {
                l.axpy(&mut ot[..d], pj, &vb[jj * kvs..][..d]);
            }
        } else {
            l.gemm_nn_4(ot, p, vb, kvs, n, d);
        }
        po[v0 * d..(v0 + nr) * d].copy_from_slice(&ot[..nr * d]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_256 {
    use super::*;
    use crate::cpu::simd::Avx2Fma;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decode_task(
        l: Avx2Fma,
        sc: &mut Scratch,
        cx: &Fwd,
        b: usize,
        g: usize,
        c0: usize,
        n: usize,
        po: &mut [f32],
        pm: &mut [f32],
        pl: &mut [f32],
    ) {
        super::decode_task(l, sc, cx, b, g, c0, n, po, pm, pl)
    }
}

/// The split-K forward (meant for few query rows against a long cache) with a given ISA.
#[allow(clippy::too_many_arguments)]
pub fn flash_decode_with(
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
    // The AVX2 loops serve AVX-512 too (no 512-bit decode instance).
    let kern = kernels(isa);
    let (d, group) = (s.d, s.h / s.hkv);
    let nv = group * s.tq;
    let (lo, hi) = (s.key_range(0).0, s.key_range(s.tq - 1).1);
    let nch = (hi + 1 - lo).div_ceil(DECODE_CHUNK);
    // Partials (B, Hkv, chunks, group Tq) [x D]: each task owns one contiguous (b, g, c) slab.
    let n_part = s.b * s.hkv * nch * nv;
    let (mut po, mut pm, mut pl) =
        (vec![0.0f32; n_part * d], vec![0.0f32; n_part], vec![0.0f32; n_part]);
    let cx = Fwd { s, bl, q, k, v, out: SyncPtr(out.as_mut_ptr()), lse: SyncPtr(lse.as_mut_ptr()) };
    let slabs = po.par_chunks_mut(nv * d).zip(pm.par_chunks_mut(nv)).zip(pl.par_chunks_mut(nv));
    slabs.enumerate().for_each_init(
        // Only s (TILE, chunk) and kt (TILE, D) are used; sized like the tiles they replace.
        || Scratch {
            s: vec![0.0; TILE * DECODE_CHUNK],
            dp: Vec::new(),
            kt: vec![0.0; TILE * d],
            vt: Vec::new(),
            m: Vec::new(),
            l: Vec::new(),
            tm: Vec::new(),
            al: Vec::new(),
        },
        |sc, (t, ((po, pm), pl))| {
            let (c, g, b) = (t % nch, t / nch % s.hkv, t / (nch * s.hkv));
            let c0 = lo + c * DECODE_CHUNK;
            let n = DECODE_CHUNK.min(hi + 1 - c0);
            match kern {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: an `Avx2Fma` exists only on CPUs with AVX2 + FMA.
                Kernels::Avx512(_, l) | Kernels::Avx2(l) => unsafe {
                    x86_256::decode_task(l, sc, &cx, b, g, c0, n, po, pm, pl)
                },
                Kernels::Portable => decode_task(Portable, sc, &cx, b, g, c0, n, po, pm, pl),
            }
        },
    );
    // out_i = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c with M = max_c m_c; chunks in order,
    // so the result is deterministic.
    let (po, pm, pl) = (&po, &pm, &pl);
    let rows = out.par_chunks_mut(s.h * d).zip(lse.par_chunks_mut(s.h));
    rows.enumerate().for_each(|(bi, (o, l))| {
        let (b, i) = (bi / s.tq, bi % s.tq);
        for h in 0..s.h {
            let (g, hh) = (h / group, h % group);
            let at = |c: usize| ((b * s.hkv + g) * nch + c) * nv + hh * s.tq + i;
            let mx = (0..nch).map(|c| pm[at(c)]).fold(f32::NEG_INFINITY, f32::max);
            let oh = &mut o[h * d..(h + 1) * d];
            oh.fill(0.0);
            let mut sum = 0.0f32;
            for c in (0..nch).filter(|&c| pl[at(c)] > 0.0) {
                let w = fast_exp(pm[at(c)] - mx);
                sum += w * pl[at(c)];
                let pc = &po[at(c) * d..(at(c) + 1) * d];
                oh.iter_mut().zip(pc).for_each(|(o, &x)| *o += w * x);
            }
            let inv = 1.0 / sum;
            oh.iter_mut().for_each(|x| *x *= inv);
            l[h] = mx + sum.ln();
        }
    });
}

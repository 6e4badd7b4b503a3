//! Tiled flash attention (after FlashAttention-2) with the semantics of `attention.rs`: causal
//! sliding-window GQA in nanochat's layout, q (B, Tq, H, D), k, v (B, Tk, Hkv, D), query row i at
//! absolute position pos0 + i, scale 1/sqrt(D). `attention.rs` stays as the reference.
//!
//! Work is cut into Br x Bc tiles (`FlashBlocks`); no buffer ever spans all keys, so the extra
//! memory is O(threads (Br Bc + D max(Br, Bc))) whatever T is. Tile products run on the
//! `simd::BlockGemm` broadcast-FMA micro-kernels, whose B operand must be contiguous along the
//! output columns, so one operand of each score product is packed transposed: the query block
//! once per forward / dQ task (scores come out transposed, St = K Qt), the key and value blocks
//! once per dK/dV task.
//! - Forward: one task per (b, h, block of Br query rows). It walks the Bc-key blocks its rows
//!   see, keeping a running max m and sum l per row (online softmax) and accumulating out in
//!   place, rescaled by e^(m_old - m_new) when the max grows. Saves lse (B, Tq, H) for backward.
//! - Backward recomputes P = e^(S - lse) tile by tile, in two passes that each own what they
//!   write (no float atomics, deterministic):
//!   1. one task per (b, kv head g, key block): dk, dv of those keys, summed over every query
//!      head of g's group and every query block that sees the keys;
//!   2. one task per (b, h, query block): dq.
//!
//!   delta_i = dout_i . out_i is recomputed per tile (D FLOPs a row) instead of stored (B, T, H).
//! - Decode (Tq <= `DECODE_MAX_TQ`): too few query rows for a (b, h, query block) grid, so the
//!   keys are split into chunks instead (split-K, "flash-decoding"): one task per (b, kv head,
//!   chunk) covers all query rows of the group, then the chunks' (max, sum, out) are combined.
//!
//! Tiles are only visited inside each row block's key span [lo(first row), hi(last row)]; the
//! union of consecutive rows' windows is contiguous, so every visited tile has a visible key.
//! Forward writes `out =`, `lse =`; backward accumulates `dq +=`, `dk +=`, `dv +=`.
use rayon::prelude::*;

use super::attention::AttnShape;
use super::matmul::Isa;
use super::simd::{BlockGemm, Lanes, Portable, TILE, fast_exp, fast_exp_by, sum_lanes};

/// Query rows (Br) and key rows (Bc) of one tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashBlocks {
    pub br: usize,
    pub bc: usize,
}

impl FlashBlocks {
    /// Forward blocks for head dim `d`: 64 x 64 up to D 64; above, 64 x 32. A tile's working set
    /// is the score tile (Br Bc floats) plus the packed Qt block (D Br), so at D 128 halving Bc
    /// keeps it at 40 KiB (in L1) for a 3% slowdown, where halving Br (the packed block) costs
    /// 17% (docs/perf/attention.md, "Choosing the blocks").
    pub fn forward(d: usize) -> FlashBlocks {
        if d <= 64 { FlashBlocks { br: 64, bc: 64 } } else { FlashBlocks { br: 64, bc: 32 } }
    }

    /// Backward blocks for head dim `d`: 64 x 32 up to D 64; above, 32 x 32. Backward holds two
    /// score tiles (P, dP) and two packed blocks (Kt and Vt, or Qt and dOut^T: D max(Br, Bc)
    /// each), twice the forward's, so it takes smaller tiles for the same working set.
    pub fn backward(d: usize) -> FlashBlocks {
        if d <= 64 { FlashBlocks { br: 64, bc: 32 } } else { FlashBlocks { br: 32, bc: 32 } }
    }
}

/// At or below this many query rows the forward splits keys instead of queries.
pub const DECODE_MAX_TQ: usize = 4;
/// Keys per split-K chunk. Fixed (not derived from the thread count) so results do not depend
/// on the machine; a chunk's 256 keys (2 D FMAs each per row) dwarf its D + 2 partial floats.
const DECODE_CHUNK: usize = 256;

/// A buffer that tasks write in disjoint rows. Rows of one head interleave with other heads'
/// rows (B, T, H, D), so no task may hold a `&mut` slice spanning them.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: tasks only touch rows they own (see each task function).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// Per-thread tiles: s (Br, Bc) scores / probabilities, dp (Br, Bc), kt, vt (D, max(Br, Bc))
/// transposed query, key, value or dout blocks, m, l (Br) running max and sum (backward: lse and
/// delta), tm, al (Br) a tile's row maxima and rescale factors.
struct Scratch {
    s: Vec<f32>,
    dp: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    tm: Vec<f32>,
    al: Vec<f32>,
}

impl Scratch {
    fn new(s: AttnShape, bl: FlashBlocks, backward: bool) -> Scratch {
        // Forward packs Qt (D, Br); backward Qt, dout^T (D, Br) or Kt, Vt (D, Bc).
        let sb = bl.br * bl.bc;
        let tb = if backward { s.d * bl.br.max(bl.bc) } else { s.d * bl.br };
        let (dp, vt) = if backward { (sb, tb) } else { (0, 0) };
        Scratch {
            s: vec![0.0; sb],
            dp: vec![0.0; dp],
            kt: vec![0.0; tb],
            vt: vec![0.0; vt],
            m: vec![0.0; bl.br],
            l: vec![0.0; bl.br],
            tm: vec![0.0; if backward { 0 } else { bl.br }],
            al: vec![0.0; if backward { 0 } else { bl.br }],
        }
    }
}

/// Inputs of the forward; out (B, Tq, H, D) and lse (B, Tq, H) are written by row owners.
struct Fwd<'a> {
    s: AttnShape,
    bl: FlashBlocks,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: SyncPtr,
    lse: SyncPtr,
}

/// Inputs of the backward; dq (B, Tq, H, D), dk, dv (B, Tk, Hkv, D) are written by row owners.
struct Bwd<'a> {
    s: AttnShape,
    bl: FlashBlocks,
    dout: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    dq: SyncPtr,
    dk: SyncPtr,
    dv: SyncPtr,
}

/// dst (D, n) = the n rows src[at + jj stride..][..D] transposed: the B operand of a score
/// product, contiguous along its output columns as `BlockGemm` needs (no horizontal sums).
#[inline(always)]
fn pack_t(dst: &mut [f32], src: &[f32], at: usize, stride: usize, n: usize, d: usize) {
    for jj in 0..n {
        for (c, &x) in src[at + jj * stride..][..d].iter().enumerate() {
            dst[c * n + jj] = x;
        }
    }
}

/// Visible columns a..=z of query row i in the key tile j0..j0+n, or `None`.
#[inline(always)]
fn cols(s: &AttnShape, i: usize, j0: usize, n: usize) -> Option<(usize, usize)> {
    let (lo, hi) = s.key_range(i);
    let (a, z) = (lo.max(j0), hi.min(j0 + n - 1));
    (a <= z).then(|| (a - j0, z - j0))
}

/// Max in 16 lanes so it vectorises (`f32::max` folds stay scalar: NaN semantics).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let pick = |m: f32, v: f32| if v > m { v } else { m };
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| pick(m, v));
    for c in chunks {
        for k in 0..16 {
            acc[k] = pick(acc[k], c[k]);
        }
    }
    acc.iter().fold(tail, |m, &v| pick(m, v))
}

/// The `d` floats at `p`.
///
/// # Safety
/// They are in bounds and no other reference to them is live.
#[inline(always)]
unsafe fn row_mut<'a>(p: *mut f32, d: usize) -> &'a mut [f32] {
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts_mut(p, d) }
}

/// Visible query columns a..=z of key j in the query tile i0..i0+n, or `None`.
#[inline(always)]
fn qcols(s: &AttnShape, j: usize, i0: usize, n: usize) -> Option<(usize, usize)> {
    let (lo, hi) = s.query_range(j)?;
    let (a, z) = (lo.max(i0), hi.min(i0 + n - 1));
    (a <= z).then(|| (a - i0, z - i0))
}

/// Whether every query row i0..i0+nr sees every key j0..j0+nc (the tile needs no mask): the
/// first row's position bounds the keys above, the last row's window start below.
#[inline(always)]
fn full_tile(s: &AttnShape, i0: usize, nr: usize, j0: usize, nc: usize) -> bool {
    j0 + nc - 1 <= s.key_range(i0).1 && j0 >= s.key_range(i0 + nr - 1).0
}

/// Forward of query rows i0..i0+Br of (batch b, head h): out rows (Br, D) of that head, lse.
///
/// Scores are computed transposed, St (nc, nr) = K (nc, D) · Qt (D, nr), so the query block is
/// packed once per task instead of a key block per tile, and the softmax statistics of all nr
/// rows update together along contiguous St rows.
#[inline(always)]
fn forward_task<G: BlockGemm>(sc: &mut Scratch, cx: &Fwd, b: usize, h: usize, i0: usize) {
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

/// lse and delta = dout . out of query rows i0..i0+nr of (b, h), into `lse_r`, `delta_r`.
#[inline(always)]
fn row_stats<L: Lanes>(
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
        *dl = L::dot(&cx.dout[at..at + s.d], &cx.out[at..at + s.d]);
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
fn dkv_task<G: BlockGemm, L: Lanes>(sc: &mut Scratch, cx: &Bwd, b: usize, g: usize, j0: usize) {
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
            row_stats::<L>(cx, b, h, i0, &mut sc.m[..nr], &mut sc.l[..nr]);
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
fn dq_task<G: BlockGemm, L: Lanes>(sc: &mut Scratch, cx: &Bwd, b: usize, h: usize, i0: usize) {
    let (s, bc) = (cx.s, cx.bl.bc);
    let (d, qs, kvs, scale) = (s.d, s.h * s.d, s.hkv * s.d, s.scale());
    let nr = cx.bl.br.min(s.tq - i0);
    let g = h / (s.h / s.hkv);
    let q0 = s.q_at(b, i0, h);
    row_stats::<L>(cx, b, h, i0, &mut sc.m[..nr], &mut sc.l[..nr]);
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

/// Split-K partials of one (b, kv head g, key chunk c): for each of the group's query rows
/// v = hh Tq + i, the chunk's max pm, sum pl and unnormalised out po (D).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_task<L: Lanes>(
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
                *x = L::dot(qv, &kb[jj * kvs..][..d]);
            }
        } else {
            let qa = std::array::from_fn(|r| q_row(v0 + r.min(nr - 1)));
            L::gemm_nt_4(p, qa, kb, kvs, n, d);
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
                L::axpy(&mut ot[..d], pj, &vb[jj * kvs..][..d]);
            }
        } else {
            L::gemm_nn_4(ot, p, vb, kvs, n, d);
        }
        po[v0 * d..(v0 + nr) * d].copy_from_slice(&ot[..nr * d]);
    }
}

/// AVX-512 and AVX2 instances of the task functions: monomorphised inside a
/// `#[target_feature]` function so the micro-kernels inline and the exp/max/sum loops vectorise
/// at that width. Callers check `Isa::supported` first.
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use super::*;
    use crate::cpu::simd::{Avx2Fma, Avx512};

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn forward_task(sc: &mut Scratch, cx: &Fwd, b: usize, h: usize, i0: usize) {
        super::forward_task::<Avx512>(sc, cx, b, h, i0)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn dkv_task(sc: &mut Scratch, cx: &Bwd, b: usize, g: usize, j0: usize) {
        super::dkv_task::<Avx512, Avx2Fma>(sc, cx, b, g, j0)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn dq_task(sc: &mut Scratch, cx: &Bwd, b: usize, h: usize, i0: usize) {
        super::dq_task::<Avx512, Avx2Fma>(sc, cx, b, h, i0)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_256 {
    use super::*;
    use crate::cpu::simd::Avx2Fma;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn forward_task(sc: &mut Scratch, cx: &Fwd, b: usize, h: usize, i0: usize) {
        super::forward_task::<Avx2Fma>(sc, cx, b, h, i0)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dkv_task(sc: &mut Scratch, cx: &Bwd, b: usize, g: usize, j0: usize) {
        super::dkv_task::<Avx2Fma, Avx2Fma>(sc, cx, b, g, j0)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dq_task(sc: &mut Scratch, cx: &Bwd, b: usize, h: usize, i0: usize) {
        super::dq_task::<Avx2Fma, Avx2Fma>(sc, cx, b, h, i0)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decode_task(
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
        super::decode_task::<Avx2Fma>(sc, cx, b, g, c0, n, po, pm, pl)
    }
}

/// Runs the instance of a task function for `$isa` (a supported one), else the portable one.
macro_rules! dispatch {
    ($isa:expr, $f:ident::<$($p:ty),*>($($arg:expr),*)) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::supported` confirmed AVX-512F (and with it AVX2 + FMA).
            Isa::Avx512 => unsafe { x86_512::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::supported` confirmed AVX2 + FMA.
            Isa::Avx2 => unsafe { x86_256::$f($($arg),*) },
            _ => $f::<$($p),*>($($arg),*),
        }
    };
}

/// The instruction set flash attention uses here: AVX-512 needs AVX2 + FMA too (the decode and
/// row-statistics loops use the AVX2 `Lanes`); NEON falls back to portable loops.
fn checked(isa: Isa) -> Isa {
    match isa {
        Isa::Avx512 if isa.supported() && Isa::Avx2.supported() => Isa::Avx512,
        Isa::Avx512 | Isa::Avx2 if Isa::Avx2.supported() => Isa::Avx2,
        _ => Isa::Portable,
    }
}

/// out (B, Tq, H, D), lse (B, Tq, H) = attention(q (B, Tq, H, D), k, v (B, Tk, Hkv, D)), tiled;
/// split-K over the keys when Tq <= `DECODE_MAX_TQ`.
pub fn flash_attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    bl: FlashBlocks,
) {
    if s.tq <= DECODE_MAX_TQ {
        flash_decode_with(Isa::detect(), out, lse, q, k, v, s, bl)
    } else {
        flash_forward_with(Isa::detect(), out, lse, q, k, v, s, bl)
    }
}

fn check_sizes(s: AttnShape, bl: FlashBlocks, q: usize, kv: usize, out: usize, lse: usize) {
    s.check();
    debug_assert!(bl.br > 0 && bl.bc > 0);
    debug_assert_eq!(q, s.b * s.tq * s.h * s.d);
    debug_assert_eq!(out, q);
    debug_assert_eq!(lse, s.b * s.tq * s.h);
    debug_assert_eq!(kv, s.b * s.tk * s.hkv * s.d);
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
    check_sizes(s, bl, q.len(), k.len(), out.len(), lse.len());
    if s.h * s.d == 0 || s.tq == 0 {
        return;
    }
    let isa = checked(isa);
    let cx = Fwd { s, bl, q, k, v, out: SyncPtr(out.as_mut_ptr()), lse: SyncPtr(lse.as_mut_ptr()) };
    let nqb = s.tq.div_ceil(bl.br);
    // Heads vary fastest (a GQA group shares its K/V blocks in cache); the last query blocks,
    // which see the most keys, are handed out first so no long task starts last.
    (0..s.b * nqb * s.h).into_par_iter().for_each_init(
        || Scratch::new(s, bl, false),
        |sc, t| {
            let (h, qb, b) = (t % s.h, nqb - 1 - t / s.h % nqb, t / (s.h * nqb));
            dispatch!(isa, forward_task::<Portable>(sc, &cx, b, h, qb * bl.br))
        },
    );
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
    check_sizes(s, bl, q.len(), k.len(), out.len(), lse.len());
    if s.h * s.d == 0 || s.tq == 0 {
        return;
    }
    let avx = checked(isa) != Isa::Portable;
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
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: `checked` found AVX2 + FMA.
                return unsafe { x86_256::decode_task(sc, &cx, b, g, c0, n, po, pm, pl) };
            }
            let _ = avx;
            decode_task::<Portable>(sc, &cx, b, g, c0, n, po, pm, pl)
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
    check_sizes(s, bl, q.len(), k.len(), out.len(), lse.len());
    debug_assert!(dq.len() == q.len() && dout.len() == q.len());
    debug_assert!(dk.len() == k.len() && dv.len() == v.len() && v.len() == k.len());
    if s.h * s.d == 0 || s.tq == 0 {
        return;
    }
    let isa = checked(isa);
    let (dq, dk, dv) =
        (SyncPtr(dq.as_mut_ptr()), SyncPtr(dk.as_mut_ptr()), SyncPtr(dv.as_mut_ptr()));
    let cx = Bwd { s, bl, dout, q, k, v, out, lse, dq, dk, dv };
    let nkb = s.tk.div_ceil(bl.bc);
    (0..s.b * s.hkv * nkb).into_par_iter().for_each_init(
        || Scratch::new(s, bl, true),
        |sc, t| {
            let (g, kb, b) = (t % s.hkv, t / s.hkv % nkb, t / (s.hkv * nkb));
            dispatch!(isa, dkv_task::<Portable, Portable>(sc, &cx, b, g, kb * bl.bc))
        },
    );
    let nqb = s.tq.div_ceil(bl.br);
    (0..s.b * nqb * s.h).into_par_iter().for_each_init(
        || Scratch::new(s, bl, true),
        |sc, t| {
            let (h, qb, b) = (t % s.h, nqb - 1 - t / s.h % nqb, t / (s.h * nqb));
            dispatch!(isa, dq_task::<Portable, Portable>(sc, &cx, b, h, qb * bl.br))
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attention::tests::{finite_difference_mismatch, rand_vec};
    use crate::cpu::attention::{attention_backward, attention_forward, attention_forward_naive};
    use proptest::prelude::*;

    /// ||a - b|| / ||b||, in f64.
    fn rel_l2(a: &[f32], b: impl IntoIterator<Item = f64>) -> f64 {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&x, y) in a.iter().zip(b) {
            num += (x as f64 - y).powi(2);
            den += y * y;
        }
        (num / den.max(1e-300)).sqrt()
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        v.extend([Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| checked(i) == i));
        v
    }

    struct Case {
        s: AttnShape,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        dout: Vec<f32>,
    }

    fn case(s: AttnShape, seed: u64) -> Case {
        let (nq, nk) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d);
        // Scaled like trained activations so softmaxes are neither flat nor one-hot.
        let q = rand_vec(nq, seed).iter().map(|x| 2.0 * x).collect();
        let (k, v, dout) = (rand_vec(nk, seed ^ 1), rand_vec(nk, seed ^ 2), rand_vec(nq, seed ^ 3));
        Case { s, q, k, v, dout }
    }

    /// Flash forward (tiled and split-K) and backward against the reference kernels: out and
    /// lse within 1e-5, gradients within 1e-4 relative L2; the forward also against f64 when
    /// that is cheap.
    fn check(c: &Case, bl: FlashBlocks) {
        let s = c.s;
        let (nq, nk, nl) = (c.q.len(), c.k.len(), s.b * s.tq * s.h);
        let (mut want, mut want_lse) = (vec![0.0; nq], vec![0.0; nl]);
        attention_forward(&mut want, &mut want_lse, &c.q, &c.k, &c.v, s);
        let naive = (s.tq * s.tk * s.h * s.d < 1 << 20)
            .then(|| attention_forward_naive(&c.q, &c.k, &c.v, s));
        let grads = |isa: Isa, out: &[f32], lse: &[f32], flash: bool| {
            let (mut dq, mut dk, mut dv) = (vec![0.5; nq], vec![0.5; nk], vec![0.5; nk]);
            let (q, k, v, d) = (&c.q, &c.k, &c.v, &c.dout);
            if flash {
                flash_backward_with(isa, &mut dq, &mut dk, &mut dv, d, q, k, v, out, lse, s, bl);
            } else {
                attention_backward(&mut dq, &mut dk, &mut dv, d, q, k, v, out, lse, s);
            }
            [dq, dk, dv]
        };
        let want_g = grads(Isa::Portable, &want, &want_lse, false);
        for isa in isas() {
            for decode in [false, true] {
                let (mut out, mut lse) = (vec![f32::NAN; nq], vec![f32::NAN; nl]);
                if decode {
                    flash_decode_with(isa, &mut out, &mut lse, &c.q, &c.k, &c.v, s, bl);
                } else {
                    flash_forward_with(isa, &mut out, &mut lse, &c.q, &c.k, &c.v, s, bl);
                }
                let tag = format!("{isa:?} decode {decode} {bl:?} {s:?}");
                let e = rel_l2(&out, want.iter().map(|&x| x as f64));
                assert!(e < 1e-5, "out vs reference {e:e}: {tag}");
                let e = rel_l2(&lse, want_lse.iter().map(|&x| x as f64));
                assert!(e < 1e-5, "lse vs reference {e:e}: {tag}");
                if let Some(naive) = &naive {
                    let e = rel_l2(&out, naive.iter().copied());
                    assert!(e < 1e-5, "out vs f64 {e:e}: {tag}");
                }
                if decode {
                    continue;
                }
                let got = grads(isa, &out, &lse, true);
                for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want_g)) {
                    let e = rel_l2(g, w.iter().map(|&x| x as f64));
                    assert!(e < 1e-4, "{name} vs reference {e:e}: {tag}");
                }
            }
        }
    }

    fn shape(b: usize, t: usize, h: usize, hkv: usize, d: usize, window: usize) -> AttnShape {
        AttnShape { b, tq: t, tk: t, h, hkv, d, window, pos0: 0 }
    }

    const FULL: usize = usize::MAX;
    const DEFAULT: FlashBlocks = FlashBlocks { br: 64, bc: 64 };

    #[test]
    fn training_shapes_match_reference() {
        // (T, H, Hkv, D, window, blocks): ragged T against every block shape, GQA 1/2/3,
        // head dims through both register tiles' ragged edges, windows 0 / narrow / >= T.
        let cases = [
            (1, 2, 1, 8, FULL, DEFAULT),
            (7, 3, 1, 8, FULL, FlashBlocks { br: 16, bc: 16 }),
            (65, 2, 2, 64, FULL, DEFAULT),
            (65, 4, 2, 72, 9, FlashBlocks { br: 17, bc: 9 }),
            (130, 3, 1, 64, 0, FlashBlocks { br: 32, bc: 64 }),
            (130, 6, 2, 128, 40, FlashBlocks { br: 16, bc: 16 }),
            (130, 2, 2, 256, 200, DEFAULT),
            (33, 3, 3, 37, 31, FlashBlocks { br: 17, bc: 9 }),
        ];
        for (n, &(t, h, hkv, d, w, bl)) in cases.iter().enumerate() {
            check(&case(shape(2, t, h, hkv, d, w), n as u64), bl);
        }
    }

    #[test]
    fn cache_prefill_and_decode_match_reference() {
        // pos0 > 0 with extra unused keys past the last query; decode rows against several
        // split-K chunks, with and without a window.
        let cases = [
            (1, 700, 4, 2, 64, FULL),
            (1, 600, 3, 1, 72, 300),
            (3, 300, 2, 2, 128, FULL),
            (4, 530, 6, 2, 16, 5),
            (70, 90, 4, 4, 64, FULL),
            (70, 90, 6, 3, 32, 33),
        ];
        for (n, &(tq, pos0, h, hkv, d, window)) in cases.iter().enumerate() {
            let s = AttnShape { b: 2, tq, tk: pos0 + tq + 3, h, hkv, d, window, pos0 };
            check(&case(s, 100 + n as u64), FlashBlocks { br: 32, bc: 64 });
        }
    }

    #[test]
    fn deterministic() {
        let c = case(shape(1, 200, 4, 2, 64, FULL), 7);
        let s = c.s;
        let run = || {
            let (mut out, mut lse) = (vec![0.0; c.q.len()], vec![0.0; s.tq * s.h]);
            flash_attention_forward(&mut out, &mut lse, &c.q, &c.k, &c.v, s, DEFAULT);
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; c.q.len()], vec![0.0; c.k.len()], vec![0.0; c.k.len()]);
            let (q, k, v) = (&c.q, &c.k, &c.v);
            flash_attention_backward(
                &mut dq, &mut dk, &mut dv, &c.dout, q, k, v, &out, &lse, s, DEFAULT,
            );
            [out, lse, dq, dk, dv].map(|x| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
        };
        assert_eq!(run(), run());
    }

    fn shapes() -> impl Strategy<Value = (AttnShape, FlashBlocks)> {
        let dims = (1usize..3, 1usize..40, 1usize..4, 1usize..4, 1usize..20, 0usize..14, 0usize..9);
        (dims, 1usize..20, 1usize..20).prop_map(|((b, tq, hkv, group, d, window, pos0), br, bc)| {
            let window = if window == 13 { usize::MAX } else { window };
            let s =
                AttnShape { b, tq, tk: pos0 + tq + pos0 % 2, h: hkv * group, hkv, d, window, pos0 };
            (s, FlashBlocks { br, bc })
        })
    }

    proptest! {
        #[test]
        fn random_shapes_match_reference((s, bl) in shapes(), seed: u64) {
            check(&case(s, seed), bl);
        }

        #[test]
        fn backward_matches_finite_differences((s, bl) in shapes(), seed: u64) {
            // L = sum(out * w): dq, dk, dv at a few coordinates against f64 central differences
            // of the f64 reference forward (eps 1e-2, tolerance as in engine/src/gradcheck.rs).
            let c = case(s, seed);
            let (nq, nk) = (c.q.len(), c.k.len());
            let (mut out, mut lse) = (vec![0.0; nq], vec![0.0; s.b * s.tq * s.h]);
            flash_attention_forward(&mut out, &mut lse, &c.q, &c.k, &c.v, s, bl);
            let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            let (q, k, v, w) = (&c.q, &c.k, &c.v, &c.dout);
            flash_attention_backward(&mut dq, &mut dk, &mut dv, w, q, k, v, &out, &lse, s, bl);
            let bad = finite_difference_mismatch(s, [q, k, v], w, [&dq, &dk, &dv], 2e-2);
            prop_assert!(bad.is_none(), "{} ({s:?} {bl:?})", bad.unwrap_or_default());
        }
    }
}

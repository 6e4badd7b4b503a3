//! Causal sliding-window attention with GQA, in nanochat's layout: q (B, Tq, H, D),
//! k, v (B, Tk, Hkv, D). Query head h reads kv head h / (H / Hkv). Query row i sits at absolute
//! position p = pos0 + i and attends keys j with j <= p and p - j <= window, scaled by 1/sqrt(D);
//! so one kernel serves training (pos0 = 0, Tk = Tq), cache prefill, and one-token decode.
//!
//! Work is cut into tiles of TILE consecutive rows of one batch element, so a register-tiled
//! micro-kernel (`simd::Lanes::gemm_*_4`) reuses every loaded key/value row TILE times.
//! Forward: parallel over query tiles, each owning out (TILE, H, D) and lse (TILE, H); scores
//! of one (tile, head) live in a per-thread scratch. It saves the logsumexp per (b, i, h), so
//! backward recomputes probabilities instead of storing (T, T) matrices.
//! Backward, without float atomics, in two passes that each own what they write:
//!   1. over query tiles: delta_i = dout_i . out_i and dq_i;
//!   2. over key tiles: dk_j and dv_j for every query that sees key j.
//!
//! Scores are recomputed in both passes (more FLOPs, no contention, deterministic).
//! Forward writes `out =`, `lse =`; backward accumulates `dq +=`, `dk +=`, `dv +=`.
use rayon::prelude::*;

use super::simd::{Lanes, Portable, TILE, fast_exp, has_avx2_fma, sum_lanes};

/// Validated sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    /// Query rows per batch element.
    pub tq: usize,
    /// Key rows per batch element; at least pos0 + tq (keys past the last query are unused).
    pub tk: usize,
    pub h: usize,
    /// Key/value heads; divides h.
    pub hkv: usize,
    pub d: usize,
    /// Max distance p - j of an attended key; `usize::MAX` (or >= Tk) is plain causal.
    pub window: usize,
    /// Absolute position of query row 0.
    pub pos0: usize,
}

impl AttnShape {
    pub(crate) fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// Attended keys of query row i: lo..=p.
    #[inline]
    pub(crate) fn key_range(&self, i: usize) -> (usize, usize) {
        let p = self.pos0 + i;
        (p.saturating_sub(self.window), p)
    }

    /// Query rows that attend key j: lo..=hi, or `None` when no query sees it.
    #[inline]
    pub(crate) fn query_range(&self, j: usize) -> Option<(usize, usize)> {
        let last = self.pos0 + self.tq.checked_sub(1)?;
        let hi = j.saturating_add(self.window).min(last);
        let lo = j.max(self.pos0);
        (lo <= hi && hi >= self.pos0).then(|| (lo - self.pos0, hi - self.pos0))
    }

    #[inline]
    pub(crate) fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.tq + i) * self.h + h) * self.d
    }

    #[inline]
    pub(crate) fn kv_at(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.tk + j) * self.hkv + g) * self.d
    }

    /// Panics unless the head counts and key rows are consistent (in release builds too: the
    /// kernels index buffers from them, some through raw pointers).
    pub(crate) fn check(&self) {
        assert!(
            self.hkv > 0 && self.h.is_multiple_of(self.hkv),
            "attention: {} query heads do not group over {} kv heads",
            self.h,
            self.hkv
        );
        assert!(
            self.pos0.checked_add(self.tq).is_some_and(|end| self.tk >= end),
            "attention: {} keys cannot hold queries at positions {}..{}+{}",
            self.tk,
            self.pos0,
            self.pos0,
            self.tq
        );
    }

    /// `check`, then panics unless the buffers have the lengths of this shape: q-sized ones
    /// in `qkv` order q, k, v, out (then dq, dk, dv, dout for the backward) and lse-sized ones
    /// in `rows`.
    pub(crate) fn check_buffers(&self, qkv: &[usize], rows: &[usize]) {
        self.check();
        let n = |a: [usize; 4]| a.iter().try_fold(1usize, |x, &y| x.checked_mul(y));
        let q = n([self.b, self.tq, self.h, self.d]);
        let kv = n([self.b, self.tk, self.hkv, self.d]);
        let l = n([self.b, self.tq, self.h, 1]);
        // q, k, v, out, dq, dk, dv, dout
        let want = [q, kv, kv, q, q, kv, kv, q];
        for (i, (&got, want)) in qkv.iter().zip(want).enumerate() {
            assert!(
                Some(got) == want,
                "attention {self:?}: buffer {i} has {got} floats, not {want:?}"
            );
        }
        for &got in rows {
            assert!(Some(got) == l, "attention {self:?}: lse has {got} floats, not {l:?}");
        }
    }
}

/// Per-thread buffers: two (TILE, keys) score tiles and two (TILE, D) output tiles.
struct Scratch {
    s: Vec<f32>,
    dp: Vec<f32>,
    o: Vec<f32>,
    o2: Vec<f32>,
    /// lse and delta of one head's query rows, gathered contiguous (backward pass 2).
    lse: Vec<f32>,
    delta: Vec<f32>,
}

impl Scratch {
    fn new(s: AttnShape) -> Scratch {
        let n = TILE * s.tk.max(s.tq);
        let o = TILE * s.d;
        let (s, dp, lse, delta) = (vec![0.0; n], vec![0.0; n], vec![0.0; s.tq], vec![0.0; s.tq]);
        Scratch { s, dp, o: vec![0.0; o], o2: vec![0.0; o], lse, delta }
    }
}

/// The TILE rows of `buf` (B, T, heads, D) at rows t0.., head h; rows past `nr` repeat the last
/// real row so the micro-kernels always see a full tile (their results are discarded).
#[inline(always)]
fn tile_rows(buf: &[f32], at: impl Fn(usize) -> usize, nr: usize, d: usize) -> [&[f32]; TILE] {
    std::array::from_fn(|r| &buf[at(r.min(nr - 1))..][..d])
}

/// Forward of query rows i0..i0+nr (nr <= TILE) of batch b, all heads: o_blk (nr, H, D),
/// l_blk (nr, H). Scores of the tile against the union of its key ranges come from one
/// register-tiled pass; keys outside a row's own range get probability 0.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_block<L: Lanes>(
    l: L,
    sc: &mut Scratch,
    b: usize,
    i0: usize,
    o_blk: &mut [f32],
    l_blk: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
) {
    let (d, group, scale, kvs) = (s.d, s.h / s.hkv, s.scale(), s.hkv * s.d);
    let nr = l_blk.len() / s.h;
    if nr == 1 {
        // One-token decode (or a ragged last tile): a full tile would compute TILE rows.
        return forward_row(l, &mut sc.s, b, i0, o_blk, l_blk, q, k, v, s);
    }
    let (lo, _) = s.key_range(i0);
    let (_, hi) = s.key_range(i0 + nr - 1);
    let n = hi + 1 - lo;
    let p = &mut sc.s[..TILE * n];
    for h in 0..s.h {
        let g = h / group;
        let qa = tile_rows(q, |r| s.q_at(b, i0 + r, h), nr, d);
        l.gemm_nt_4(p, qa, &k[s.kv_at(b, lo, g)..], kvs, n, d);
        let mut inv = [0.0f32; TILE];
        for (r, row) in p.chunks_exact_mut(n).enumerate() {
            if r >= nr {
                row.fill(0.0);
                continue;
            }
            let (lo_r, hi_r) = s.key_range(i0 + r);
            let (a, z) = (lo_r - lo, hi_r - lo);
            let valid = &mut row[a..=z];
            let m = scale * valid.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            valid.iter_mut().for_each(|x| *x = fast_exp(*x * scale - m));
            let sum = sum_lanes(valid);
            inv[r] = 1.0 / sum;
            l_blk[r * s.h + h] = m + sum.ln();
            row[..a].fill(0.0);
            row[z + 1..].fill(0.0);
        }
        let ot = &mut sc.o[..TILE * d];
        ot.fill(0.0);
        l.gemm_nn_4(ot, p, &v[s.kv_at(b, lo, g)..], kvs, n, d);
        for r in 0..nr {
            let dst = &mut o_blk[(r * s.h + h) * d..][..d];
            dst.iter_mut().zip(&ot[r * d..(r + 1) * d]).for_each(|(o, &x)| *o = x * inv[r]);
        }
    }
}

/// Forward of the single query row i of batch b, one dot / axpy per key.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_row<L: Lanes>(
    l: L,
    scores: &mut [f32],
    b: usize,
    i: usize,
    o_row: &mut [f32],
    l_row: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
) {
    let (d, group, scale) = (s.d, s.h / s.hkv, s.scale());
    let (lo, hi) = s.key_range(i);
    let sc = &mut scores[..hi + 1 - lo];
    for h in 0..s.h {
        let g = h / group;
        let qi = &q[s.q_at(b, i, h)..][..d];
        for (jj, sj) in sc.iter_mut().enumerate() {
            *sj = scale * l.dot(qi, &k[s.kv_at(b, lo + jj, g)..][..d]);
        }
        let m = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        sc.iter_mut().for_each(|x| *x = fast_exp(*x - m));
        let sum = sum_lanes(sc);
        let o = &mut o_row[h * d..(h + 1) * d];
        o.fill(0.0);
        for (jj, &p) in sc.iter().enumerate() {
            l.axpy(o, p, &v[s.kv_at(b, lo + jj, g)..][..d]);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
        l_row[h] = m + sum.ln();
    }
}

/// Backward pass 1 for query rows i0..i0+nr of batch b: delta (nr, H) and dq (nr, H, D) +=.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_q_block<L: Lanes>(
    l: L,
    sc: &mut Scratch,
    b: usize,
    i0: usize,
    dq_blk: &mut [f32],
    delta_blk: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttnShape,
) {
    let (d, group, scale, kvs) = (s.d, s.h / s.hkv, s.scale(), s.hkv * s.d);
    let nr = delta_blk.len() / s.h;
    let (lo, _) = s.key_range(i0);
    let (_, hi) = s.key_range(i0 + nr - 1);
    let n = hi + 1 - lo;
    let (p, dp) = (&mut sc.s[..TILE * n], &mut sc.dp[..TILE * n]);
    for h in 0..s.h {
        let g = h / group;
        let (kb, vb) = (&k[s.kv_at(b, lo, g)..], &v[s.kv_at(b, lo, g)..]);
        let qa = tile_rows(q, |r| s.q_at(b, i0 + r, h), nr, d);
        let da = tile_rows(dout, |r| s.q_at(b, i0 + r, h), nr, d);
        l.gemm_nt_4(p, qa, kb, kvs, n, d);
        l.gemm_nt_4(dp, da, vb, kvs, n, d);
        for (r, (pr, dpr)) in p.chunks_exact_mut(n).zip(dp.chunks_exact(n)).enumerate() {
            if r >= nr {
                pr.fill(0.0);
                continue;
            }
            let i = i0 + r;
            let at = s.q_at(b, i, h);
            let di = l.dot(da[r], &out[at..at + d]);
            delta_blk[r * s.h + h] = di;
            let l = lse[(b * s.tq + i) * s.h + h];
            let (lo_r, hi_r) = s.key_range(i);
            let (a, z) = (lo_r - lo, hi_r - lo);
            // pr becomes scale * ds = scale * p (dp - delta).
            for (x, &y) in pr[a..=z].iter_mut().zip(&dpr[a..=z]) {
                *x = scale * fast_exp(*x * scale - l) * (y - di);
            }
            pr[..a].fill(0.0);
            pr[z + 1..].fill(0.0);
        }
        let t = &mut sc.o[..TILE * d];
        t.fill(0.0);
        l.gemm_nn_4(t, p, kb, kvs, n, d);
        for r in 0..nr {
            let dst = &mut dq_blk[(r * s.h + h) * d..][..d];
            dst.iter_mut().zip(&t[r * d..(r + 1) * d]).for_each(|(o, &x)| *o += x);
        }
    }
}

/// Backward pass 2 for keys j0..j0+nk of batch b: dk, dv (nk, Hkv, D) +=, from every query
/// head of each kv group over the union of the keys' query ranges.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_kv_block<L: Lanes>(
    l: L,
    sc: &mut Scratch,
    b: usize,
    j0: usize,
    dk_blk: &mut [f32],
    dv_blk: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    delta: &[f32],
    s: AttnShape,
) {
    let (d, group, scale, qs) = (s.d, s.h / s.hkv, s.scale(), s.h * s.d);
    let nk = dk_blk.len() / (s.hkv * d);
    let ranges: [Option<(usize, usize)>; TILE] =
        std::array::from_fn(|c| if c < nk { s.query_range(j0 + c) } else { None });
    let Some(qlo) = ranges.iter().flatten().map(|r| r.0).min() else {
        return;
    };
    let qhi = ranges.iter().flatten().map(|r| r.1).max().unwrap_or(qlo);
    let n = qhi + 1 - qlo;
    let (p, dp) = (&mut sc.s[..TILE * n], &mut sc.dp[..TILE * n]);
    let (lse_h, delta_h) = (&mut sc.lse[..n], &mut sc.delta[..n]);
    for g in 0..s.hkv {
        let ka = tile_rows(k, |c| s.kv_at(b, j0 + c, g), nk, d);
        let va = tile_rows(v, |c| s.kv_at(b, j0 + c, g), nk, d);
        let (dk_t, dv_t) = (&mut sc.o[..TILE * d], &mut sc.o2[..TILE * d]);
        dk_t.fill(0.0);
        dv_t.fill(0.0);
        for h in g * group..(g + 1) * group {
            let (qb, db) = (&q[s.q_at(b, qlo, h)..], &dout[s.q_at(b, qlo, h)..]);
            l.gemm_nt_4(p, ka, qb, qs, n, d); // S^T (TILE, n)
            l.gemm_nt_4(dp, va, db, qs, n, d); // dP^T (TILE, n)
            for (ii, (l, dl)) in lse_h.iter_mut().zip(delta_h.iter_mut()).enumerate() {
                let row = (b * s.tq + qlo + ii) * s.h + h;
                (*l, *dl) = (lse[row], delta[row]);
            }
            for (c, (pc, dpc)) in p.chunks_exact_mut(n).zip(dp.chunks_exact_mut(n)).enumerate() {
                let Some((lo_c, hi_c)) = ranges[c] else {
                    pc.fill(0.0);
                    dpc.fill(0.0);
                    continue;
                };
                let (a, z) = (lo_c - qlo, hi_c - qlo);
                let rows = pc[a..=z].iter_mut().zip(&mut dpc[a..=z]);
                for ((x, y), (&l, &dl)) in rows.zip(lse_h[a..=z].iter().zip(&delta_h[a..=z])) {
                    let pv = fast_exp(*x * scale - l);
                    *x = pv;
                    *y = scale * pv * (*y - dl);
                }
                pc[..a].fill(0.0);
                pc[z + 1..].fill(0.0);
                dpc[..a].fill(0.0);
                dpc[z + 1..].fill(0.0);
            }
            l.gemm_nn_4(dv_t, p, db, qs, n, d);
            l.gemm_nn_4(dk_t, dp, qb, qs, n, d);
        }
        for c in 0..nk {
            let at = (c * s.hkv + g) * d;
            let dst = &mut dk_blk[at..at + d];
            dst.iter_mut().zip(&dk_t[c * d..(c + 1) * d]).for_each(|(o, &x)| *o += x);
            let dst = &mut dv_blk[at..at + d];
            dst.iter_mut().zip(&dv_t[c * d..(c + 1) * d]).for_each(|(o, &x)| *o += x);
        }
    }
}

/// AVX2 + FMA instances of the block functions, entered with the marker that proves the CPU
/// has those features.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::cpu::simd::Avx2Fma;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_block(
        t: Avx2Fma,
        sc: &mut Scratch,
        b: usize,
        i0: usize,
        o_blk: &mut [f32],
        l_blk: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
    ) {
        super::forward_block(t, sc, b, i0, o_blk, l_blk, q, k, v, s)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_q_block(
        t: Avx2Fma,
        sc: &mut Scratch,
        b: usize,
        i0: usize,
        dq_blk: &mut [f32],
        delta_blk: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        s: AttnShape,
    ) {
        super::backward_q_block(t, sc, b, i0, dq_blk, delta_blk, dout, q, k, v, out, lse, s)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_kv_block(
        t: Avx2Fma,
        sc: &mut Scratch,
        b: usize,
        j0: usize,
        dk_blk: &mut [f32],
        dv_blk: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lse: &[f32],
        delta: &[f32],
        s: AttnShape,
    ) {
        super::backward_kv_block(t, sc, b, j0, dk_blk, dv_blk, dout, q, k, v, lse, delta, s)
    }
}

/// Runs the AVX2 instance of a block function when `$avx` asks for it and the CPU has it, else
/// the portable one.
macro_rules! dispatch {
    ($avx:expr, $f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = $avx.then(crate::cpu::simd::Avx2Fma::new).flatten() {
            // SAFETY: an `Avx2Fma` exists only on CPUs with AVX2 + FMA, the features of `avx2::$f`.
            unsafe { avx2::$f(t, $($arg),*) }
        } else {
            $f(Portable, $($arg),*)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $avx;
            $f(Portable, $($arg),*)
        }
    }};
}

/// out (B, Tq, H, D), lse (B, Tq, H) = attention(q (B, Tq, H, D), k, v (B, Tk, Hkv, D))
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
) {
    forward_with(has_avx2_fma(), out, lse, q, k, v, s)
}

fn forward_with(
    avx: bool,
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
) {
    s.check_buffers(&[q.len(), k.len(), v.len(), out.len()], &[lse.len()]);
    let hd = s.h * s.d;
    if hd == 0 || s.tq == 0 {
        return;
    }
    let per_b = out.par_chunks_mut(s.tq * hd).zip(lse.par_chunks_mut(s.tq * s.h));
    per_b.enumerate().for_each(|(b, (ob, lb))| {
        let tiles = ob.par_chunks_mut(TILE * hd).zip(lb.par_chunks_mut(TILE * s.h));
        tiles.enumerate().for_each_init(
            || Scratch::new(s),
            |sc, (t, (o_blk, l_blk))| {
                dispatch!(avx, forward_block(sc, b, t * TILE, o_blk, l_blk, q, k, v, s))
            },
        );
    });
}

// With p_ij = exp(s_ij - lse_i), s_ij = scale q_i . k_j, o_i = sum_j p_ij v_j:
//   dv_j = sum_i p_ij do_i;  dp_ij = do_i . v_j;  ds_ij = p_ij (dp_ij - delta_i),
//   delta_i = do_i . o_i;  dq_i = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i.
/// dq (B, Tq, H, D) +=, dk, dv (B, Tk, Hkv, D) += attention backward, from the saved out and lse.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
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
) {
    backward_with(has_avx2_fma(), dq, dk, dv, dout, q, k, v, out, lse, s)
}

#[allow(clippy::too_many_arguments)]
fn backward_with(
    avx: bool,
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
) {
    s.check_buffers(
        &[q.len(), k.len(), v.len(), out.len(), dq.len(), dk.len(), dv.len(), dout.len()],
        &[lse.len()],
    );
    let (hd, kvd) = (s.h * s.d, s.hkv * s.d);
    if hd == 0 || s.tq == 0 {
        return;
    }
    let mut delta = vec![0.0f32; s.b * s.tq * s.h]; // (B, Tq, H)
    let per_b = dq.par_chunks_mut(s.tq * hd).zip(delta.par_chunks_mut(s.tq * s.h));
    per_b.enumerate().for_each(|(b, (dqb, deltab))| {
        let tiles = dqb.par_chunks_mut(TILE * hd).zip(deltab.par_chunks_mut(TILE * s.h));
        tiles.enumerate().for_each_init(
            || Scratch::new(s),
            |sc, (t, (dq_blk, delta_blk))| {
                let i0 = t * TILE;
                dispatch!(
                    avx,
                    backward_q_block(sc, b, i0, dq_blk, delta_blk, dout, q, k, v, out, lse, s)
                )
            },
        );
    });
    let delta = &delta;
    let per_b = dk.par_chunks_mut(s.tk * kvd).zip(dv.par_chunks_mut(s.tk * kvd));
    per_b.enumerate().for_each(|(b, (dkb, dvb))| {
        let tiles = dkb.par_chunks_mut(TILE * kvd).zip(dvb.par_chunks_mut(TILE * kvd));
        tiles.enumerate().for_each_init(
            || Scratch::new(s),
            |sc, (t, (dk_blk, dv_blk))| {
                let j0 = t * TILE;
                dispatch!(
                    avx,
                    backward_kv_block(sc, b, j0, dk_blk, dv_blk, dout, q, k, v, lse, delta, s)
                )
            },
        );
    });
}

/// Reference forward in f64 with an explicit mask: out (B, Tq, H, D).
pub fn attention_forward_naive(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f64> {
    s.check_buffers(&[q.len(), k.len(), v.len()], &[]);
    let (d, group) = (s.d, s.h / s.hkv);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0f64; s.b * s.tq * s.h * d];
    for b in 0..s.b {
        for h in 0..s.h {
            let g = h / group;
            for i in 0..s.tq {
                let p = s.pos0 + i;
                let allowed = |j: usize| j <= p && p - j <= s.window;
                let scores: Vec<f64> = (0..s.tk)
                    .map(|j| {
                        if !allowed(j) {
                            return f64::NEG_INFINITY;
                        }
                        (0..d)
                            .map(|c| q[s.q_at(b, i, h) + c] as f64 * k[s.kv_at(b, j, g) + c] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for (j, &wj) in w.iter().enumerate() {
                    for c in 0..d {
                        out[s.q_at(b, i, h) + c] += wj / z * v[s.kv_at(b, j, g) + c] as f64;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic values in [-1, 1) (xorshift).
    pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn shapes() -> impl Strategy<Value = AttnShape> {
        (1usize..3, 1usize..12, 1usize..4, 1usize..4, 1usize..20, 0usize..14, 0usize..6).prop_map(
            |(b, tq, hkv, group, d, window, pos0)| AttnShape {
                b,
                tq,
                tk: pos0 + tq + (window % 2),
                h: hkv * group,
                hkv,
                d,
                window: if window == 13 { usize::MAX } else { window },
                pos0,
            },
        )
    }

    proptest! {
        #[test]
        fn forward_matches_reference(s in shapes(), seed: u64) {
            let (nq, nk) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d);
            let (q, k, v) = (rand_vec(nq, seed), rand_vec(nk, seed ^ 1), rand_vec(nk, seed ^ 2));
            let want = attention_forward_naive(&q, &k, &v, s);
            for avx in [false, has_avx2_fma()] {
                let mut out = vec![0.0; nq];
                let mut lse = vec![0.0; s.b * s.tq * s.h];
                forward_with(avx, &mut out, &mut lse, &q, &k, &v, s);
                for (a, b) in out.iter().zip(&want) {
                    prop_assert!((*a as f64 - b).abs() < 1e-5, "avx {avx}: {a} vs {b}");
                }
            }
        }

        #[test]
        fn backward_matches_finite_differences(s in shapes(), seed: u64, portable: bool) {
            // L = sum(out * w): check dq, dk, dv at a few coordinates against f64 central
            // differences of the reference forward.
            let (nq, nk) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d);
            let (q, k, v) = (rand_vec(nq, seed), rand_vec(nk, seed ^ 1), rand_vec(nk, seed ^ 2));
            let w = rand_vec(nq, seed ^ 3);
            let mut out = vec![0.0; nq];
            let mut lse = vec![0.0; s.b * s.tq * s.h];
            attention_forward(&mut out, &mut lse, &q, &k, &v, s);
            let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            let avx = !portable && has_avx2_fma();
            backward_with(avx, &mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &out, &lse, s);
            let bad = finite_difference_mismatch(s, [&q, &k, &v], &w, [&dq, &dk, &dv], 1e-2);
            prop_assert!(bad.is_none(), "{} ({s:?})", bad.unwrap_or_default());
        }
    }

    /// With L = sum(out * w), compare `grads` (dq, dk, dv) at a few coordinates with f64 central
    /// differences of the naive forward (eps 1e-2); the first mismatch, described.
    pub(crate) fn finite_difference_mismatch(
        s: AttnShape,
        qkv: [&[f32]; 3],
        w: &[f32],
        grads: [&[f32]; 3],
        rel_tol: f64,
    ) -> Option<String> {
        let loss = |b: &[Vec<f32>; 3]| -> f64 {
            let o = attention_forward_naive(&b[0], &b[1], &b[2], s);
            o.iter().zip(w).map(|(o, &w)| o * w as f64).sum()
        };
        let eps = 1e-2f32;
        for (which, grad) in grads.iter().enumerate() {
            let n = grad.len();
            for idx in [0, n / 3, n / 2, n - 1] {
                let mut bufs = qkv.map(<[f32]>::to_vec);
                bufs[which][idx] += eps;
                let up = loss(&bufs);
                bufs[which][idx] -= 2.0 * eps;
                let down = loss(&bufs);
                let num = (up - down) / (2.0 * eps as f64);
                let got = grad[idx] as f64;
                if (got - num).abs() >= 2e-3 + rel_tol * num.abs() {
                    return Some(format!("input {which} idx {idx}: {got} vs {num}"));
                }
            }
        }
        None
    }
}

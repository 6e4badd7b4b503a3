//! Causal sliding-window attention with GQA, in nanochat's layout: q (B, Tq, H, D),
//! k, v (B, Tk, Hkv, D). Query head h reads kv head h / (H / Hkv). Query row i sits at absolute
//! position p = pos0 + i and attends keys j with j <= p and p - j <= window, scaled by 1/sqrt(D);
//! so one kernel serves training (pos0 = 0, Tk = Tq), cache prefill, and one-token decode.
//!
//! Forward: parallel over (b, i) query rows, each owning out[b, i] (H*D) and lse[b, i] (H); the
//! scores of one (row, head) live in a per-thread scratch. It saves the logsumexp per (b, i, h),
//! so backward recomputes probabilities instead of storing (T, T) matrices.
//! Backward, without float atomics, in two passes that each own what they write:
//!   1. over (b, i) query rows: delta_i = dout_i . out_i and dq_i;
//!   2. over (b, j) key rows: dk_j and dv_j for every query that sees key j.
//!
//! Scores are recomputed in both passes (more FLOPs, no contention, deterministic).
//! Forward writes `out =`, `lse =`; backward accumulates `dq +=`, `dk +=`, `dv +=`.
use rayon::prelude::*;

use super::simd::{Lanes, Portable, fast_exp, has_avx2_fma};

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
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// Attended keys of query row i: lo..=p.
    #[inline]
    fn key_range(&self, i: usize) -> (usize, usize) {
        let p = self.pos0 + i;
        (p.saturating_sub(self.window), p)
    }

    /// Query rows that attend key j: lo..=hi, or `None` when no query sees it.
    #[inline]
    fn query_range(&self, j: usize) -> Option<(usize, usize)> {
        let last = self.pos0 + self.tq.checked_sub(1)?;
        let hi = j.saturating_add(self.window).min(last);
        let lo = j.max(self.pos0);
        (lo <= hi && hi >= self.pos0).then(|| (lo - self.pos0, hi - self.pos0))
    }

    #[inline]
    fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.tq + i) * self.h + h) * self.d
    }

    #[inline]
    fn kv_at(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.tk + j) * self.hkv + g) * self.d
    }

    fn check(&self) {
        debug_assert!(self.hkv > 0 && self.h.is_multiple_of(self.hkv));
        debug_assert!(self.tk >= self.pos0 + self.tq);
    }
}

/// Forward of one query row r = (b, i): every head's output (H*D) and logsumexp (H).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_row<L: Lanes>(
    scores: &mut [f32],
    r: usize,
    o_row: &mut [f32],
    l_row: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
) {
    let (d, group, scale) = (s.d, s.h / s.hkv, s.scale());
    let (b, i) = (r / s.tq, r % s.tq);
    let (lo, hi) = s.key_range(i);
    let sc = &mut scores[..hi + 1 - lo];
    for h in 0..s.h {
        let g = h / group;
        let qi = &q[s.q_at(b, i, h)..][..d];
        let mut m = f32::NEG_INFINITY;
        for (jj, sj) in sc.iter_mut().enumerate() {
            *sj = scale * L::dot(qi, &k[s.kv_at(b, lo + jj, g)..][..d]);
            m = m.max(*sj);
        }
        // A separate pass over the scores so the exps vectorise.
        sc.iter_mut().for_each(|sj| *sj = fast_exp(*sj - m));
        let o = &mut o_row[h * d..(h + 1) * d];
        o.fill(0.0);
        let mut sum = 0.0f32;
        for (jj, &p) in sc.iter().enumerate() {
            sum += p;
            L::axpy(o, p, &v[s.kv_at(b, lo + jj, g)..][..d]);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
        l_row[h] = m + sum.ln();
    }
}

/// Backward pass 1 for query row r = (b, i): delta (H) and dq (H*D).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_q_row<L: Lanes>(
    r: usize,
    dq_row: &mut [f32],
    delta_row: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttnShape,
) {
    let (d, group, scale) = (s.d, s.h / s.hkv, s.scale());
    let (b, i) = (r / s.tq, r % s.tq);
    let (lo, hi) = s.key_range(i);
    for h in 0..s.h {
        let (g, at) = (h / group, s.q_at(b, i, h));
        let (qi, doi) = (&q[at..at + d], &dout[at..at + d]);
        let di = L::dot(doi, &out[at..at + d]);
        delta_row[h] = di;
        let l = lse[r * s.h + h];
        let dqi = &mut dq_row[h * d..(h + 1) * d];
        for j in lo..=hi {
            let kv = s.kv_at(b, j, g);
            let p = fast_exp(scale * L::dot(qi, &k[kv..kv + d]) - l);
            let ds = p * (L::dot(doi, &v[kv..kv + d]) - di);
            L::axpy(dqi, scale * ds, &k[kv..kv + d]);
        }
    }
}

/// Backward pass 2 for key row r = (b, j): dk, dv (Hkv*D) from every query head of each group.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_kv_row<L: Lanes>(
    r: usize,
    dk_row: &mut [f32],
    dv_row: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    delta: &[f32],
    s: AttnShape,
) {
    let (d, group, scale) = (s.d, s.h / s.hkv, s.scale());
    let (b, j) = (r / s.tk, r % s.tk);
    let Some((lo, hi)) = s.query_range(j) else {
        return;
    };
    for g in 0..s.hkv {
        let kv = s.kv_at(b, j, g);
        let (kj, vj) = (&k[kv..kv + d], &v[kv..kv + d]);
        let dkj = &mut dk_row[g * d..(g + 1) * d];
        let dvj = &mut dv_row[g * d..(g + 1) * d];
        for h in g * group..(g + 1) * group {
            for i in lo..=hi {
                let at = s.q_at(b, i, h);
                let (qi, doi) = (&q[at..at + d], &dout[at..at + d]);
                let row = (b * s.tq + i) * s.h + h;
                let p = fast_exp(scale * L::dot(qi, kj) - lse[row]);
                let ds = p * (L::dot(doi, vj) - delta[row]);
                L::axpy(dvj, p, doi);
                L::axpy(dkj, scale * ds, qi);
            }
        }
    }
}

/// AVX2 + FMA instances of the row functions; callers check `has_avx2_fma()` first.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::cpu::simd::Avx2Fma;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_row(
        scores: &mut [f32],
        r: usize,
        o_row: &mut [f32],
        l_row: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
    ) {
        super::forward_row::<Avx2Fma>(scores, r, o_row, l_row, q, k, v, s)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_q_row(
        r: usize,
        dq_row: &mut [f32],
        delta_row: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        s: AttnShape,
    ) {
        super::backward_q_row::<Avx2Fma>(r, dq_row, delta_row, dout, q, k, v, out, lse, s)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_kv_row(
        r: usize,
        dk_row: &mut [f32],
        dv_row: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lse: &[f32],
        delta: &[f32],
        s: AttnShape,
    ) {
        super::backward_kv_row::<Avx2Fma>(r, dk_row, dv_row, dout, q, k, v, lse, delta, s)
    }
}

/// Runs the AVX2 instance of a row function when the CPU has it, else the portable one.
macro_rules! dispatch {
    ($avx:expr, $f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if $avx {
            // SAFETY: `$avx` is `has_avx2_fma()`.
            unsafe { avx2::$f($($arg),*) }
        } else {
            $f::<Portable>($($arg),*)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $avx;
            $f::<Portable>($($arg),*)
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
    s.check();
    let hd = s.h * s.d;
    debug_assert_eq!(out.len(), s.b * s.tq * hd);
    debug_assert_eq!(lse.len(), s.b * s.tq * s.h);
    if hd == 0 {
        return;
    }
    out.par_chunks_mut(hd).zip(lse.par_chunks_mut(s.h)).enumerate().for_each_init(
        || vec![0.0f32; s.tk],
        |scores, (r, (o_row, l_row))| {
            dispatch!(avx, forward_row(scores, r, o_row, l_row, q, k, v, s))
        },
    );
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
    s.check();
    let (hd, kvd) = (s.h * s.d, s.hkv * s.d);
    if hd == 0 {
        return;
    }
    let mut delta = vec![0.0f32; s.b * s.tq * s.h]; // (B, Tq, H)
    dq.par_chunks_mut(hd).zip(delta.par_chunks_mut(s.h)).enumerate().for_each(
        |(r, (dq_row, delta_row))| {
            dispatch!(avx, backward_q_row(r, dq_row, delta_row, dout, q, k, v, out, lse, s))
        },
    );
    let delta = &delta;
    dk.par_chunks_mut(kvd).zip(dv.par_chunks_mut(kvd)).enumerate().for_each(
        |(r, (dk_row, dv_row))| {
            dispatch!(avx, backward_kv_row(r, dk_row, dv_row, dout, q, k, v, lse, delta, s))
        },
    );
}

/// Reference forward in f64 with an explicit mask: out (B, Tq, H, D).
pub fn attention_forward_naive(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f64> {
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
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
            let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
                let o = attention_forward_naive(q, k, v, s);
                o.iter().zip(&w).map(|(o, &w)| o * w as f64).sum()
            };
            let eps = 1e-2f32;
            for which in 0..3 {
                let (grad, n) = match which { 0 => (&dq, nq), 1 => (&dk, nk), _ => (&dv, nk) };
                for idx in [0, n / 3, n / 2, n - 1] {
                    let mut bufs = [q.clone(), k.clone(), v.clone()];
                    bufs[which][idx] += eps;
                    let up = loss(&bufs[0], &bufs[1], &bufs[2]);
                    bufs[which][idx] -= 2.0 * eps;
                    let down = loss(&bufs[0], &bufs[1], &bufs[2]);
                    let num = (up - down) / (2.0 * eps as f64);
                    let got = grad[idx] as f64;
                    prop_assert!((got - num).abs() < 2e-3 + 1e-2 * num.abs(),
                        "which {which} idx {idx}: {got} vs {num} ({s:?})");
                }
            }
        }
    }
}

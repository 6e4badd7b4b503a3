//! Attention of one new query row over a sequence's KV cache: the decode step's attention.
//!
//! q (H, D) at absolute position `pos`; k, v the cache of that sequence, (T, Hkv, D) with at
//! least pos + 1 rows written. Query head h reads kv head h / (H / Hkv) and attends keys j with
//! j <= pos and pos - j <= window, scaled by 1/sqrt(D) — the rule of `attention::AttnShape`,
//! specialised to Tq = 1: no tiles, no logsumexp kept for a backward pass, no threads (a step
//! runs one call per sequence and layer; the caller parallelises over sequences when the
//! batch makes it worth it). Scores go to a caller-owned scratch, so a decode step allocates
//! nothing.
use super::simd::fast_exp;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2Fma, avx2};

/// Sizes of one decode attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeAttnShape {
    pub h: usize,
    /// Key/value heads; divides h.
    pub hkv: usize,
    pub d: usize,
    /// Max distance pos - j of an attended key (`usize::MAX`: plain causal).
    pub window: usize,
    /// Position of the query; keys 0..=pos are in the cache.
    pub pos: usize,
}

impl DecodeAttnShape {
    /// First attended key.
    pub fn first_key(&self) -> usize {
        self.pos.saturating_sub(self.window)
    }

    fn check(&self, out: &[f32], q: &[f32], k: &[f32], v: &[f32], scores: &[f32]) {
        let kv = (self.pos + 1) * self.hkv * self.d;
        assert!(self.hkv > 0 && self.h.is_multiple_of(self.hkv), "bad head counts");
        assert!(out.len() >= self.h * self.d && q.len() >= self.h * self.d, "short q/out");
        assert!(k.len() >= kv && v.len() >= kv, "cache shorter than pos + 1 rows");
        assert!(scores.len() > self.pos - self.first_key(), "short score scratch");
    }
}

/// Reference in f64 with exact exp. Test oracle.
pub fn attention_decode_naive(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: DecodeAttnShape,
) {
    // The scratch check of `check` does not apply: this oracle allocates its own scores.
    s.check(out, q, k, v, &vec![0.0; s.pos + 1 - s.first_key()]);
    let (d, g) = (s.d, s.h / s.hkv);
    let scale = 1.0 / (d as f64).sqrt();
    let lo = s.first_key();
    for h in 0..s.h {
        let kvh = h / g;
        let qh = &q[h * d..(h + 1) * d];
        let sc: Vec<f64> = (lo..=s.pos)
            .map(|j| {
                let kj = &k[(j * s.hkv + kvh) * d..][..d];
                qh.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale
            })
            .collect();
        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
        let sum: f64 = p.iter().sum();
        for c in 0..d {
            let acc: f64 =
                (lo..=s.pos).zip(&p).map(|(j, &pj)| pj * v[(j * s.hkv + kvh) * d + c] as f64).sum();
            out[h * d + c] = (acc / sum) as f32;
        }
    }
}

/// out (H, D) = softmax(q k^T / sqrt(D)) v over the attended keys; `scores` holds at least
/// pos + 1 - first_key floats of scratch.
pub fn attention_decode(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: DecodeAttnShape,
    scores: &mut [f32],
) {
    s.check(out, q, k, v, scores);
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = avx2() {
        // SAFETY: the marker exists only on a CPU with AVX2 and FMA.
        return unsafe { run_avx2(t, out, q, k, v, s, scores) };
    }
    run(out, q, k, v, s, scores)
}

/// `run` compiled for AVX2 + FMA. A named `#[target_feature]` function with `run` inlined into
/// it, not `simd::vectorized`'s closure: LLVM did not inline that closure here, and the step's
/// attention ran as SSE (scalar `mulss` in the hot loop, 30% of a batch-8 decode step).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(
    _: Avx2Fma,
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: DecodeAttnShape,
    scores: &mut [f32],
) {
    run(out, q, k, v, s, scores)
}

#[inline(always)]
fn run(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], s: DecodeAttnShape, scores: &mut [f32]) {
    let (d, g, row) = (s.d, s.h / s.hkv, s.hkv * s.d);
    let scale = 1.0 / (d as f32).sqrt();
    let lo = s.first_key();
    let n = s.pos + 1 - lo;
    let scores = &mut scores[..n];
    for h in 0..s.h {
        let kvh = h / g;
        let qh = &q[h * d..(h + 1) * d];
        let keys = &k[lo * row + kvh * d..];
        // Four keys at a time: independent accumulators hide the FMA latency.
        let mut j = 0;
        while j + 4 <= n {
            let dots = dot4(
                qh,
                [
                    &keys[j * row..],
                    &keys[(j + 1) * row..],
                    &keys[(j + 2) * row..],
                    &keys[(j + 3) * row..],
                ],
                d,
            );
            for (o, x) in scores[j..j + 4].iter_mut().zip(dots) {
                *o = x * scale;
            }
            j += 4;
        }
        for jj in j..n {
            scores[jj] = dot(qh, &keys[jj * row..][..d]) * scale;
        }
        let mx = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0.0;
        for x in scores.iter_mut() {
            *x = fast_exp(*x - mx);
            sum += *x;
        }
        let inv = 1.0 / sum;
        let oh = &mut out[h * d..(h + 1) * d];
        oh.fill(0.0);
        let vals = &v[lo * row + kvh * d..];
        // Four value rows per pass: one load and store of the output row per four keys.
        let mut jj = 0;
        while jj + 4 <= n {
            let p = &scores[jj..jj + 4];
            let vr: [&[f32]; 4] = std::array::from_fn(|i| &vals[(jj + i) * row..][..d]);
            for c in 0..d {
                oh[c] += (p[0] * vr[0][c] + p[1] * vr[1][c]) + (p[2] * vr[2][c] + p[3] * vr[3][c]);
            }
            jj += 4;
        }
        for (jj, &p) in scores.iter().enumerate().skip(jj) {
            let vj = &vals[jj * row..][..d];
            oh.iter_mut().zip(vj).for_each(|(o, &x)| *o += p * x);
        }
        oh.iter_mut().for_each(|o| *o *= inv);
    }
}

/// Dot products of `a` (d) with four rows, 8 lanes each so the loops vectorise.
#[inline(always)]
fn dot4(a: &[f32], b: [&[f32]; 4], d: usize) -> [f32; 4] {
    let a = &a[..d];
    let b = b.map(|r| &r[..d]);
    let mut acc = [[0.0f32; 8]; 4];
    let d8 = d & !7;
    for c in (0..d8).step_by(8) {
        let ac = &a[c..c + 8];
        for (r, br) in b.iter().enumerate() {
            let bc = &br[c..c + 8];
            for l in 0..8 {
                acc[r][l] += ac[l] * bc[l];
            }
        }
    }
    std::array::from_fn(|r| {
        let s = &acc[r];
        let tail: f32 = (d8..d).map(|c| a[c] * b[r][c]).sum();
        (s[0] + s[4]) + (s[1] + s[5]) + (s[2] + s[6]) + (s[3] + s[7]) + tail
    })
}

/// a · b in 8 lanes (the loop vectorises for any target), lanes summed pairwise. The decode
/// step's small dot products (norms, gates) use it too, so they round as attention's do.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attention::{AttnShape, attention_forward};

    /// Values in [-2, 2).
    fn fill(n: usize, seed: u64) -> Vec<f32> {
        crate::cpu::testing::uniform(n, seed).into_iter().map(|x| x * 4.0).collect()
    }

    /// GQA, windows shorter and longer than the context, key counts around the 4-key blocks.
    #[test]
    fn matches_naive_and_the_full_kernel() {
        for &(h, hkv, d, window, pos) in &[
            (1, 1, 8, usize::MAX, 0),
            (2, 1, 16, usize::MAX, 5),
            (4, 2, 64, 3, 10),
            (4, 4, 36, 128, 130),
            (6, 2, 128, usize::MAX, 37),
        ] {
            let s = DecodeAttnShape { h, hkv, d, window, pos };
            let cap = pos + 3;
            let (q, k, v) = (fill(h * d, 1), fill(cap * hkv * d, 2), fill(cap * hkv * d, 3));
            let mut want = vec![0.0; h * d];
            attention_decode_naive(&mut want, &q, &k, &v, s);
            let mut got = vec![f32::NAN; h * d];
            let mut scores = vec![0.0; cap];
            attention_decode(&mut got, &q, &k, &v, s, &mut scores);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5 * (1.0 + e.abs()), "{s:?}: {g} vs {e}");
            }
            // The training/prefill kernel with one query row agrees too.
            let full = AttnShape { b: 1, tq: 1, tk: cap, h, hkv, d, window, pos0: pos };
            let (mut out, mut lse) = (vec![0.0; h * d], vec![0.0; h]);
            attention_forward(&mut out, &mut lse, &q, &k, &v, full);
            for (g, e) in got.iter().zip(&out) {
                assert!((g - e).abs() < 1e-5 * (1.0 + e.abs()), "{s:?} vs full: {g} vs {e}");
            }
        }
    }
}

//! Softmax, log-softmax and cross-entropy over the last dim of a (N, V) buffer.
//!
//! Parallelised over rows (each task owns whole output rows). Numerically stable: every row is
//! shifted by its max before exp, and the cross-entropy keeps the row's logsumexp instead of
//! probabilities so backward recomputes softmax exactly. Forward kernels write `=`; backward
//! kernels accumulate `dinp +=`.
use rayon::prelude::*;

use super::elementwise::CHUNK;
use super::simd::{fast_exp, sum_lanes, vectorized};

/// Target id that contributes no loss and no gradient (PyTorch's `ignore_index=-1`).
pub const IGNORE_INDEX: i32 = -1;

/// Panics unless every buffer holds `n` rows of `v` (in release builds too).
fn check_rows(what: &str, n: usize, v: usize, lens: &[usize]) {
    let want = n.checked_mul(v);
    for (i, &len) in lens.iter().enumerate() {
        assert!(Some(len) == want, "{what} ({n}, {v}): buffer {i} has {len} floats");
    }
}

fn rows_mut<'a>(buf: &'a mut [f32], cols: usize, f: impl Fn(usize, &'a mut [f32]) + Sync + Send) {
    if cols == 0 {
        return;
    }
    if buf.len() <= CHUNK {
        buf.chunks_mut(cols).enumerate().for_each(|(r, row)| vectorized(|| f(r, row)));
    } else {
        buf.par_chunks_mut(cols).enumerate().for_each(|(r, row)| vectorized(|| f(r, row)));
    }
}

/// Max of a row, in 8 lanes so it vectorises.
#[inline]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for k in 0..8 {
            acc[k] = acc[k].max(c[k]);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// sum_j e^(x_j - m), in 8 lanes so it vectorises.
#[inline]
fn sum_exp(x: &[f32], m: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| fast_exp(v - m)).sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += fast_exp(c[k] - m);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// logsumexp of one row, max-shifted.
#[inline]
fn logsumexp(x: &[f32]) -> f32 {
    let m = row_max(x);
    if m == f32::NEG_INFINITY {
        return m;
    }
    m + sum_exp(x, m).ln()
}

/// out (N, V) = softmax(inp) along V
pub fn softmax_forward(out: &mut [f32], inp: &[f32], n: usize, v: usize) {
    check_rows("softmax", n, v, &[out.len(), inp.len()]);
    rows_mut(out, v, |r, o| {
        let x = &inp[r * v..(r + 1) * v];
        let m = row_max(x);
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = fast_exp(x - m));
        let inv = 1.0 / sum_lanes(o);
        o.iter_mut().for_each(|o| *o *= inv);
    });
}

// d softmax: dx_j = y_j (dy_j - sum_k dy_k y_k)
/// dinp (N, V) += softmax backward, from the saved output.
pub fn softmax_backward(dinp: &mut [f32], dout: &[f32], out: &[f32], n: usize, v: usize) {
    check_rows("softmax backward", n, v, &[dinp.len(), dout.len(), out.len()]);
    rows_mut(dinp, v, |r, d| {
        let (g, y) = (&dout[r * v..(r + 1) * v], &out[r * v..(r + 1) * v]);
        let dot: f32 = g.iter().zip(y).map(|(&g, &y)| g * y).sum();
        for ((d, &g), &y) in d.iter_mut().zip(g).zip(y) {
            *d += y * (g - dot);
        }
    });
}

/// out (N, V) = log_softmax(inp) along V
pub fn log_softmax_forward(out: &mut [f32], inp: &[f32], n: usize, v: usize) {
    check_rows("log_softmax", n, v, &[out.len(), inp.len()]);
    rows_mut(out, v, |r, o| {
        let x = &inp[r * v..(r + 1) * v];
        let lse = logsumexp(x);
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = x - lse);
    });
}

// d log_softmax: dx_j = dy_j - softmax_j sum_k dy_k, with softmax = exp(out)
/// dinp (N, V) += log-softmax backward, from the saved output.
pub fn log_softmax_backward(dinp: &mut [f32], dout: &[f32], out: &[f32], n: usize, v: usize) {
    check_rows("log_softmax backward", n, v, &[dinp.len(), dout.len(), out.len()]);
    rows_mut(dinp, v, |r, d| {
        let (g, y) = (&dout[r * v..(r + 1) * v], &out[r * v..(r + 1) * v]);
        let sum: f32 = g.iter().sum();
        for ((d, &g), &y) in d.iter_mut().zip(g).zip(y) {
            *d += g - fast_exp(y) * sum;
        }
    });
}

/// losses (N) = logsumexp(logits_i) - logits_i[t_i], 0 where t_i is `IGNORE_INDEX`;
/// lse (N) saves the row logsumexp for the backward. Targets must be `IGNORE_INDEX` or in 0..V.
pub fn cross_entropy_forward(
    losses: &mut [f32],
    lse: &mut [f32],
    logits: &[f32],
    targets: &[i32],
    n: usize,
    v: usize,
) {
    check_rows("cross_entropy", n, v, &[logits.len()]);
    check_rows("cross_entropy", n, 1, &[losses.len(), lse.len(), targets.len()]);
    let row = |r: usize, (loss, lse): (&mut f32, &mut f32)| {
        let x = &logits[r * v..(r + 1) * v];
        *lse = logsumexp(x);
        let t = targets[r];
        *loss = if t == IGNORE_INDEX { 0.0 } else { *lse - x[t as usize] };
    };
    if logits.len() <= CHUNK {
        losses.iter_mut().zip(lse.iter_mut()).enumerate().for_each(|(r, p)| row(r, p));
    } else {
        let rows = losses.par_iter_mut().zip(lse.par_iter_mut()).enumerate();
        rows.for_each(|(r, p)| vectorized(|| row(r, p)));
    }
}

// d (lse - x_t) / d x_j = softmax_j - [j == t]
/// dlogits (N, V) += dlosses_i * (softmax(logits_i) - onehot(t_i)); ignored rows get nothing.
pub fn cross_entropy_backward(
    dlogits: &mut [f32],
    dlosses: &[f32],
    logits: &[f32],
    lse: &[f32],
    targets: &[i32],
    n: usize,
    v: usize,
) {
    check_rows("cross_entropy backward", n, v, &[dlogits.len(), logits.len()]);
    check_rows("cross_entropy backward", n, 1, &[dlosses.len(), lse.len(), targets.len()]);
    rows_mut(dlogits, v, |r, d| {
        let t = targets[r];
        if t == IGNORE_INDEX {
            return;
        }
        let (g, m) = (dlosses[r], lse[r]);
        let x = &logits[r * v..(r + 1) * v];
        d.iter_mut().zip(x).for_each(|(d, &x)| *d += g * fast_exp(x - m));
        d[t as usize] -= g;
    });
}

/// Reference cross-entropy in f64: per-row losses.
pub fn cross_entropy_naive(logits: &[f32], targets: &[i32], n: usize, v: usize) -> Vec<f64> {
    check_rows("cross_entropy_naive", n, v, &[logits.len()]);
    check_rows("cross_entropy_naive", n, 1, &[targets.len()]);
    (0..n)
        .map(|r| {
            let x = &logits[r * v..(r + 1) * v];
            let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let lse = m + x.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let t = targets[r];
            if t == IGNORE_INDEX { 0.0 } else { lse - x[t as usize] as f64 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn logits(n: usize, v: usize, seed: u64, scale: f32) -> Vec<f32> {
        crate::cpu::testing::uniform(n * v, seed).into_iter().map(|x| x * scale).collect()
    }

    proptest! {
        #[test]
        fn softmax_rows_sum_to_one(n in 1usize..9, v in 1usize..300, seed: u64) {
            // Large logits: a naive exp would overflow.
            let x = logits(n, v, seed, 400.0);
            let mut y = vec![0.0; n * v];
            softmax_forward(&mut y, &x, n, v);
            for r in 0..n {
                let s: f32 = y[r * v..(r + 1) * v].iter().sum();
                prop_assert!((s - 1.0).abs() < 1e-5, "row {r} sums to {s}");
            }
            let mut ls = vec![0.0; n * v];
            log_softmax_forward(&mut ls, &x, n, v);
            for (l, y) in ls.iter().zip(&y) {
                prop_assert!((l.exp() - y).abs() < 1e-5);
            }
        }

        #[test]
        fn cross_entropy_matches_naive(n in 1usize..40, v in 1usize..700, seed: u64) {
            let x = logits(n, v, seed, 20.0);
            let targets: Vec<i32> = (0..n)
                .map(|i| if i % 5 == 3 { IGNORE_INDEX } else { ((i as u64 * 31 + seed) % v as u64) as i32 })
                .collect();
            let (mut loss, mut lse) = (vec![0.0; n], vec![0.0; n]);
            cross_entropy_forward(&mut loss, &mut lse, &x, &targets, n, v);
            let naive = cross_entropy_naive(&x, &targets, n, v);
            for (a, b) in loss.iter().zip(&naive) {
                prop_assert!((*a as f64 - b).abs() < 1e-4 * b.abs().max(1.0));
            }
            // The gradient of each row sums to zero (softmax sums to 1, minus one-hot).
            let mut d = vec![0.0; n * v];
            cross_entropy_backward(&mut d, &vec![1.0; n], &x, &lse, &targets, n, v);
            for r in 0..n {
                let s: f32 = d[r * v..(r + 1) * v].iter().sum();
                prop_assert!(s.abs() < 1e-4);
            }
        }
    }
}

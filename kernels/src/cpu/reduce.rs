//! Reductions: full sum, sum over one dim, and sum-to-shape (the backward of broadcasting).
//!
//! Deterministic regardless of thread count: partial sums are taken over fixed-size chunks (not
//! per-thread splits) and combined in chunk order. Parallelised over chunks of the input (full
//! sum) or over output elements/rows (dim sums), so tasks write disjoint outputs.
//! `sum_forward`/`sum_dim_forward` write `out =`; `sum_dim_backward` and `sum_to_shape` accumulate
//! `+=` (they produce gradients).
use rayon::prelude::*;

use super::elementwise::{Broadcast, CHUNK};

/// sum_k x_k (f64 lanes: vectorised, and exact enough for a loss over millions of tokens)
#[inline]
fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// sum_k a_k b_k in f64 lanes, over fixed chunks in parallel (deterministic).
pub fn dot_all(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let chunk = |(a, b): (&[f32], &[f32])| {
        let mut acc = [0.0f64; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f64 =
            ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| x as f64 * y as f64).sum();
        for (x, y) in ca.zip(cb) {
            for k in 0..8 {
                acc[k] += x[k] as f64 * y[k] as f64;
            }
        }
        acc.iter().sum::<f64>() + tail
    };
    if a.len() <= CHUNK {
        chunk((a, b))
    } else {
        let partials: Vec<f64> = a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)).map(chunk).collect();
        partials.iter().sum()
    }
}

/// Sum of all elements, accumulated in f64.
pub fn sum_all(inp: &[f32]) -> f64 {
    // lengths: any length is a valid input.
    let chunk_sum = sum_f64;
    if inp.len() <= CHUNK {
        chunk_sum(inp)
    } else {
        let partials: Vec<f64> = inp.par_chunks(CHUNK).map(chunk_sum).collect();
        partials.iter().sum()
    }
}

/// out (1) = sum(inp)
pub fn sum_forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), 1, "sum: out is one float");
    out[0] = sum_all(inp) as f32;
}

/// out (outer, inner) = sum over n of inp (outer, n, inner)
pub fn sum_dim_forward(out: &mut [f32], inp: &[f32], outer: usize, n: usize, inner: usize) {
    assert_eq!(out.len(), outer * inner);
    assert_eq!(inp.len(), outer * n * inner);
    if inner == 0 || outer == 0 {
        return;
    }
    let row = |o: usize, dst: &mut [f32]| {
        dst.fill(0.0);
        for j in 0..n {
            let src = &inp[(o * n + j) * inner..(o * n + j + 1) * inner];
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
        }
    };
    if inp.len() <= CHUNK {
        out.chunks_mut(inner).enumerate().for_each(|(o, d)| row(o, d));
    } else {
        out.par_chunks_mut(inner).enumerate().for_each(|(o, d)| row(o, d));
    }
}

// d sum_j x_j / d x_j = 1: the gradient is dout repeated along the reduced dim.
/// dinp (outer, n, inner) += dout (outer, inner) broadcast along n
pub fn sum_dim_backward(dinp: &mut [f32], dout: &[f32], outer: usize, n: usize, inner: usize) {
    assert_eq!(dout.len(), outer * inner);
    assert_eq!(dinp.len(), outer * n * inner);
    if inner == 0 || n == 0 {
        return;
    }
    // Tasks take whole rows of `inner`, about CHUNK elements each (inner may be 1: a full sum).
    let rows_per_task = (CHUNK / inner).max(1);
    let task = |t: usize, block: &mut [f32]| {
        for (k, d) in block.chunks_mut(inner).enumerate() {
            let o = (t * rows_per_task + k) / n;
            let g = &dout[o * inner..(o + 1) * inner];
            d.iter_mut().zip(g).for_each(|(d, &g)| *d += g);
        }
    };
    if dinp.len() <= CHUNK {
        task(0, dinp);
    } else {
        dinp.par_chunks_mut(rows_per_task * inner).enumerate().for_each(|(t, b)| task(t, b));
    }
}

/// dst (dst_shape) += alpha * src (src_shape) summed over the dims where dst was broadcast.
/// `dst_shape` must broadcast to exactly `src_shape`.
pub fn sum_to_shape(
    dst: &mut [f32],
    dst_shape: &[usize],
    src: &[f32],
    src_shape: &[usize],
    alpha: f32,
) {
    assert_eq!(dst.len(), dst_shape.iter().product::<usize>());
    assert_eq!(src.len(), src_shape.iter().product::<usize>());
    if dst.len() == src.len() {
        // Nothing was broadcast (only size-1 dims added or removed).
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d += alpha * s);
        return;
    }
    if dst.len() == 1 {
        dst[0] += alpha * sum_all(src) as f32;
        return;
    }
    let Some(bc) = Broadcast::new(dst_shape, src_shape) else {
        panic!("sum_to_shape: {dst_shape:?} does not broadcast to {src_shape:?}");
    };
    let (dims, sd) = bc.dims_and_stride_a();
    match (dims, sd) {
        // (K, R) -> (K): row sums, one task per block of rows.
        ([k, r], [1, 0]) => {
            let (k, r) = (*k, *r);
            let row = |i: usize, d: &mut f32| {
                let s: f32 = src[i * r..(i + 1) * r].iter().sum();
                *d += alpha * s;
            };
            if src.len() <= CHUNK {
                dst.iter_mut().enumerate().for_each(|(i, d)| row(i, d));
            } else {
                dst.par_iter_mut()
                    .enumerate()
                    .with_min_len((CHUNK / r).max(1))
                    .for_each(|(i, d)| row(i, d));
            }
            assert_eq!(dst.len(), k);
        }
        // (R, K) -> (K): column sums, one task per block of columns.
        ([r, k], [0, 1]) => {
            let (r, k) = (*r, *k);
            const COLS: usize = 64;
            let block = |b: usize, d: &mut [f32]| {
                let c0 = b * COLS;
                let mut acc = vec![0.0f32; d.len()];
                for i in 0..r {
                    let s = &src[i * k + c0..i * k + c0 + d.len()];
                    acc.iter_mut().zip(s).for_each(|(a, &s)| *a += s);
                }
                d.iter_mut().zip(&acc).for_each(|(d, &a)| *d += alpha * a);
            };
            if src.len() <= CHUNK {
                dst.chunks_mut(COLS).enumerate().for_each(|(b, d)| block(b, d));
            } else {
                dst.par_chunks_mut(COLS).enumerate().for_each(|(b, d)| block(b, d));
            }
        }
        _ => sum_to_shape_naive(dst, dst_shape, src, src_shape, alpha),
    }
}

/// Reference for `sum_to_shape`: walk every source element and add it to the destination element
/// it was broadcast from.
pub fn sum_to_shape_naive(
    dst: &mut [f32],
    dst_shape: &[usize],
    src: &[f32],
    src_shape: &[usize],
    alpha: f32,
) {
    assert_eq!(dst.len(), dst_shape.iter().product::<usize>());
    assert_eq!(src.len(), src_shape.iter().product::<usize>());
    let rank = src_shape.len();
    let mut pd = vec![1; rank - dst_shape.len().min(rank)];
    pd.extend_from_slice(dst_shape);
    let mut acc = vec![0.0f64; dst.len()];
    for (flat, &s) in src.iter().enumerate() {
        let (mut rem, mut id, mut sd) = (flat, 0, 1);
        for d in (0..rank).rev() {
            let i = rem % src_shape[d];
            rem /= src_shape[d];
            id += if pd[d] == 1 { 0 } else { i * sd };
            sd *= pd[d];
        }
        acc[id] += s as f64;
    }
    dst.iter_mut().zip(&acc).for_each(|(d, &a)| *d += alpha * a as f32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn sum_to_shape_matches_naive(
            dims in prop::collection::vec((1usize..7, any::<bool>()), 1..5),
            big in any::<bool>(),
        ) {
            let mut src_shape: Vec<usize> = dims.iter().map(|d| d.0).collect();
            if big {
                // Push the source past CHUNK so the parallel paths run.
                src_shape.insert(0, CHUNK / src_shape.iter().product::<usize>() + 3);
            }
            let off = src_shape.len() - dims.len();
            let dst_shape: Vec<usize> = src_shape
                .iter()
                .enumerate()
                .map(|(i, &n)| if i < off || dims[i - off].1 { 1 } else { n })
                .collect();
            let n: usize = src_shape.iter().product();
            let src: Vec<f32> = (0..n).map(|i| ((i * 37) % 17) as f32 * 0.25 - 2.0).collect();
            let m: usize = dst_shape.iter().product();
            let mut fast = vec![1.0; m];
            let mut naive = vec![1.0; m];
            sum_to_shape(&mut fast, &dst_shape, &src, &src_shape, -0.5);
            sum_to_shape_naive(&mut naive, &dst_shape, &src, &src_shape, -0.5);
            for (f, n) in fast.iter().zip(&naive) {
                prop_assert!((f - n).abs() <= 1e-3 * n.abs().max(1.0), "{f} vs {n}");
            }
        }
    }

    #[test]
    fn sum_dim_backward_parallel_path() {
        for inner in [1usize, 7] {
            let (outer, n) = (3, CHUNK / 2 + 5);
            let dout: Vec<f32> = (0..outer * inner).map(|i| i as f32).collect();
            let mut d = vec![0.5; outer * n * inner];
            sum_dim_backward(&mut d, &dout, outer, n, inner);
            for (idx, &x) in d.iter().enumerate() {
                let (o, c) = (idx / (n * inner), idx % inner);
                assert_eq!(x, 0.5 + dout[o * inner + c], "inner {inner} idx {idx}");
            }
        }
    }

    #[test]
    fn sum_dim_round_trip() {
        let inp: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let mut out = vec![0.0; 8];
        sum_dim_forward(&mut out, &inp, 2, 3, 4);
        assert_eq!(out, vec![12., 15., 18., 21., 48., 51., 54., 57.]);
        let mut d = vec![0.0; 24];
        sum_dim_backward(&mut d, &out, 2, 3, 4);
        assert_eq!(d[4], 12.0);
        assert_eq!(d[20], 48.0);
        let mut s = [0.0];
        sum_forward(&mut s, &inp);
        assert_eq!(s[0], 276.0);
    }
}

//! Rotary position embedding, nanochat's convention: the head dim is split in halves (not
//! interleaved pairs) and rotated by -theta:
//! out = concat(x1 cos + x2 sin, -x1 sin + x2 cos), x1 = x[..., :D/2], x2 = x[..., D/2:].
//!
//! Tables (T_max, D/2) are built once; a call reads rows pos0..pos0+T, so the same kernel serves
//! training (pos0 = 0) and KV-cache inference. Parallelised over (b, t) rows of H*D elements.
//! Forward writes `out =`; backward accumulates `dinp +=`.
use rayon::prelude::*;

use super::elementwise::CHUNK;

/// cos, sin (t_max, D/2): angle(t, j) = t * base^(-2j/D), rounded to f32 at each step like
/// PyTorch's float32 tables (inv_freq, then t * inv_freq, then cos/sin).
pub fn rope_tables(cos: &mut [f32], sin: &mut [f32], t_max: usize, d: usize, base: f32) {
    let half = d / 2;
    assert_eq!(cos.len(), t_max * half);
    assert_eq!(sin.len(), t_max * half);
    let inv_freq: Vec<f32> =
        (0..half).map(|j| (1.0 / (base as f64).powf((2 * j) as f64 / d as f64)) as f32).collect();
    for t in 0..t_max {
        for (j, &f) in inv_freq.iter().enumerate() {
            let angle = t as f32 * f;
            cos[t * half + j] = (angle as f64).cos() as f32;
            sin[t * half + j] = (angle as f64).sin() as f32;
        }
    }
}

/// Validated sizes of one rope call: x (B, T, H, D) at absolute positions pos0..pos0+T.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub d: usize,
    pub pos0: usize,
}

/// Applies the rotation (sign = 1) or its inverse (sign = -1) to every (b, t) row.
fn rotate(
    out: &mut [f32],
    inp: &[f32],
    cos: &[f32],
    sin: &[f32],
    s: RopeShape,
    sign: f32,
    acc: bool,
) {
    let (half, row_len) = (s.d / 2, s.h * s.d);
    assert_eq!(out.len(), s.b * s.t * row_len);
    assert_eq!(inp.len(), out.len());
    assert!(cos.len() >= (s.pos0 + s.t) * half && sin.len() >= (s.pos0 + s.t) * half);
    if row_len == 0 {
        return;
    }
    let row = |r: usize, o: &mut [f32]| {
        let pos = s.pos0 + r % s.t;
        let (c, sn) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
        let x = &inp[r * row_len..(r + 1) * row_len];
        for (o, x) in o.chunks_exact_mut(s.d).zip(x.chunks_exact(s.d)) {
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            for j in 0..half {
                let (a, b, cj, sj) = (x1[j], x2[j], c[j], sign * sn[j]);
                let (y1, y2) = (a * cj + b * sj, b * cj - a * sj);
                if acc {
                    o1[j] += y1;
                    o2[j] += y2;
                } else {
                    o1[j] = y1;
                    o2[j] = y2;
                }
            }
        }
    };
    if out.len() <= CHUNK {
        out.chunks_mut(row_len).enumerate().for_each(|(r, o)| row(r, o));
    } else {
        out.par_chunks_mut(row_len).enumerate().for_each(|(r, o)| row(r, o));
    }
}

/// out (B, T, H, D) = rope(inp), positions pos0..pos0+T; cos, sin (T_max, D/2).
pub fn rope_forward(out: &mut [f32], inp: &[f32], cos: &[f32], sin: &[f32], s: RopeShape) {
    rotate(out, inp, cos, sin, s, 1.0, false);
}

// The rotation is orthogonal, so its Jacobian's transpose is the rotation by +theta:
// dx1 = dy1 cos - dy2 sin, dx2 = dy1 sin + dy2 cos.
/// dinp (B, T, H, D) += rope^T(dout)
pub fn rope_backward(dinp: &mut [f32], dout: &[f32], cos: &[f32], sin: &[f32], s: RopeShape) {
    rotate(dinp, dout, cos, sin, s, -1.0, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_direct_formula_with_offset() {
        let s = RopeShape { b: 2, t: 3, h: 2, d: 8, pos0: 5 };
        let t_max = s.pos0 + s.t;
        let (mut cos, mut sin) = (vec![0.0; t_max * 4], vec![0.0; t_max * 4]);
        rope_tables(&mut cos, &mut sin, t_max, s.d, 100000.0);
        let n = s.b * s.t * s.h * s.d;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut y = vec![0.0; n];
        rope_forward(&mut y, &x, &cos, &sin, s);
        for i in 0..n {
            let (k, t) = (i % s.d, (i / (s.h * s.d)) % s.t);
            let j = k % 4;
            let th = (s.pos0 + t) as f64 * 100000f64.powf(-(2.0 * j as f64) / 8.0);
            let (x1, x2) = (x[i - k + j] as f64, x[i - k + j + 4] as f64);
            let want =
                if k < 4 { x1 * th.cos() + x2 * th.sin() } else { -x1 * th.sin() + x2 * th.cos() };
            assert!((y[i] as f64 - want).abs() < 1e-5, "{i}: {} vs {want}", y[i]);
        }
        // backward of forward is the identity (orthogonal rotation).
        let mut back = vec![0.0; n];
        rope_backward(&mut back, &y, &cos, &sin, s);
        for (a, b) in back.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

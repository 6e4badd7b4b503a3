//! RMSNorm over the last dim, no learnable weight: out = x / sqrt(mean(x^2) + eps).
//!
//! Parallelised over rows (each task owns whole rows of `out`/`dinp` and their `rstd`).
//! Forward writes `out =` and `rstd =` (saved for backward); backward accumulates `dinp +=`.
use rayon::prelude::*;

use super::elementwise::CHUNK;
use super::simd::vectorized;

/// PyTorch's default eps for `F.rms_norm` on float32: the float32 machine epsilon.
pub const RMSNORM_EPS: f32 = 1.1920929e-07;

/// out (N, C) = inp * rstd, rstd (N) = 1 / sqrt(mean(inp^2) + eps)
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    n: usize,
    c: usize,
    eps: f32,
) {
    assert_eq!(out.len(), n * c);
    assert_eq!(inp.len(), n * c);
    assert_eq!(rstd.len(), n);
    if c == 0 {
        return;
    }
    let row = |r: usize, (o, rs): (&mut [f32], &mut f32)| {
        let x = &inp[r * c..(r + 1) * c];
        let ss: f32 = x.iter().map(|&v| v * v).sum();
        let s = 1.0 / (ss / c as f32 + eps).sqrt();
        *rs = s;
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = x * s);
    };
    if out.len() <= CHUNK {
        out.chunks_mut(c).zip(rstd.iter_mut()).enumerate().for_each(|(r, p)| row(r, p));
    } else {
        let rows = out.par_chunks_mut(c).zip(rstd.par_iter_mut()).enumerate();
        rows.for_each(|(r, p)| vectorized(|| row(r, p)));
    }
}

// y = x r, r = (mean(x^2) + eps)^-1/2, dr/dx_k = -r^3 x_k / C
// => dx_k = r (dy_k - x_k r^2 mean(dy . x))
/// dinp (N, C) += rmsnorm backward, from the saved rstd (N).
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    assert!(
        [dinp.len(), dout.len(), inp.len()].iter().all(|&l| Some(l) == n.checked_mul(c))
            && rstd.len() == n,
        "rmsnorm backward ({n}, {c}): buffers of {}, {}, {}, {} floats",
        dinp.len(),
        dout.len(),
        inp.len(),
        rstd.len()
    );
    if c == 0 {
        return;
    }
    let row = |r: usize, d: &mut [f32]| {
        let (x, g, s) = (&inp[r * c..(r + 1) * c], &dout[r * c..(r + 1) * c], rstd[r]);
        let dot: f32 = g.iter().zip(x).map(|(&g, &x)| g * x).sum();
        let k = s * s * dot / c as f32;
        for ((d, &g), &x) in d.iter_mut().zip(g).zip(x) {
            *d += s * (g - x * k);
        }
    };
    if dinp.len() <= CHUNK {
        dinp.chunks_mut(c).enumerate().for_each(|(r, d)| row(r, d));
    } else {
        dinp.par_chunks_mut(c).enumerate().for_each(|(r, d)| vectorized(|| row(r, d)));
    }
}

/// Reference forward in f64.
pub fn rmsnorm_forward_naive(inp: &[f32], n: usize, c: usize, eps: f32) -> Vec<f64> {
    assert_eq!(Some(inp.len()), n.checked_mul(c), "rmsnorm_forward_naive ({n}, {c})");
    let mut out = vec![0.0; n * c];
    for r in 0..n {
        let x = &inp[r * c..(r + 1) * c];
        let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / c as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        for k in 0..c {
            out[r * c + k] = x[k] as f64 * s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn forward_matches_naive(n in 1usize..20, c in 1usize..300, scale in 1e-3f32..1e3) {
            let x: Vec<f32> = (0..n * c).map(|i| ((i * 29 % 23) as f32 - 11.0) * scale).collect();
            let (mut y, mut rs) = (vec![0.0; n * c], vec![0.0; n]);
            rmsnorm_forward(&mut y, &mut rs, &x, n, c, RMSNORM_EPS);
            let want = rmsnorm_forward_naive(&x, n, c, RMSNORM_EPS);
            for (a, b) in y.iter().zip(&want) {
                prop_assert!((*a as f64 - b).abs() < 1e-5 * b.abs().max(1.0));
            }
        }
    }

    #[test]
    fn backward_is_orthogonal_to_input() {
        // rmsnorm is scale invariant, so its gradient has no component along x.
        let (n, c) = (3, 17);
        let x: Vec<f32> = (0..n * c).map(|i| (i as f32 * 0.37).sin()).collect();
        let g: Vec<f32> = (0..n * c).map(|i| (i as f32 * 0.11).cos()).collect();
        let (mut y, mut rs) = (vec![0.0; n * c], vec![0.0; n]);
        rmsnorm_forward(&mut y, &mut rs, &x, n, c, RMSNORM_EPS);
        let mut d = vec![0.0; n * c];
        rmsnorm_backward(&mut d, &g, &x, &rs, n, c);
        for r in 0..n {
            let dot: f32 = (0..c).map(|k| d[r * c + k] * x[r * c + k]).sum();
            assert!(dot.abs() < 1e-5, "row {r}: {dot}");
        }
    }
}

//! Muon for one weight matrix (rows, cols), exactly as nanochat's MuonAdamW (docs/reference.md §6):
//! Nesterov momentum -> row equilibration -> Polar Express orthogonalisation -> renormalisation
//! -> NorMuon factored second moment -> cautious weight decay.
//!
//! nanochat stacks same-shaped matrices and runs these steps batched; every reduction in them is
//! per matrix (keepdim over the last two dims), so processing one matrix at a time is identical.
use femtochat_kernels::cpu::matmul::{MatmulShape, matmul};

/// (a, b, c) of the 5 Polar Express iterations, written as in the reference (f32 rounds them).
#[allow(clippy::excessive_precision)]
pub const POLAR_EXPRESS_COEFFS: [(f32, f32, f32); 5] = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
];

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MuonHyper {
    pub lr: f32,
    pub momentum: f32,
    pub beta2: f32,
    pub ns_steps: usize,
    pub weight_decay: f32,
}

fn frobenius(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32
}

/// One Muon step of p (rows, cols) with gradient g; `momentum` (rows, cols) and `second`
/// ((rows) if rows >= cols else (cols)) are this matrix's state.
pub fn muon_update(
    p: &mut [f32],
    g: &[f32],
    momentum: &mut [f32],
    second: &mut [f32],
    rows: usize,
    cols: usize,
    hp: MuonHyper,
) {
    let n = rows * cols;
    debug_assert!(p.len() == n && g.len() == n && momentum.len() == n);
    debug_assert_eq!(second.len(), if rows >= cols { rows } else { cols });
    let mom = hp.momentum;

    // 1. Nesterov: M = lerp(M, G, 1 - mom); X = lerp(G, M, mom).
    let mut x = vec![0.0f32; n]; // (rows, cols)
    for i in 0..n {
        momentum[i] += (1.0 - mom) * (g[i] - momentum[i]);
        x[i] = g[i] + mom * (momentum[i] - g[i]);
    }

    // 2. Row equilibration: every row rescaled to norm ||X||_F / sqrt(rows).
    let target = frobenius(&x) / (rows as f32).sqrt();
    for row in x.chunks_exact_mut(cols) {
        let s = target / frobenius(row).max(1e-6);
        row.iter_mut().for_each(|v| *v *= s);
    }

    // 3. Orthogonalise.
    let s = 1.0 / (frobenius(&x) * 1.01 + 1e-6);
    x.iter_mut().for_each(|v| *v *= s);
    polar_express(&mut x, rows, cols, hp.ns_steps);

    // 4. Renormalise to Frobenius norm sqrt(min(rows, cols)).
    let s = (rows.min(cols) as f32).sqrt() / frobenius(&x).max(1e-6);
    x.iter_mut().for_each(|v| *v *= s);

    // 5. NorMuon: per-row (or per-column) second moment of X, normalised to keep ||X||_F.
    let tall = rows >= cols;
    let red = if tall { cols } else { rows }; // size of the reduced dim
    let mut v_mean = vec![0.0f64; second.len()];
    for r in 0..rows {
        for c in 0..cols {
            let sq = x[r * cols + c] as f64 * x[r * cols + c] as f64;
            v_mean[if tall { r } else { c }] += sq;
        }
    }
    v_mean.iter_mut().for_each(|v| *v /= red as f64);
    let v_norm = (v_mean.iter().sum::<f64>() * red as f64).sqrt();
    let mut steps = vec![0.0f64; second.len()];
    let mut new_sq = 0.0f64;
    for j in 0..second.len() {
        second[j] += (1.0 - hp.beta2) * (v_mean[j] as f32 - second[j]);
        steps[j] = 1.0 / (second[j].max(1e-10) as f64).sqrt();
        new_sq += v_mean[j] * red as f64 * steps[j] * steps[j];
    }
    let ratio = v_norm / new_sq.sqrt().max(1e-10);
    for r in 0..rows {
        for c in 0..cols {
            x[r * cols + c] *= (steps[if tall { r } else { c }] * ratio) as f32;
        }
    }

    // 6. Cautious weight decay (only where the update and the weight agree in sign), with the
    // shape-scaled learning rate.
    let lr = hp.lr * (rows as f32 / cols as f32).max(1.0).sqrt();
    for i in 0..n {
        let mask = if x[i] * p[i] >= 0.0 { 1.0 } else { 0.0 };
        p[i] -= lr * x[i] + lr * hp.weight_decay * p[i] * mask;
    }
}

/// `steps` Polar Express iterations on x (rows, cols), in place:
/// tall: A = X^T X, X = aX + X (bA + cA^2); wide: A = X X^T, X = aX + (bA + cA^2) X.
/// The Gram matrix is taken on the small side, so A is (min, min).
pub fn polar_express(x: &mut [f32], rows: usize, cols: usize, steps: usize) {
    let tall = rows > cols;
    let k = if tall { cols } else { rows };
    let mut a = vec![0.0f32; k * k]; // (k, k)
    let mut a2 = vec![0.0f32; k * k];
    let mut out = vec![0.0f32; rows * cols];
    for &(ca, cb, cc) in POLAR_EXPRESS_COEFFS.iter().cycle().take(steps) {
        if tall {
            matmul(&mut a, x, x, MatmulShape::new(cols, rows, cols, true, false), false);
        } else {
            matmul(&mut a, x, x, MatmulShape::new(rows, cols, rows, false, true), false);
        }
        matmul(&mut a2, &a, &a, MatmulShape::new(k, k, k, false, false), false);
        // B = bA + cA^2, written into a2.
        for (b, &av) in a2.iter_mut().zip(&a) {
            *b = cb * av + cc * *b;
        }
        out.iter_mut().zip(x.iter()).for_each(|(o, &v)| *o = ca * v);
        if tall {
            matmul(&mut out, x, &a2, MatmulShape::new(rows, cols, cols, false, false), true);
        } else {
            matmul(&mut out, &a2, x, MatmulShape::new(rows, rows, cols, false, false), true);
        }
        x.copy_from_slice(&out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polar Express drives the singular values of a normalised matrix towards ~1: X X^T ~ I for
    /// a wide matrix (the coefficients aim for a band around 1, not exactly 1).
    #[test]
    fn polar_express_orthogonalises() {
        let (rows, cols) = (8, 20);
        let mut state = 12345u64;
        let mut x: Vec<f32> = (0..rows * cols)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        let s = 1.0 / (frobenius(&x) * 1.01 + 1e-6);
        x.iter_mut().for_each(|v| *v *= s);
        polar_express(&mut x, rows, cols, 5);
        let mut g = vec![0.0; rows * rows];
        matmul(&mut g, &x, &x, MatmulShape::new(rows, cols, rows, false, true), false);
        for i in 0..rows {
            for j in 0..rows {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (g[i * rows + j] - want).abs() < 0.35,
                    "gram[{i}][{j}] = {}",
                    g[i * rows + j]
                );
            }
        }
    }
}

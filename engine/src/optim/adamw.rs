//! AdamW with decoupled weight decay, in the fused form nanochat uses (docs/reference.md §6).

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f32,
    pub betas: (f32, f32),
    pub eps: f32,
    pub weight_decay: f32,
}

/// One step at 1-based step `t`: p *= 1 - lr wd; m = lerp(m, g, 1-b1); v = lerp(v, g^2, 1-b2);
/// p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps). All buffers (n).
pub fn adamw_update(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamWHyper,
    t: u64,
) {
    debug_assert!(p.len() == g.len() && g.len() == m.len() && m.len() == v.len());
    let (b1, b2) = hp.betas;
    let t = t.min(i32::MAX as u64) as i32;
    let bias1 = 1.0 - b1.powi(t);
    let bias2 = 1.0 - b2.powi(t);
    let decay = 1.0 - hp.lr * hp.weight_decay;
    let step = hp.lr / bias1;
    for i in 0..p.len() {
        let gi = g[i];
        m[i] += (1.0 - b1) * (gi - m[i]);
        v[i] += (1.0 - b2) * (gi * gi - v[i]);
        let denom = (v[i] / bias2).sqrt() + hp.eps;
        p[i] = p[i] * decay - step * m[i] / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first step of Adam moves every weight by about lr * sign(g) (m / sqrt(v) = g / |g|).
    #[test]
    fn first_step_is_sign_descent() {
        let hp = AdamWHyper { lr: 0.1, betas: (0.8, 0.95), eps: 1e-10, weight_decay: 0.0 };
        let mut p = vec![1.0, -2.0, 0.5];
        let g = [0.3, -4.0, 1e-3];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        adamw_update(&mut p, &g, &mut m, &mut v, hp, 1);
        for (got, want) in p.iter().zip([0.9, -1.9, 0.4]) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let hp = AdamWHyper { lr: 0.5, betas: (0.9, 0.99), eps: 1e-8, weight_decay: 0.1 };
        let mut p = vec![2.0];
        let (mut m, mut v) = (vec![0.0], vec![0.0]);
        adamw_update(&mut p, &[0.0], &mut m, &mut v, hp, 1);
        assert!((p[0] - 2.0 * (1.0 - 0.05)).abs() < 1e-6);
    }
}

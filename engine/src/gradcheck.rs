//! Finite-difference checks of every op's backward, on random ragged shapes with a seeded RNG.
//!
//! Each check builds L = sum(op(inputs) * W) for a fixed random W, takes d L / d input from
//! `backward`, and compares it with central differences (f32 forward, eps = 1e-2, the sum
//! accumulated in f64). Tolerance: |analytic - numeric| <= 2e-3 + 2e-2 * |numeric|; a wrong rule
//! is off by O(1), f32 rounding of the forward contributes ~1e-4 here.
use crate::{Ids, RMSNORM_EPS, Reduction, Result, RopeTable, Tensor, no_grad};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const EPS: f32 = 1e-2;

/// Check `f`'s gradient w.r.t. each input of the given shapes. At most `max_coords` coordinates
/// per input are probed (spread over the buffer).
fn gradcheck(name: &str, shapes: &[&[usize]], seed: u64, f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let mut rng = Rng(seed);
    let data: Vec<Vec<f32>> = shapes.iter().map(|s| rng.vec(s.iter().product())).collect();
    let params: Vec<Tensor> = data
        .iter()
        .zip(shapes)
        .map(|(d, s)| Tensor::param(d.clone(), s).expect("valid shape"))
        .collect();
    let out = f(&params).expect("forward");
    let w = rng.vec(out.numel());
    let wt = Tensor::from_vec(w.clone(), out.shape()).expect("valid shape");
    let grads = out.mul(&wt).expect("same shape").sum().expect("sum").backward().expect("backward");

    let loss_at = |inputs: &[Vec<f32>]| -> f64 {
        let _g = no_grad();
        let ts: Vec<Tensor> = inputs
            .iter()
            .zip(shapes)
            .map(|(d, s)| Tensor::from_vec(d.clone(), s).unwrap())
            .collect();
        let o = f(&ts).expect("forward");
        o.to_vec().iter().zip(&w).map(|(&o, &w)| o as f64 * w as f64).sum()
    };
    let max_coords = 40;
    for (which, p) in params.iter().enumerate() {
        let n = p.numel();
        let analytic = grads.get(p).map(Tensor::to_vec).unwrap_or_else(|| vec![0.0; n]);
        let step = n.div_ceil(max_coords).max(1);
        for idx in (0..n).step_by(step).chain([n.saturating_sub(1)]).filter(|_| n > 0) {
            let mut inputs = data.clone();
            inputs[which][idx] += EPS;
            let up = loss_at(&inputs);
            inputs[which][idx] -= 2.0 * EPS;
            let down = loss_at(&inputs);
            let num = (up - down) / (2.0 * EPS as f64);
            let got = analytic[idx] as f64;
            assert!(
                (got - num).abs() <= 2e-3 + 2e-2 * num.abs(),
                "{name}: input {which} {:?} coord {idx}: analytic {got} vs numeric {num}",
                shapes[which]
            );
        }
    }
}

#[test]
fn broadcasting_binary_ops() {
    let cases: [(&[usize], &[usize]); 6] = [
        (&[3, 5], &[3, 5]),
        (&[1], &[2, 3, 4]),             // resid_lambdas[i] * x
        (&[2, 3, 2, 1], &[2, 3, 2, 5]), // gate * ve
        (&[3, 4], &[2, 3, 4]),
        (&[2, 1, 4], &[1, 3, 1]),
        (&[], &[7]),
    ];
    for (i, (a, b)) in cases.iter().enumerate() {
        let seed = 10 + i as u64;
        gradcheck("add", &[a, b], seed, |x| x[0].add(&x[1]));
        gradcheck("sub", &[a, b], seed, |x| x[0].sub(&x[1]));
        gradcheck("sub rev", &[b, a], seed, |x| x[0].sub(&x[1]));
        gradcheck("mul", &[a, b], seed, |x| x[0].mul(&x[1]));
        gradcheck("mul rev", &[b, a], seed, |x| x[0].mul(&x[1]));
    }
    // The same tensor on both sides: d(x*x) = 2x.
    gradcheck("square", &[&[4, 3]], 1, |x| x[0].mul(&x[0]));
}

#[test]
fn unary_ops() {
    let s: &[usize] = &[3, 7];
    gradcheck("scale", &[s], 2, |x| x[0].scale(-1.7));
    gradcheck("relu2", &[s], 3, |x| x[0].relu2());
    gradcheck("sigmoid", &[s], 4, |x| x[0].scale(3.0)?.sigmoid());
    gradcheck("tanh", &[s], 5, |x| x[0].scale(2.0)?.tanh());
    gradcheck("softcap", &[s], 6, |x| x[0].scale(20.0)?.softcap(15.0));
    gradcheck("softmax", &[&[2, 3, 5]], 7, |x| x[0].scale(3.0)?.softmax());
    gradcheck("log_softmax", &[&[4, 6]], 8, |x| x[0].scale(3.0)?.log_softmax());
}

#[test]
fn linear_op() {
    gradcheck("linear 2d", &[&[5, 4], &[3, 4]], 20, |x| x[0].linear(&x[1]));
    gradcheck("linear 3d", &[&[2, 3, 6], &[5, 6]], 21, |x| x[0].linear(&x[1]));
}

#[test]
fn rmsnorm_op() {
    gradcheck("rmsnorm", &[&[2, 3, 9]], 30, |x| x[0].rmsnorm(RMSNORM_EPS));
    gradcheck("rmsnorm c=5", &[&[4, 5]], 31, |x| x[0].rmsnorm(RMSNORM_EPS));
}

#[test]
fn rope_op() {
    let table = RopeTable::new(16, 6, 100000.0).unwrap();
    gradcheck("rope", &[&[2, 3, 2, 6]], 40, |x| x[0].rope(&table, 0));
    gradcheck("rope pos0", &[&[1, 4, 3, 6]], 41, |x| x[0].rope(&table, 9));
    // Also the values: position 0 is the identity.
    let x = Tensor::from_vec((0..12).map(|i| i as f32).collect(), &[1, 1, 2, 6]).unwrap();
    assert_eq!(x.rope(&table, 0).unwrap().to_vec(), x.to_vec());
}

#[test]
fn shape_ops() {
    let s: &[usize] = &[2, 5, 3];
    gradcheck("narrow last", &[s], 50, |x| x[0].narrow(-1, 1, 2));
    gradcheck("narrow mid", &[s], 51, |x| x[0].narrow(1, 1, 4)); // x[:, 1:]
    gradcheck("narrow first", &[s], 52, |x| x[0].narrow(0, 1, 1));
    gradcheck("narrow whole", &[s], 61, |x| x[0].narrow(-1, 0, 3));
    gradcheck("select", &[&[4]], 53, |x| x[0].select(0, 2));
    gradcheck("cat", &[&[2, 1, 3], &[2, 4, 3], &[2, 2, 3]], 54, |x| Tensor::cat(x, 1));
    gradcheck("cat last", &[&[3, 2], &[3, 5]], 55, |x| Tensor::cat(x, -1));
    gradcheck("reshape", &[s], 56, |x| x[0].reshape(&[5, 6])?.narrow(0, 1, 3));
    gradcheck("sum", &[s], 57, |x| x[0].sum());
    gradcheck("mean", &[s], 58, |x| x[0].mean());
    gradcheck("sum_dim", &[s], 59, |x| x[0].sum_dim(1, false));
    gradcheck("mean_dim keep", &[s], 60, |x| x[0].mean_dim(-1, true));
}

#[test]
fn embedding_op() {
    // Repeated ids exercise the scatter-add.
    let ids = Ids::new(vec![3, 0, 3, 5, 1, 3], &[2, 3]).unwrap();
    gradcheck("embedding", &[&[6, 4]], 70, |x| Tensor::embedding(&x[0], &ids));
    let out = Tensor::embedding(&Tensor::zeros(&[6, 4]), &ids).unwrap();
    assert_eq!(out.shape(), &[2, 3, 4]);
}

#[test]
fn attention_op() {
    let mut rng = Rng(80);
    for case in 0..6 {
        let (b, h_kv) = (1 + rng.below(2), 1 + rng.below(2));
        let h = h_kv * (1 + rng.below(2));
        let (tq, d) = (1 + rng.below(5), 1 + rng.below(6));
        let pos0 = if case % 2 == 0 { 0 } else { rng.below(4) };
        let window = if case % 3 == 0 { usize::MAX } else { rng.below(4) };
        let tk = pos0 + tq;
        let (qs, ks) = ([b, tq, h, d], [b, tk, h_kv, d]);
        gradcheck("attention", &[&qs, &ks, &ks], 81 + case, |x| {
            Tensor::attention(&x[0], &x[1], &x[2], window, pos0)
        });
    }
}

#[test]
fn attention_op_matches_reference_kernel() {
    // The op runs flash attention (tiled, or split-K for a few query rows); the reference
    // kernel must agree, across several 64-row blocks, GQA, a window and a decode step.
    use femtochat_kernels::cpu::attention::{AttnShape, attention_forward};
    let mut rng = Rng(11);
    for (tq, pos0, h, hkv, d, window) in
        [(130, 0, 4, 2, 16, usize::MAX), (100, 0, 3, 1, 24, 37), (1, 300, 4, 2, 16, usize::MAX)]
    {
        let tk = pos0 + tq;
        let q = Tensor::from_vec(rng.vec(tq * h * d), &[1, tq, h, d]).unwrap();
        let k = Tensor::from_vec(rng.vec(tk * hkv * d), &[1, tk, hkv, d]).unwrap();
        let v = Tensor::from_vec(rng.vec(tk * hkv * d), &[1, tk, hkv, d]).unwrap();
        let got = Tensor::attention(&q, &k, &v, window, pos0).unwrap().to_vec();
        let s = AttnShape { b: 1, tq, tk, h, hkv, d, window, pos0 };
        let (mut want, mut lse) = (vec![0.0; got.len()], vec![0.0; tq * h]);
        attention_forward(&mut want, &mut lse, &q.to_vec(), &k.to_vec(), &v.to_vec(), s);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{s:?}: {a} vs {b}");
        }
    }
}

#[test]
fn cross_entropy_op() {
    let targets = [2, -1, 0, 4, 4];
    gradcheck("ce mean", &[&[5, 6]], 90, |x| {
        x[0].scale(3.0)?.cross_entropy(&targets, Reduction::Mean)
    });
    gradcheck("ce none", &[&[5, 6]], 91, |x| {
        x[0].scale(3.0)?.cross_entropy(&targets, Reduction::None)
    });
    let logits = Tensor::from_vec(vec![0.0; 10], &[2, 5]).unwrap();
    let loss = logits.cross_entropy(&[1, -1], Reduction::Mean).unwrap().item().unwrap();
    assert!((loss - 5f32.ln()).abs() < 1e-6);
}

/// A tiny chain shaped like one nanochat block (smear-free): scalars times residuals, rmsnorm,
/// q/k/v projections, value-embedding gate, rope, qk-norm, GQA attention with a window, output
/// projection, relu² MLP, softcapped logits and a cross-entropy with an ignored target.
#[test]
fn transformer_block_composite() {
    let (b, t, c, h, hkv, d, v) = (2, 5, 8, 2, 1, 4, 11);
    let table = RopeTable::new(t, d, 100000.0).unwrap();
    let ids = Ids::new((0..(b * t) as u32).map(|i| (i * 7) % v as u32).collect(), &[b, t]).unwrap();
    let targets: Vec<i32> =
        (0..(b * t) as i32).map(|i| if i == 3 { -1 } else { (i * 5) % (v as i32 - 1) }).collect();
    let shapes: Vec<Vec<usize>> = vec![
        vec![v, c],       // 0 wte
        vec![2],          // 1 resid_lambdas
        vec![2],          // 2 x0_lambdas
        vec![h * d, c],   // 3 c_q
        vec![hkv * d, c], // 4 c_k
        vec![hkv * d, c], // 5 c_v
        vec![v, hkv * d], // 6 value embedding
        vec![hkv, 3],     // 7 ve_gate
        vec![c, c],       // 8 c_proj
        vec![4 * c, c],   // 9 c_fc
        vec![c, 4 * c],   // 10 mlp c_proj
        vec![v, c],       // 11 lm_head
    ];
    let shapes: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
    gradcheck("block", &shapes, 100, |p| {
        let x = Tensor::embedding(&p[0], &ids)?.rmsnorm(RMSNORM_EPS)?;
        let x0 = x.clone();
        let x = p[1].select(0, 1)?.mul(&x)?.add(&p[2].narrow(0, 1, 1)?.mul(&x0)?)?;
        let a = x.rmsnorm(RMSNORM_EPS)?;
        let q = a.linear(&p[3])?.reshape(&[b, t, h, d])?;
        let k = a.linear(&p[4])?.reshape(&[b, t, hkv, d])?;
        let vv = a.linear(&p[5])?.reshape(&[b, t, hkv, d])?;
        let ve = Tensor::embedding(&p[6], &ids)?.reshape(&[b, t, hkv, d])?;
        let gate = x.narrow(-1, 0, 3)?.linear(&p[7])?.sigmoid()?.scale(3.0)?;
        let vv = vv.add(&gate.reshape(&[b, t, hkv, 1])?.mul(&ve)?)?;
        let q = q.rope(&table, 0)?.rmsnorm(RMSNORM_EPS)?.scale(1.2)?;
        let k = k.rope(&table, 0)?.rmsnorm(RMSNORM_EPS)?.scale(1.2)?;
        let y = Tensor::attention(&q, &k, &vv, 2, 0)?.reshape(&[b, t, h * d])?.linear(&p[8])?;
        let x = x.add(&y)?;
        let m = x.rmsnorm(RMSNORM_EPS)?.linear(&p[9])?.relu2()?.linear(&p[10])?;
        let x = x.add(&m)?;
        let logits = x.rmsnorm(RMSNORM_EPS)?.linear(&p[11])?.narrow(-1, 0, v - 1)?.softcap(15.0)?;
        logits.reshape(&[b * t, v - 1])?.cross_entropy(&targets, Reduction::Mean)
    });
}

#[test]
fn errors_not_panics() {
    let a = Tensor::zeros(&[2, 3]);
    assert!(Tensor::from_vec(vec![1.0; 5], &[2, 3]).is_err());
    assert!(a.add(&Tensor::zeros(&[3, 2])).is_err());
    assert!(a.narrow(2, 0, 1).is_err());
    assert!(a.narrow(-3, 0, 1).is_err());
    assert!(a.narrow(1, 2, 2).is_err());
    assert!(a.narrow(1, 2, usize::MAX).is_err());
    assert!(a.reshape(&[usize::MAX, 3]).is_err());
    assert!(Tensor::from_vec(vec![], &[usize::MAX, 2]).is_err());
    let table = RopeTable::new(4, 2, 100000.0).unwrap();
    assert!(Tensor::zeros(&[1, 2, 1, 2]).rope(&table, usize::MAX).is_err());
    assert!(RopeTable::new(4, 3, 100000.0).is_err());
    assert!(a.reshape(&[4]).is_err());
    assert!(a.linear(&Tensor::zeros(&[4, 2])).is_err());
    assert!(a.item().is_err());
    assert!(Tensor::embedding(&a, &Ids::new(vec![2], &[1]).unwrap()).is_err());
    assert!(a.cross_entropy(&[0, 3], Reduction::Mean).is_err());
    assert!(a.cross_entropy(&[0], Reduction::Mean).is_err());
    assert!(Tensor::cat(&[], 0).is_err());
    assert!(Ids::from_i64(&[-2], &[1]).is_err());
    let q = Tensor::zeros(&[1, 2, 3, 4]);
    let kv = Tensor::zeros(&[1, 2, 2, 4]);
    assert!(Tensor::attention(&q, &kv, &kv, usize::MAX, 0).is_err()); // 3 % 2 heads
    let q = Tensor::zeros(&[1, 2, 2, 4]);
    assert!(Tensor::attention(&q, &kv, &kv, usize::MAX, 1).is_err()); // too few keys
    assert!(Tensor::zeros(&[2]).backward().is_err());
    assert!(Tensor::scalar(1.0).backward().is_err()); // not trainable
}

#[test]
fn empty_tensors_flow_through() {
    let e = Tensor::param(vec![], &[2, 0]).unwrap();
    let y = e
        .add(&e)
        .unwrap()
        .mul(&e)
        .unwrap()
        .relu2()
        .unwrap()
        .sigmoid()
        .unwrap()
        .softcap(3.0)
        .unwrap();
    let y = y.rmsnorm(RMSNORM_EPS).unwrap().softmax().unwrap().log_softmax().unwrap();
    let y = Tensor::cat(&[y.clone(), y], 1).unwrap().narrow(1, 0, 0).unwrap();
    assert_eq!(y.shape(), &[2, 0]);
    let grads = y.sum().unwrap().backward().unwrap();
    assert_eq!(grads.get(&e).unwrap().numel(), 0);
    let w = Tensor::param(vec![1.0; 6], &[3, 2]).unwrap();
    assert_eq!(Tensor::zeros(&[0, 2]).linear(&w).unwrap().shape(), &[0, 3]);
    let ids = Ids::new(vec![], &[1, 0]).unwrap();
    assert_eq!(Tensor::embedding(&w, &ids).unwrap().shape(), &[1, 0, 2]);
    let q = Tensor::param(vec![], &[1, 0, 2, 4]).unwrap();
    let y = Tensor::attention(&q, &q, &q, usize::MAX, 0).unwrap();
    assert!(y.sum().unwrap().backward().is_ok());
}

#[test]
fn no_grad_records_nothing() {
    let p = Tensor::param(vec![1.0, 2.0], &[2]).unwrap();
    {
        let _g = no_grad();
        let y = p.scale(2.0).unwrap().sum().unwrap();
        assert!(!y.requires_grad());
        assert!(y.backward().is_err());
    }
    let y = p.scale(2.0).unwrap().sum().unwrap();
    assert!(y.requires_grad());
    let grads = y.backward().unwrap();
    assert_eq!(grads.get(&p).unwrap().to_vec(), vec![2.0, 2.0]);
}

#[test]
fn deep_chain_has_no_recursion_limit() {
    let p = Tensor::param(vec![1.0], &[1]).unwrap();
    let mut x = p.clone();
    for _ in 0..200_000 {
        x = x.scale(1.0).unwrap();
    }
    let grads = x.sum().unwrap().backward().unwrap();
    assert_eq!(grads.get(&p).unwrap().to_vec(), vec![1.0]);
}

#[test]
fn leaf_update_and_grad_accumulation() {
    let p = Tensor::param(vec![1.0, 2.0, 3.0], &[3]).unwrap();
    let mut grads = p.mul(&p).unwrap().sum().unwrap().backward().unwrap();
    grads.accumulate(p.sum().unwrap().backward().unwrap()).unwrap();
    assert_eq!(grads.get(&p).unwrap().to_vec(), vec![3.0, 5.0, 7.0]);
    p.with_data_mut(|d| d[0] = 10.0).unwrap();
    assert_eq!(p.to_vec(), vec![10.0, 2.0, 3.0]);
    assert!(p.scale(1.0).unwrap().with_data_mut(|_| ()).is_err());
}

#[test]
fn tensors_cross_threads() {
    // The server shares weights across request threads.
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tensor>();
    assert_send_sync::<crate::ParamStore>();
    assert_send_sync::<crate::Grads>();
}

#[test]
fn kv_cache_decode_matches_full_attention() {
    // Decode one token at a time against (1, T_max, Hkv, D) caches filled in place: each row
    // must equal the same row of one full causal pass.
    let (t, t_max, h, hkv, d, window) = (6, 10, 4, 2, 8, 3);
    let mut rng = Rng(7);
    let q = Tensor::from_vec(rng.vec(t * h * d), &[1, t, h, d]).unwrap();
    let k = Tensor::from_vec(rng.vec(t * hkv * d), &[1, t, hkv, d]).unwrap();
    let v = Tensor::from_vec(rng.vec(t * hkv * d), &[1, t, hkv, d]).unwrap();
    let full = Tensor::attention(&q, &k, &v, window, 0).unwrap().to_vec();
    let _g = no_grad();
    let (kc, vc) = (Tensor::zeros(&[1, t_max, hkv, d]), Tensor::zeros(&[1, t_max, hkv, d]));
    let row = hkv * d;
    for pos in 0..t {
        let (kd, vd) = (k.to_vec(), v.to_vec());
        kc.with_data_mut(|c| {
            c[pos * row..(pos + 1) * row].copy_from_slice(&kd[pos * row..][..row])
        })
        .unwrap();
        vc.with_data_mut(|c| {
            c[pos * row..(pos + 1) * row].copy_from_slice(&vd[pos * row..][..row])
        })
        .unwrap();
        let qt = q.narrow(1, pos, 1).unwrap();
        let y = Tensor::attention(&qt, &kc, &vc, window, pos).unwrap().to_vec();
        for (a, b) in y.iter().zip(&full[pos * h * d..(pos + 1) * h * d]) {
            assert!((a - b).abs() < 1e-5, "pos {pos}: {a} vs {b}");
        }
    }
}

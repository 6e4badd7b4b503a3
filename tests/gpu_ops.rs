//! Every engine op's forward and backward on the GPU (lavapipe in CI) against its CPU twin, on
//! ragged shapes, and the GPU optimizer kernels (AdamW, Muon) against the CPU update over
//! several steps. Each op runs in a graph `loss = sum(op(inputs) * r)` with a random `r`, so the
//! backward sees a non-uniform upstream gradient.
use femtochat::engine::{
    Device, GroupKind, Ids, MuonAdamW, ParamGroup, ParamStore, Reduction, RopeTable, Tensor,
};

fn gpu() -> bool {
    match Device::Gpu.ensure_available() {
        Ok(()) => true,
        Err(e) => {
            assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
            false
        }
    }
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

type OpFn = dyn Fn(&[Tensor]) -> femtochat::engine::Result<Tensor>;

/// Run `f` on both devices from the same inputs; compare the output and every input gradient.
fn check(name: &str, inputs: &[Vec<usize>], f: &OpFn) {
    check_tol(name, inputs, f, 2e-5);
}

fn check_tol(name: &str, inputs: &[Vec<usize>], f: &OpFn, tol: f64) {
    let data: Vec<Vec<f32>> =
        inputs.iter().enumerate().map(|(i, s)| rand(s.iter().product(), 17 + i as u64)).collect();
    let run = |device: Device| {
        let xs: Vec<Tensor> = inputs
            .iter()
            .zip(&data)
            .map(|(s, d)| Tensor::param(d.clone(), s).unwrap().to_device(device).unwrap())
            .collect();
        let y = f(&xs).unwrap();
        let r =
            Tensor::from_vec(rand(y.numel(), 99), y.shape()).unwrap().to_device(device).unwrap();
        let loss = y.mul(&r).unwrap().sum().unwrap();
        let grads = loss.backward().unwrap();
        let gs: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| match grads.get(x) {
                Some(g) => g.try_to_vec().unwrap(),
                None => vec![0.0; x.numel()],
            })
            .collect();
        (y.try_to_vec().unwrap(), gs)
    };
    let (y_cpu, g_cpu) = run(Device::Cpu);
    let (y_gpu, g_gpu) = run(Device::Gpu);
    let e = rel(&y_gpu, &y_cpu);
    assert!(e < tol, "{name}: forward rel err {e:.2e}");
    for (i, (a, b)) in g_gpu.iter().zip(&g_cpu).enumerate() {
        assert!(b.iter().any(|&v| v != 0.0), "{name}: input {i} has no gradient on the CPU");
        let e = rel(a, b);
        assert!(e < tol, "{name}: gradient of input {i} rel err {e:.2e}");
    }
}

#[test]
fn elementwise_ops_forward_and_backward_match_cpu() {
    if !gpu() {
        return;
    }
    let s = vec![3, 5, 7];
    check("add", &[s.clone(), s.clone()], &|x| x[0].add(&x[1]));
    check("add broadcast", &[s.clone(), vec![1, 5, 1]], &|x| x[0].add(&x[1]));
    check("sub broadcast", &[s.clone(), vec![7]], &|x| x[0].sub(&x[1]));
    check("mul broadcast", &[s.clone(), vec![3, 1, 7]], &|x| x[0].mul(&x[1]));
    check("scale", std::slice::from_ref(&s), &|x| x[0].scale(-1.7));
    check("relu2", std::slice::from_ref(&s), &|x| x[0].relu2());
    check("sigmoid", std::slice::from_ref(&s), &|x| x[0].scale(3.0)?.sigmoid());
    check("tanh", std::slice::from_ref(&s), &|x| x[0].scale(2.0)?.tanh());
    check("softcap", std::slice::from_ref(&s), &|x| x[0].scale(40.0)?.softcap(15.0));
}

#[test]
fn row_ops_forward_and_backward_match_cpu() {
    if !gpu() {
        return;
    }
    check("softmax", &[vec![6, 37]], &|x| x[0].scale(4.0)?.softmax());
    check("log_softmax", &[vec![6, 37]], &|x| x[0].scale(4.0)?.log_softmax());
    check("rmsnorm", &[vec![5, 3, 29]], &|x| x[0].rmsnorm(1e-6));
    check("linear", &[vec![2, 5, 19], vec![13, 19]], &|x| x[0].linear(&x[1]));
    let targets = vec![3, -1, 0, 36, 5, 11];
    let t = targets.clone();
    check("cross_entropy mean", &[vec![6, 37]], &move |x| x[0].cross_entropy(&t, Reduction::Mean));
    check("cross_entropy none", &[vec![6, 37]], &move |x| {
        x[0].cross_entropy(&targets, Reduction::None)
    });
}

#[test]
fn reductions_forward_and_backward_match_cpu() {
    if !gpu() {
        return;
    }
    check("sum", &[vec![4, 9, 5]], &|x| x[0].sum());
    check("mean", &[vec![4, 9, 5]], &|x| x[0].mean());
    for dim in [0isize, 1, 2, -1] {
        for keep in [false, true] {
            check(&format!("sum_dim {dim} {keep}"), &[vec![4, 9, 5]], &move |x| {
                x[0].sum_dim(dim, keep)
            });
            check(&format!("mean_dim {dim} {keep}"), &[vec![4, 9, 5]], &move |x| {
                x[0].mean_dim(dim, keep)
            });
        }
    }
}

#[test]
fn shape_ops_forward_and_backward_match_cpu() {
    if !gpu() {
        return;
    }
    check("narrow", &[vec![3, 10, 6]], &|x| x[0].narrow(1, 2, 5));
    check("narrow last", &[vec![3, 10, 6]], &|x| x[0].narrow(-1, 1, 4));
    check("select", &[vec![3, 10, 6]], &|x| x[0].select(1, 7));
    check("cat", &[vec![3, 4, 6], vec![3, 2, 6]], &|x| {
        Tensor::cat(&[x[0].clone(), x[1].clone()], 1)
    });
    check("cat last", &[vec![3, 4, 6], vec![3, 4, 1]], &|x| {
        Tensor::cat(&[x[0].clone(), x[1].clone()], -1)
    });
    check("reshape", &[vec![3, 4, 6]], &|x| x[0].reshape(&[12, 6])?.scale(2.0));
    let ids = Ids::new(vec![0, 5, 2, 5, 9, 1, 0], &[7]).unwrap();
    check("embedding", &[vec![11, 13]], &move |x| Tensor::embedding(&x[0], &ids));
}

#[test]
fn rope_and_attention_forward_and_backward_match_cpu() {
    if !gpu() {
        return;
    }
    let table = RopeTable::new(64, 8, 100_000.0).unwrap();
    let t2 = table.clone();
    check("rope", &[vec![2, 5, 3, 8]], &move |x| x[0].rope(&table, 0));
    check("rope at 7", &[vec![2, 5, 3, 8]], &move |x| x[0].rope(&t2, 7));
    // GQA 4:2, a window shorter than the sequence, ragged lengths.
    check_tol(
        "attention",
        &[vec![2, 11, 4, 8], vec![2, 11, 2, 8], vec![2, 11, 2, 8]],
        &|x| Tensor::attention(&x[0], &x[1], &x[2], 5, 0),
        5e-5,
    );
}

/// MuonAdamW's GPU kernels (AdamW and Muon with NorMuon and cautious weight decay) against the
/// CPU update: three steps with the same gradients, every parameter compared after each.
#[test]
fn optimizer_steps_match_cpu() {
    if !gpu() {
        return;
    }
    let shapes: [(&str, Vec<usize>); 5] = [
        ("wide", vec![24, 40]),
        ("tall", vec![40, 24]),
        ("tall2", vec![40, 24]),
        ("vec", vec![37]),
        ("table", vec![13, 9]),
    ];
    let groups = || {
        vec![
            ParamGroup {
                kind: GroupKind::AdamW { betas: (0.8, 0.95), eps: 1e-10 },
                lr: 0.01,
                initial_lr: 0.01,
                weight_decay: 0.05,
                params: vec!["vec".into(), "table".into()],
            },
            ParamGroup {
                kind: GroupKind::Muon { momentum: 0.9, beta2: 0.9, ns_steps: 5 },
                lr: 0.02,
                initial_lr: 0.02,
                weight_decay: 0.2,
                params: vec!["wide".into()],
            },
            ParamGroup {
                kind: GroupKind::Muon { momentum: 0.9, beta2: 0.9, ns_steps: 5 },
                lr: 0.02,
                initial_lr: 0.02,
                weight_decay: 0.2,
                params: vec!["tall".into(), "tall2".into()],
            },
        ]
    };
    let run = |device: Device| {
        let mut ps = ParamStore::new();
        for (i, (n, s)) in shapes.iter().enumerate() {
            let t = Tensor::param(rand(s.iter().product(), i as u64), s).unwrap();
            ps.insert(*n, t.to_device(device).unwrap());
        }
        let mut opt = MuonAdamW::new(groups(), &ps).unwrap();
        let mut after = Vec::new();
        for step in 0..3u64 {
            opt.step_with(&ps, |p, n| {
                let k = shapes.iter().position(|(m, _)| *m == n).unwrap() as u64;
                Some(rand(p.numel(), 1000 + 10 * step + k))
            })
            .unwrap();
            after.push(ps.iter().map(|(_, t)| t.try_to_vec().unwrap()).collect::<Vec<_>>());
        }
        after
    };
    let (cpu, gpu) = (run(Device::Cpu), run(Device::Gpu));
    for (step, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        for (k, (a, b)) in g.iter().zip(c).enumerate() {
            let e = rel(a, b);
            assert!(e < 1e-5, "step {step}, parameter {k}: rel err {e:.2e}");
        }
    }
}

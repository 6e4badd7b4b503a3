//! Every GPU kernel against its CPU twin on random and ragged shapes (runs on lavapipe in CI).
//! Without an adapter these tests fail, unless FEMTOCHAT_SKIP_GPU=1 (for local machines).
use femtochat_kernels::cpu;
use femtochat_kernels::cpu::matmul::MatmulShape;
use femtochat_kernels::gpu::{self, GpuContext};

fn ctx() -> Option<&'static GpuContext> {
    match GpuContext::get() {
        Ok(c) => Some(c),
        Err(e) if std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1") => {
            eprintln!("skipping GPU test: {e}");
            None
        }
        Err(e) => panic!("{e} (set FEMTOCHAT_SKIP_GPU=1 to skip GPU tests locally)"),
    }
}

/// Deterministic values in [-1, 1) from a 64-bit LCG.
fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: gpu {g} vs cpu {w}");
    }
}

#[test]
fn matmul_matches_cpu_all_transposes_ragged_batched() {
    let Some(ctx) = ctx() else { return };
    for &(batch, m, k, n) in &[(1, 1, 1, 1), (1, 64, 64, 64), (2, 37, 19, 71), (3, 5, 130, 9)] {
        for ta in [false, true] {
            for tb in [false, true] {
                for acc in [false, true] {
                    let s = MatmulShape::new(m, k, n, ta, tb);
                    let (a, b) = (rand(batch * m * k, 1), rand(batch * k * n, 2));
                    let c0 = rand(batch * m * n, 3);
                    let mut want = c0.clone();
                    cpu::matmul::matmul_batched(&mut want, &a, &b, batch, s, acc);
                    let (ga, gb, gc) = (
                        ctx.upload(&a).unwrap(),
                        ctx.upload(&b).unwrap(),
                        ctx.upload(&c0).unwrap(),
                    );
                    let mut bt = ctx.batch();
                    gpu::matmul::matmul_batched(&mut bt, &gc, &ga, &gb, batch, s, acc).unwrap();
                    bt.submit();
                    let got: Vec<f32> = gc.to_vec().unwrap();
                    assert_close(
                        &format!("matmul {batch}x{m}x{k}x{n} {ta} {tb} {acc}"),
                        &got,
                        &want,
                        1e-4,
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_rejects_wrong_lengths() {
    let Some(ctx) = ctx() else { return };
    let (a, b, c) = (ctx.zeros(6).unwrap(), ctx.zeros(6).unwrap(), ctx.zeros(5).unwrap());
    let mut bt = ctx.batch();
    let s = MatmulShape::new(2, 3, 2, false, false);
    assert!(gpu::matmul::matmul(&mut bt, &c, &a, &b, s, false).is_err());
}

#[test]
fn elementwise_matches_cpu() {
    let Some(ctx) = ctx() else { return };
    for n in [1usize, 255, 1000, 70_001] {
        let (x, g, d0) = (rand(n, 4), rand(n, 5), rand(n, 6));
        let (gx, gg) = (ctx.upload(&x).unwrap(), ctx.upload(&g).unwrap());
        let (out, dinp) = (ctx.zeros(n).unwrap(), ctx.upload(&d0).unwrap());
        // scale
        let mut bt = ctx.batch();
        gpu::elementwise::scale_forward(&mut bt, &out, &gx, 1.5).unwrap();
        gpu::elementwise::scale_backward(&mut bt, &dinp, &gg, 1.5).unwrap();
        bt.submit();
        let (mut w, mut wd) = (vec![0.0; n], d0.clone());
        cpu::elementwise::scale_forward(&mut w, &x, 1.5);
        cpu::elementwise::scale_backward(&mut wd, &g, 1.5);
        assert_close("scale fwd", &out.to_vec::<f32>().unwrap(), &w, 1e-6);
        assert_close("scale bwd", &dinp.to_vec::<f32>().unwrap(), &wd, 1e-6);
        // relu2, backward from the saved input
        let dinp = ctx.upload(&d0).unwrap();
        let mut bt = ctx.batch();
        gpu::elementwise::relu2_forward(&mut bt, &out, &gx).unwrap();
        gpu::elementwise::relu2_backward(&mut bt, &dinp, &gg, &gx).unwrap();
        bt.submit();
        let (mut w, mut wd) = (vec![0.0; n], d0.clone());
        cpu::elementwise::relu2_forward(&mut w, &x);
        cpu::elementwise::relu2_backward(&mut wd, &g, &x);
        assert_close("relu2 fwd", &out.to_vec::<f32>().unwrap(), &w, 1e-6);
        assert_close("relu2 bwd", &dinp.to_vec::<f32>().unwrap(), &wd, 1e-6);
        // softcap with inputs well past the cap, backward from the saved output
        let big: Vec<f32> = x.iter().map(|v| v * 40.0).collect();
        let gbig = ctx.upload(&big).unwrap();
        let dinp = ctx.upload(&d0).unwrap();
        let mut bt = ctx.batch();
        gpu::elementwise::softcap_forward(&mut bt, &out, &gbig, 15.0).unwrap();
        gpu::elementwise::softcap_backward(&mut bt, &dinp, &gg, &out, 15.0).unwrap();
        bt.submit();
        let (mut w, mut wd) = (vec![0.0; n], d0.clone());
        cpu::elementwise::softcap_forward(&mut w, &big, 15.0);
        cpu::elementwise::softcap_backward(&mut wd, &g, &w, 15.0);
        assert_close("softcap fwd", &out.to_vec::<f32>().unwrap(), &w, 1e-4);
        assert_close("softcap bwd", &dinp.to_vec::<f32>().unwrap(), &wd, 1e-4);
    }
}

#[test]
fn rmsnorm_matches_cpu() {
    let Some(ctx) = ctx() else { return };
    let eps = cpu::rmsnorm::RMSNORM_EPS;
    for &(n, c) in &[(1usize, 1usize), (3, 7), (5, 256), (4, 1000)] {
        let (x, g, d0) = (rand(n * c, 7), rand(n * c, 8), rand(n * c, 9));
        let (gx, gg) = (ctx.upload(&x).unwrap(), ctx.upload(&g).unwrap());
        let (out, rstd, dinp) =
            (ctx.zeros(n * c).unwrap(), ctx.zeros(n).unwrap(), ctx.upload(&d0).unwrap());
        let mut bt = ctx.batch();
        gpu::rmsnorm::rmsnorm_forward(&mut bt, &out, &rstd, &gx, n, c, eps).unwrap();
        gpu::rmsnorm::rmsnorm_backward(&mut bt, &dinp, &gg, &gx, &rstd, n, c).unwrap();
        bt.submit();
        let (mut w, mut wr, mut wd) = (vec![0.0; n * c], vec![0.0; n], d0.clone());
        cpu::rmsnorm::rmsnorm_forward(&mut w, &mut wr, &x, n, c, eps);
        cpu::rmsnorm::rmsnorm_backward(&mut wd, &g, &x, &wr, n, c);
        assert_close("rmsnorm out", &out.to_vec::<f32>().unwrap(), &w, 1e-4);
        assert_close("rmsnorm rstd", &rstd.to_vec::<f32>().unwrap(), &wr, 1e-4);
        assert_close("rmsnorm dinp", &dinp.to_vec::<f32>().unwrap(), &wd, 1e-4);
    }
}

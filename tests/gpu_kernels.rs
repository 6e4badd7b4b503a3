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
    use gpu::matmul::MatmulTiling;
    let Some(ctx) = ctx() else { return };
    // The vec4 kernel needs 4 | the contiguous extents: the last three shapes are ragged in
    // M, N and K around multiples of 4 (partial tiles and K slices, several of them).
    let shapes = [
        (1, 1, 1, 1),
        (1, 64, 64, 64),
        (2, 37, 19, 71),
        (3, 5, 130, 9),
        (1, 129, 17, 131),
        (2, 132, 36, 260),
        (1, 260, 52, 136),
        (1, 4, 4, 4),
    ];
    use gpu::matmul::Vec4Slices;
    let v4 = |bk, stages| MatmulTiling::V4(Vec4Slices { bk, stages });
    // Every vec4 slice setting within lavapipe's 32 KiB of workgroup memory.
    let tilings = [
        MatmulTiling::T64,
        MatmulTiling::T128,
        MatmulTiling::V4_DEFAULT,
        v4(8, 1),
        v4(8, 2),
        v4(16, 2),
        v4(32, 1),
    ];
    for tiling in tilings {
        for &(batch, m, k, n) in &shapes {
            for (ta, tb, acc) in (0..8).map(|i| (i & 1 == 1, i & 2 == 2, i & 4 == 4)) {
                let s = MatmulShape::new(m, k, n, ta, tb);
                if matches!(tiling, MatmulTiling::V4(_)) && !MatmulTiling::vec4_fits(&s) {
                    let gc = ctx.zeros(batch * m * n).unwrap();
                    let (ga, gb) =
                        (ctx.zeros(batch * m * k).unwrap(), ctx.zeros(batch * k * n).unwrap());
                    let mut bt = ctx.batch();
                    let r = gpu::matmul::matmul_batched_with(
                        &mut bt, tiling, &gc, &ga, &gb, batch, s, acc,
                    );
                    assert!(r.is_err(), "V4 must refuse {s:?}");
                    continue;
                }
                let (a, b) = (rand(batch * m * k, 1), rand(batch * k * n, 2));
                let c0 = rand(batch * m * n, 3);
                let mut want = c0.clone();
                cpu::matmul::matmul_batched(&mut want, &a, &b, batch, s, acc);
                let (ga, gb, gc) =
                    (ctx.upload(&a).unwrap(), ctx.upload(&b).unwrap(), ctx.upload(&c0).unwrap());
                run(ctx, |bt| {
                    gpu::matmul::matmul_batched_with(bt, tiling, &gc, &ga, &gb, batch, s, acc)
                        .unwrap()
                });
                let tag = format!("matmul {tiling:?} {batch}x{m}x{k}x{n} {ta} {tb} {acc}");
                assert_close(&tag, &get(&gc), &want, 1e-4);
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
    // vec4 slice settings outside 8/16/32 x 1/2, or past the device's workgroup memory.
    use gpu::matmul::{MatmulTiling, Vec4Slices, matmul_batched_with};
    let (a, b, c) = (ctx.zeros(16).unwrap(), ctx.zeros(16).unwrap(), ctx.zeros(16).unwrap());
    let s = MatmulShape::new(4, 4, 4, false, false);
    let limit = ctx.device.limits().max_compute_workgroup_storage_size as usize;
    for v in [Vec4Slices { bk: 12, stages: 1 }, Vec4Slices { bk: 16, stages: 3 }] {
        let err = matmul_batched_with(&mut bt, MatmulTiling::V4(v), &c, &a, &b, 1, s, false);
        assert!(err.unwrap_err().to_string().contains("8, 16 or 32"));
    }
    let big = Vec4Slices { bk: 32, stages: 2 };
    if big.workgroup_bytes() > limit {
        let err = matmul_batched_with(&mut bt, MatmulTiling::V4(big), &c, &a, &b, 1, s, false);
        assert!(err.unwrap_err().to_string().contains("workgroup memory"));
    }
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

/// Upload, run `f` in one batch, submit.
fn run(ctx: &'static GpuContext, f: impl FnOnce(&mut gpu::Batch)) {
    let mut bt = ctx.batch();
    f(&mut bt);
    bt.submit();
}

fn get(b: &gpu::GpuBuffer) -> Vec<f32> {
    b.to_vec().unwrap()
}

#[test]
fn sigmoid_tanh_match_cpu() {
    let Some(ctx) = ctx() else { return };
    for n in [1usize, 300, 70_001] {
        let x: Vec<f32> = rand(n, 10).iter().map(|v| v * 30.0).collect();
        let (g, d0) = (rand(n, 11), rand(n, 12));
        let (gx, gg) = (ctx.upload(&x).unwrap(), ctx.upload(&g).unwrap());
        let (out, dinp) = (ctx.zeros(n).unwrap(), ctx.upload(&d0).unwrap());
        run(ctx, |bt| {
            gpu::elementwise::sigmoid_forward(bt, &out, &gx).unwrap();
            gpu::elementwise::sigmoid_backward(bt, &dinp, &gg, &out).unwrap();
        });
        let (mut w, mut wd) = (vec![0.0; n], d0.clone());
        cpu::elementwise::sigmoid_forward(&mut w, &x);
        cpu::elementwise::sigmoid_backward(&mut wd, &g, &w);
        assert_close("sigmoid fwd", &get(&out), &w, 1e-5);
        assert_close("sigmoid bwd", &get(&dinp), &wd, 1e-5);
        let dinp = ctx.upload(&d0).unwrap();
        run(ctx, |bt| {
            gpu::elementwise::tanh_forward(bt, &out, &gx).unwrap();
            gpu::elementwise::tanh_backward(bt, &dinp, &gg, &out).unwrap();
        });
        let (mut w, mut wd) = (vec![0.0; n], d0.clone());
        cpu::elementwise::tanh_forward(&mut w, &x);
        cpu::elementwise::tanh_backward(&mut wd, &g, &w);
        assert_close("tanh fwd", &get(&out), &w, 1e-5);
        assert_close("tanh bwd", &get(&dinp), &wd, 1e-5);
    }
}

#[test]
fn broadcast_binary_and_sum_to_shape_match_cpu() {
    use cpu::elementwise::Broadcast;
    let Some(ctx) = ctx() else { return };
    let cases: &[(&[usize], &[usize])] = &[
        (&[3, 5, 7], &[3, 5, 7]),
        (&[3, 5, 7], &[7]),
        (&[1], &[4, 9]),
        (&[2, 3, 4, 5], &[2, 3, 4, 1]),
        (&[2, 1, 4, 1], &[1, 3, 1, 5]),
        (&[], &[6, 2]),
    ];
    for (i, &(sa, sb)) in cases.iter().enumerate() {
        let bc = Broadcast::new(sa, sb).unwrap();
        let (na, nb, n) = (sa.iter().product(), sb.iter().product(), bc.numel());
        let (a, b, o0) = (rand(na, 20 + i as u64), rand(nb, 30), rand(n, 40));
        let (ga, gb) = (ctx.upload(&a).unwrap(), ctx.upload(&b).unwrap());
        type Cpu = fn(&mut [f32], &[f32], &[f32], &Broadcast, bool);
        type Gpu = fn(
            &mut gpu::Batch,
            &gpu::GpuBuffer,
            &gpu::GpuBuffer,
            &gpu::GpuBuffer,
            &Broadcast,
            bool,
        ) -> Result<(), gpu::GpuError>;
        let ops: [(&str, Cpu, Gpu); 3] = [
            ("add", cpu::elementwise::add_forward, gpu::elementwise::add_forward),
            ("sub", cpu::elementwise::sub_forward, gpu::elementwise::sub_forward),
            ("mul", cpu::elementwise::mul_forward, gpu::elementwise::mul_forward),
        ];
        for (name, c, g) in ops {
            for acc in [false, true] {
                let out = ctx.upload(&o0).unwrap();
                run(ctx, |bt| g(bt, &out, &ga, &gb, &bc, acc).unwrap());
                let mut want = o0.clone();
                c(&mut want, &a, &b, &bc, acc);
                assert_close(&format!("{name} {sa:?} {sb:?} {acc}"), &get(&out), &want, 1e-6);
            }
        }
        // The gradient of a broadcast operand: sum the full-shape gradient back to its shape.
        for (s, x0) in [(sa, rand(na, 50)), (sb, rand(nb, 51))] {
            let (gsrc, dst) = (ctx.upload(&o0).unwrap(), ctx.upload(&x0).unwrap());
            let out_shape = bc.out_shape.clone();
            run(ctx, |bt| gpu::reduce::sum_to_shape(bt, &dst, s, &gsrc, &out_shape, 0.5).unwrap());
            let mut want = x0.clone();
            cpu::reduce::sum_to_shape(&mut want, s, &o0, &out_shape, 0.5);
            assert_close(&format!("sum_to_shape {s:?} <- {out_shape:?}"), &get(&dst), &want, 1e-5);
        }
    }
}

#[test]
fn reductions_match_cpu() {
    let Some(ctx) = ctx() else { return };
    for &(outer, n, inner) in
        &[(1usize, 1usize, 1usize), (3, 5, 7), (2, 300, 1), (1, 4, 1000), (1, 3, 70_001)]
    {
        let x = rand(outer * n * inner, 60);
        let gx = ctx.upload(&x).unwrap();
        let out = ctx.zeros(outer * inner).unwrap();
        let total = ctx.upload(&[1.0f32]).unwrap();
        let d0 = rand(outer * n * inner, 61);
        let dinp = ctx.upload(&d0).unwrap();
        let dy = rand(outer * inner, 62);
        let gdy = ctx.upload(&dy).unwrap();
        run(ctx, |bt| {
            gpu::reduce::sum_dim_forward(bt, &out, &gx, outer, n, inner).unwrap();
            gpu::reduce::sum_all(bt, &total, &gx, 0.25, true).unwrap();
            gpu::reduce::sum_dim_backward(bt, &dinp, &gdy, outer, n, inner).unwrap();
        });
        let mut want = vec![0.0; outer * inner];
        cpu::reduce::sum_dim_forward(&mut want, &x, outer, n, inner);
        assert_close("sum_dim fwd", &get(&out), &want, 1e-5);
        let want_total = 1.0 + 0.25 * cpu::reduce::sum_all(&x) as f32;
        assert_close("sum_all", &get(&total), &[want_total], 1e-5);
        let mut wd = d0.clone();
        cpu::reduce::sum_dim_backward(&mut wd, &dy, outer, n, inner);
        assert_close("sum_dim bwd", &get(&dinp), &wd, 1e-6);
    }
}

#[test]
fn softmax_and_cross_entropy_match_cpu() {
    let Some(ctx) = ctx() else { return };
    for &(n, v) in &[(1usize, 1usize), (3, 7), (5, 300), (2, 5000)] {
        let x: Vec<f32> = rand(n * v, 70).iter().map(|x| x * 8.0).collect();
        let (g, d0) = (rand(n * v, 71), rand(n * v, 72));
        let (gx, gg) = (ctx.upload(&x).unwrap(), ctx.upload(&g).unwrap());
        type Fwd = fn(&mut [f32], &[f32], usize, usize);
        type Bwd = fn(&mut [f32], &[f32], &[f32], usize, usize);
        type GFwd = fn(
            &mut gpu::Batch,
            &gpu::GpuBuffer,
            &gpu::GpuBuffer,
            usize,
            usize,
        ) -> Result<(), gpu::GpuError>;
        type GBwd = fn(
            &mut gpu::Batch,
            &gpu::GpuBuffer,
            &gpu::GpuBuffer,
            &gpu::GpuBuffer,
            usize,
            usize,
        ) -> Result<(), gpu::GpuError>;
        let ops: [(&str, Fwd, Bwd, GFwd, GBwd); 2] = [
            (
                "softmax",
                cpu::softmax::softmax_forward,
                cpu::softmax::softmax_backward,
                gpu::softmax::softmax_forward,
                gpu::softmax::softmax_backward,
            ),
            (
                "log_softmax",
                cpu::softmax::log_softmax_forward,
                cpu::softmax::log_softmax_backward,
                gpu::softmax::log_softmax_forward,
                gpu::softmax::log_softmax_backward,
            ),
        ];
        for (name, cf, cb, gf, gb) in ops {
            let (out, dinp) = (ctx.zeros(n * v).unwrap(), ctx.upload(&d0).unwrap());
            run(ctx, |bt| {
                gf(bt, &out, &gx, n, v).unwrap();
                gb(bt, &dinp, &gg, &out, n, v).unwrap();
            });
            let (mut w, mut wd) = (vec![0.0; n * v], d0.clone());
            cf(&mut w, &x, n, v);
            cb(&mut wd, &g, &w, n, v);
            assert_close(&format!("{name} fwd {n}x{v}"), &get(&out), &w, 1e-4);
            assert_close(&format!("{name} bwd {n}x{v}"), &get(&dinp), &wd, 1e-4);
        }
        // cross-entropy with one ignored row
        let targets: Vec<i32> =
            (0..n).map(|i| if i == 1 { -1 } else { ((i * 7919) % v) as i32 }).collect();
        let dl = rand(n, 73);
        let (gt, gdl) = (ctx.upload(&targets).unwrap(), ctx.upload(&dl).unwrap());
        let (losses, lse, dlog) =
            (ctx.zeros(n).unwrap(), ctx.zeros(n).unwrap(), ctx.upload(&d0).unwrap());
        run(ctx, |bt| {
            gpu::softmax::cross_entropy_forward(bt, &losses, &lse, &gx, &gt, n, v).unwrap();
            gpu::softmax::cross_entropy_backward(bt, &dlog, &gdl, &gx, &lse, &gt, n, v).unwrap();
        });
        let (mut wl, mut wlse, mut wd) = (vec![0.0; n], vec![0.0; n], d0.clone());
        cpu::softmax::cross_entropy_forward(&mut wl, &mut wlse, &x, &targets, n, v);
        cpu::softmax::cross_entropy_backward(&mut wd, &dl, &x, &wlse, &targets, n, v);
        assert_close("ce losses", &get(&losses), &wl, 1e-4);
        assert_close("ce lse", &get(&lse), &wlse, 1e-4);
        assert_close("ce dlogits", &get(&dlog), &wd, 1e-4);
    }
}

#[test]
fn rope_matches_cpu() {
    use cpu::rope::RopeShape;
    let Some(ctx) = ctx() else { return };
    for s in [
        RopeShape { b: 1, t: 1, h: 1, d: 2, pos0: 0 },
        RopeShape { b: 2, t: 5, h: 3, d: 8, pos0: 0 },
        RopeShape { b: 1, t: 3, h: 2, d: 64, pos0: 17 },
    ] {
        let t_max = s.pos0 + s.t;
        let (mut cos, mut sin) = (vec![0.0; t_max * s.d / 2], vec![0.0; t_max * s.d / 2]);
        cpu::rope::rope_tables(&mut cos, &mut sin, t_max, s.d, 100000.0);
        let n = s.b * s.t * s.h * s.d;
        let (x, g, d0) = (rand(n, 80), rand(n, 81), rand(n, 82));
        let (gx, gg) = (ctx.upload(&x).unwrap(), ctx.upload(&g).unwrap());
        let (gc, gs) = (ctx.upload(&cos).unwrap(), ctx.upload(&sin).unwrap());
        let (out, dinp) = (ctx.zeros(n).unwrap(), ctx.upload(&d0).unwrap());
        run(ctx, |bt| {
            gpu::rope::rope_forward(bt, &out, &gx, &gc, &gs, s).unwrap();
            gpu::rope::rope_backward(bt, &dinp, &gg, &gc, &gs, s).unwrap();
        });
        let (mut w, mut wd) = (vec![0.0; n], d0.clone());
        cpu::rope::rope_forward(&mut w, &x, &cos, &sin, s);
        cpu::rope::rope_backward(&mut wd, &g, &cos, &sin, s);
        assert_close("rope fwd", &get(&out), &w, 1e-5);
        assert_close("rope bwd", &get(&dinp), &wd, 1e-5);
    }
}

#[test]
fn embedding_and_copy_block_match_cpu() {
    use cpu::slice::BlockView;
    let Some(ctx) = ctx() else { return };
    let (v, c) = (11usize, 13usize);
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 7 + i / 3) % v as u32).collect();
    let (w, g, d0) = (rand(v * c, 90), rand(ids.len() * c, 91), rand(v * c, 92));
    let (gw, gg, gids) =
        (ctx.upload(&w).unwrap(), ctx.upload(&g).unwrap(), ctx.upload(&ids).unwrap());
    let (out, dw) = (ctx.zeros(ids.len() * c).unwrap(), ctx.upload(&d0).unwrap());
    run(ctx, |bt| {
        gpu::embedding::embedding_forward(bt, &out, &gw, &gids, c).unwrap();
        gpu::embedding::embedding_backward(bt, &dw, &gg, &ids, c).unwrap();
    });
    let (mut want, mut wd) = (vec![0.0; ids.len() * c], d0.clone());
    cpu::embedding::embedding_forward(&mut want, &w, &ids, c);
    cpu::embedding::embedding_backward(&mut wd, &g, &ids, c);
    assert_close("embedding fwd", &get(&out), &want, 0.0);
    assert_close("embedding bwd", &get(&dw), &wd, 1e-5);

    // narrow (2, 9, 5)[:, 3..7, :] and its accumulate-back
    let (outer, n, inner, off, len) = (2usize, 9usize, 5usize, 3usize, 4usize);
    let x = rand(outer * n * inner, 93);
    let gx = ctx.upload(&x).unwrap();
    let d0 = rand(outer * n * inner, 94);
    let (part, back) = (ctx.zeros(outer * len * inner).unwrap(), ctx.upload(&d0).unwrap());
    let (whole, block) = (BlockView { n, off }, BlockView { n: len, off: 0 });
    run(ctx, |bt| {
        gpu::slice::copy_block(bt, &part, block, &gx, whole, outer, len, inner, false).unwrap();
        gpu::slice::copy_block(bt, &back, whole, &part, block, outer, len, inner, true).unwrap();
    });
    let (mut wp, mut wb) = (vec![0.0; outer * len * inner], d0.clone());
    cpu::slice::copy_block(&mut wp, block, &x, whole, outer, len, inner, false);
    cpu::slice::copy_block(&mut wb, whole, &wp, block, outer, len, inner, true);
    assert_close("narrow", &get(&part), &wp, 0.0);
    assert_close("narrow back", &get(&back), &wb, 0.0);
}

type AttnFwd = dyn Fn(
    &mut gpu::Batch,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    cpu::attention::AttnShape,
) -> Result<(), gpu::GpuError>;
type AttnBwd = dyn Fn(
    &mut gpu::Batch,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    &gpu::GpuBuffer,
    cpu::attention::AttnShape,
) -> Result<(), gpu::GpuError>;

/// (b, tq, tk, h, hkv, d, window, pos0)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

/// A GPU attention kernel pair (forward, backward) against the CPU reference kernel on `shapes`.
fn check_attention(name: &str, fwd: &AttnFwd, bwd: &AttnBwd, shapes: &[Case]) {
    use cpu::attention::AttnShape;
    let Some(ctx) = ctx() else { return };
    for &(b, tq, tk, h, hkv, d, window, pos0) in shapes {
        let s = AttnShape { b, tq, tk, h, hkv, d, window, pos0 };
        let (nq, nk) = (s.b * s.tq * s.h * s.d, s.b * s.tk * s.hkv * s.d);
        let (q, k, v, g) = (rand(nq, 200), rand(nk, 201), rand(nk, 202), rand(nq, 203));
        let up = |x: &[f32]| ctx.upload(x).unwrap();
        let (gq, gk, gv, gg) = (up(&q), up(&k), up(&v), up(&g));
        let rows = s.b * s.tq * s.h;
        let (out, lse) = (ctx.zeros(nq).unwrap(), ctx.zeros(rows).unwrap());
        let (dq0, dk0, dv0) = (rand(nq, 204), rand(nk, 205), rand(nk, 206));
        let (dq, dk, dv) = (up(&dq0), up(&dk0), up(&dv0));
        run(ctx, |bt| {
            fwd(bt, &out, &lse, &gq, &gk, &gv, s).unwrap();
            bwd(bt, &dq, &dk, &dv, &gg, &gq, &gk, &gv, &out, &lse, s).unwrap();
        });
        let (mut wo, mut wl) = (vec![0.0; nq], vec![0.0; rows]);
        cpu::attention::attention_forward(&mut wo, &mut wl, &q, &k, &v, s);
        let (mut wdq, mut wdk, mut wdv) = (dq0.clone(), dk0.clone(), dv0.clone());
        cpu::attention::attention_backward(
            &mut wdq, &mut wdk, &mut wdv, &g, &q, &k, &v, &wo, &wl, s,
        );
        let tag = format!("{name} {s:?}");
        assert_close(&format!("out {tag}"), &get(&out), &wo, 1e-4);
        assert_close(&format!("lse {tag}"), &get(&lse), &wl, 1e-4);
        assert_close(&format!("dq {tag}"), &get(&dq), &wdq, 1e-4);
        assert_close(&format!("dk {tag}"), &get(&dk), &wdk, 1e-4);
        assert_close(&format!("dv {tag}"), &get(&dv), &wdv, 1e-4);
    }
}

const MAX: usize = usize::MAX;

#[test]
fn attention_matches_cpu() {
    check_attention(
        "attention",
        &gpu::attention::attention_forward,
        &gpu::attention::attention_backward,
        &[
            (1, 1, 1, 1, 1, 4, MAX, 0),
            (2, 9, 9, 4, 2, 8, MAX, 0),
            (1, 13, 13, 3, 1, 16, 4, 0),
            (1, 3, 12, 2, 2, 32, MAX, 7), // cache prefill after 7 positions
            (1, 1, 20, 6, 2, 64, 5, 15),  // one-token decode with a window
        ],
    );
}

#[test]
fn flash_attention_matches_cpu_reference() {
    check_attention(
        "flash",
        &gpu::flash_attention::flash_forward,
        &gpu::flash_attention::flash_backward,
        FLASH_CASES,
    );
}

/// The row-per-thread kernels, and the tiled ones with every other tile shape, on the same
/// cases (the tiled kernels with default tiles take most of them in `flash_forward`; head dims
/// they do not take are refused by `Tiled`).
#[test]
fn flash_attention_kernel_choices_match_cpu_reference() {
    use gpu::flash_attention::{FlashKernel, FlashTiles, flash_backward_with, flash_forward_with};
    let Some(ctx) = ctx() else { return };
    let mut kernels = vec![FlashKernel::Rows];
    for (rows, cols) in [(16, 16), (32, 32), (32, 64), (64, 16), (64, 64)] {
        let tiles = FlashTiles { rows, cols };
        let limit = ctx.device.limits().max_compute_workgroup_storage_size as usize;
        if tiles.workgroup_bytes() <= limit {
            kernels.push(FlashKernel::Tiled(tiles));
        }
    }
    for kernel in kernels {
        let cases: Vec<Case> = FLASH_CASES
            .iter()
            .copied()
            .filter(|c| {
                kernel == FlashKernel::Rows || FlashKernel::for_head_dim(c.5) != FlashKernel::Rows
            })
            .collect();
        check_attention(
            &format!("{kernel:?}"),
            &move |bt, o, l, q, k, v, s| flash_forward_with(bt, kernel, o, l, q, k, v, s),
            &move |bt, dq, dk, dv, g, q, k, v, o, l, s| {
                flash_backward_with(bt, kernel, [dq, dk, dv, g, q, k, v, o, l], s)
            },
            &cases,
        );
    }
}

/// Tile shapes outside 16/32/64, and tiled kernels for a head dim they cannot hold, are errors.
#[test]
fn flash_attention_rejects_bad_tiles() {
    use gpu::flash_attention::{FlashKernel, FlashTiles, flash_forward_with};
    let Some(ctx) = ctx() else { return };
    let run_with = |kernel, d: usize| {
        let s =
            cpu::attention::AttnShape { b: 1, tq: 8, tk: 8, h: 1, hkv: 1, d, window: MAX, pos0: 0 };
        let (q, lse) = (ctx.zeros(8 * d).unwrap(), ctx.zeros(8).unwrap());
        let mut bt = ctx.batch();
        flash_forward_with(&mut bt, kernel, &q, &lse, &q, &q, &q, s)
    };
    let err = run_with(FlashKernel::Tiled(FlashTiles { rows: 48, cols: 32 }), 64).unwrap_err();
    assert!(err.to_string().contains("16, 32 or 64"), "{err}");
    let err = run_with(FlashKernel::Tiled(FlashTiles::default()), 72).unwrap_err();
    assert!(err.to_string().contains("multiple of 16"), "{err}");
}

/// (b, tq, tk, h, hkv, d, window, pos0) cases chosen for the flash tilings.
const FLASH_CASES: &[Case] = &[
    (1, 1, 1, 1, 1, 4, MAX, 0),
    (2, 70, 70, 4, 2, 8, MAX, 0),   // two row blocks, GQA 2
    (1, 130, 130, 3, 1, 16, 40, 0), // window, ragged blocks, GQA 3
    (1, 65, 65, 2, 2, 256, MAX, 0), // the largest head dim: 8-row tiles
    (1, 7, 100, 2, 2, 32, MAX, 93), // cache prefill after 93 positions
    (1, 1, 300, 6, 2, 64, 50, 299), // one-token decode with a window
    (1, 33, 33, 2, 1, 72, 0, 0),    // window 0: each row sees itself
    // Shapes the tiled kernels take (D a multiple of 16 up to 128): three row blocks and a
    // ragged one, GQA, windows that cut tiles, a prefill whose rows start mid-tile.
    (2, 150, 150, 4, 2, 64, MAX, 0),
    (1, 100, 100, 2, 1, 128, 37, 0),
    (1, 20, 120, 2, 2, 48, 60, 100),
    (1, 66, 66, 1, 1, 112, 0, 0),
    // split-K decode (Tq <= 4): several 256-key chunks, windows, GQA, batch. Small D:
    // the backward check runs one thread per query row over every key, and llvmpipe
    // stops any single loop after 65535 iterations in total (its hang guard), which a
    // 700-key row at D 64 exceeds; real GPUs have no such limit.
    (1, 1, 700, 4, 2, 16, MAX, 699),
    (1, 3, 523, 2, 2, 32, 300, 520),
    (2, 4, 600, 2, 1, 16, MAX, 596),
];

/// Oversized buffers and dispatches are errors naming the limit, not aborts.
#[test]
fn device_limits_are_clear_errors() {
    let Some(ctx) = ctx() else { return };
    let err = ctx.alloc(usize::MAX / 8).err().expect("a buffer past the device limit");
    assert!(matches!(err, gpu::GpuError::BufferTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("exceeds the device limit"), "{err}");
    // 70,000 batched 1x1 problems: one workgroup each along z, past the 65,535 limit.
    let n = 70_000;
    let (a, b, c) = (ctx.zeros(n).unwrap(), ctx.zeros(n).unwrap(), ctx.zeros(n).unwrap());
    let s = MatmulShape::new(1, 1, 1, false, false);
    let mut bt = ctx.batch();
    let err = gpu::matmul::matmul_batched(&mut bt, &c, &a, &b, n, s, false).unwrap_err();
    assert!(matches!(err, gpu::GpuError::DispatchTooLarge { groups: 70_000, .. }), "{err}");
}

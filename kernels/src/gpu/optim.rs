//! Launchers for `wgsl/optim.wgsl`: the MuonAdamW update on the GPU, the twin of
//! `femtochat_engine::optim::{adamw_update, muon_update}` (same steps, same order). Muon is
//! composed here from small kernels and the tiled matmul; norms stay on the device.
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};
use super::elementwise;
use super::matmul::matmul;
use super::reduce::sum_all;
use crate::cpu::matmul::MatmulShape;

const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    rows: u32,
    cols: u32,
    mode: u32,
    lr: f32,
    wd: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bias1: f32,
    bias2: f32,
    k: f32,
    beta: f32,
    _pad: [u32; 3],
}

// Binding numbers of optim.wgsl.
const X: u32 = 1;
const G: u32 = 2;
const M: u32 = 3;
const V: u32 = 4;
const S: u32 = 5;
const OUT: u32 = 6;

/// AdamW hyper-parameters of one step.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub betas: (f32, f32),
    pub eps: f32,
    pub weight_decay: f32,
}

/// One AdamW step at 1-based step `t` of p, m, v (n) from gradient g (n).
pub fn adamw_step(
    bt: &mut Batch,
    p: &GpuBuffer,
    g: &GpuBuffer,
    m: &GpuBuffer,
    v: &GpuBuffer,
    hp: AdamW,
    t: u64,
) -> Result<(), GpuError> {
    let n = p.len();
    for (what, b) in [("adamw grad", g), ("adamw m", m), ("adamw v", v)] {
        b.check(what, n)?;
    }
    let t = t.min(i32::MAX as u64) as i32;
    let (b1, b2) = hp.betas;
    let pr = Params {
        n: n as u32,
        lr: hp.lr,
        wd: hp.weight_decay,
        b1,
        b2,
        eps: hp.eps,
        bias1: 1.0 - b1.powi(t),
        bias2: 1.0 - b2.powi(t),
        ..Default::default()
    };
    let bufs = [(X, p), (G, g), (M, m), (V, v)];
    bt.dispatch_bound("optim", "adamw_step", &pr, &bufs, grid_1d(n, WG))
}

/// Muon hyper-parameters of one step.
#[derive(Clone, Copy, Debug)]
pub struct Muon {
    pub lr: f32,
    pub momentum: f32,
    pub beta2: f32,
    pub ns_steps: usize,
    pub weight_decay: f32,
}

/// One Muon step of p (rows, cols) from gradient g, with state `momentum` (rows, cols) and
/// `second` ((rows) if rows >= cols else (cols)); `coeffs` are Polar Express's (a, b, c).
#[allow(clippy::too_many_arguments)]
pub fn muon_step(
    bt: &mut Batch,
    p: &GpuBuffer,
    g: &GpuBuffer,
    momentum: &GpuBuffer,
    second: &GpuBuffer,
    rows: usize,
    cols: usize,
    hp: Muon,
    coeffs: &[(f32, f32, f32)],
) -> Result<(), GpuError> {
    let n = rows * cols;
    p.check("muon p", n)?;
    g.check("muon grad", n)?;
    momentum.check("muon momentum", n)?;
    let tall = rows >= cols;
    second.check("muon second", if tall { rows } else { cols })?;
    let ctx = bt.context();
    let base = Params { n: n as u32, rows: rows as u32, cols: cols as u32, ..Default::default() };
    let grid = grid_1d(n, WG);

    // 1. Nesterov momentum into x.
    let x = ctx.alloc(n)?;
    let pr = Params { b1: hp.momentum, ..base };
    bt.dispatch_bound("optim", "muon_nesterov", &pr, &[(G, g), (M, momentum), (OUT, &x)], grid)?;

    // 2. Row equilibration.
    let rowsq = ctx.alloc(rows)?;
    let total = ctx.alloc(1)?;
    let row_grid = grid_1d(rows, 1);
    bt.dispatch_bound("optim", "sumsq_rows", &base, &[(X, &x), (OUT, &rowsq)], row_grid)?;
    sum_all(bt, &total, &rowsq, 1.0, false)?;
    let b = [(X, &x), (S, &total), (OUT, &rowsq)];
    bt.dispatch_bound("optim", "row_equilibrate", &base, &b, grid)?;

    // 3. Normalise and orthogonalise.
    frobenius_sq(bt, &x, &rowsq, &total, base)?;
    bt.dispatch_bound("optim", "scale_by_norm", &base, &[(X, &x), (S, &total)], grid)?;
    polar_express(bt, &x, rows, cols, hp.ns_steps, coeffs)?;

    // 4. Renormalise to Frobenius norm sqrt(min(rows, cols)).
    frobenius_sq(bt, &x, &rowsq, &total, base)?;
    let pr = Params { mode: 1, k: (rows.min(cols) as f32).sqrt(), ..base };
    bt.dispatch_bound("optim", "scale_by_norm", &pr, &[(X, &x), (S, &total)], grid)?;

    // 5. NorMuon: per-row (tall) or per-column second moment.
    let (len, red) = if tall { (rows, cols) } else { (cols, rows) };
    let sq = ctx.alloc(len)?;
    if tall {
        bt.dispatch_bound("optim", "sumsq_rows", &base, &[(X, &x), (OUT, &sq)], row_grid)?;
    } else {
        let cg = grid_1d(cols, WG);
        bt.dispatch_bound("optim", "sumsq_cols", &base, &[(X, &x), (OUT, &sq)], cg)?;
    }
    let scales = ctx.alloc(len)?;
    let pr = Params { n: len as u32, mode: red as u32, b2: hp.beta2, ..base };
    let b = [(V, second), (S, &sq), (OUT, &scales)];
    bt.dispatch_bound("optim", "normuon_scales", &pr, &b, [1, 1, 1])?;

    // 6. Cautious weight decay with the shape-scaled learning rate.
    let lr = hp.lr * (rows as f32 / cols as f32).max(1.0).sqrt();
    let pr = Params { mode: tall as u32, lr, wd: hp.weight_decay, ..base };
    bt.dispatch_bound("optim", "muon_apply", &pr, &[(X, p), (G, &x), (S, &scales)], grid)
}

/// total (1) = ||x||_F^2, through per-row sums in `rowsq` (rows).
fn frobenius_sq(
    bt: &mut Batch,
    x: &GpuBuffer,
    rowsq: &GpuBuffer,
    total: &GpuBuffer,
    base: Params,
) -> Result<(), GpuError> {
    let grid = grid_1d(base.rows as usize, 1);
    bt.dispatch_bound("optim", "sumsq_rows", &base, &[(X, x), (OUT, rowsq)], grid)?;
    sum_all(bt, total, rowsq, 1.0, false)
}

/// `steps` Polar Express iterations on x (rows, cols) in place, Gram matrix on the small side
/// (as `femtochat_engine::optim::polar_express`).
pub fn polar_express(
    bt: &mut Batch,
    x: &GpuBuffer,
    rows: usize,
    cols: usize,
    steps: usize,
    coeffs: &[(f32, f32, f32)],
) -> Result<(), GpuError> {
    let ctx = bt.context();
    let tall = rows > cols;
    let k = if tall { cols } else { rows };
    let (a, a2, bm, out) =
        (ctx.alloc(k * k)?, ctx.alloc(k * k)?, ctx.alloc(k * k)?, ctx.alloc(rows * cols)?);
    for &(ca, cb, cc) in coeffs.iter().cycle().take(steps) {
        if tall {
            matmul(bt, &a, x, x, MatmulShape::new(cols, rows, cols, true, false), false)?;
        } else {
            matmul(bt, &a, x, x, MatmulShape::new(rows, cols, rows, false, true), false)?;
        }
        matmul(bt, &a2, &a, &a, MatmulShape::new(k, k, k, false, false), false)?;
        let pr = Params { n: (k * k) as u32, k: cb, beta: cc, ..Default::default() };
        bt.dispatch_bound(
            "optim",
            "axpby",
            &pr,
            &[(X, &a), (G, &a2), (OUT, &bm)],
            grid_1d(k * k, WG),
        )?;
        elementwise::scale_forward(bt, &out, x, ca)?;
        if tall {
            matmul(bt, &out, x, &bm, MatmulShape::new(rows, cols, cols, false, false), true)?;
        } else {
            matmul(bt, &out, &bm, x, MatmulShape::new(rows, rows, cols, false, false), true)?;
        }
        bt.copy(x, &out)?;
    }
    Ok(())
}

//! Launchers for `wgsl/softmax.wgsl`: softmax, log-softmax and cross-entropy over rows (N, V),
//! one workgroup per row (as `cpu::softmax`). Targets are i32 with `IGNORE_INDEX` = -1.
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    v: u32,
    _pad: [u32; 2],
}

// Binding numbers of softmax.wgsl.
const OUT: u32 = 1;
const LSE: u32 = 2;
const X: u32 = 3;
const G: u32 = 4;
const Y: u32 = 5;
const TARGETS: u32 = 6;

fn launch(
    bt: &mut Batch,
    entry: &'static str,
    n: usize,
    v: usize,
    bufs: &[(u32, &GpuBuffer)],
) -> Result<(), GpuError> {
    let p = Params { n: n as u32, v: v as u32, _pad: [0; 2] };
    // One workgroup per row; an empty row has nothing to normalise.
    let groups = if v == 0 { [0, 0, 0] } else { grid_1d(n, 1) };
    bt.dispatch_bound("softmax", entry, &p, bufs, groups)
}

/// out (N, V) = softmax(inp) over the last dim.
pub fn softmax_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    inp: &GpuBuffer,
    n: usize,
    v: usize,
) -> Result<(), GpuError> {
    out.check("softmax out", n * v)?;
    inp.check("softmax inp", n * v)?;
    launch(bt, "softmax_forward", n, v, &[(OUT, out), (X, inp)])
}

/// dinp (N, V) += y (dout - sum(dout y)), from the saved output y.
pub fn softmax_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    out: &GpuBuffer,
    n: usize,
    v: usize,
) -> Result<(), GpuError> {
    for (what, b) in [("softmax dinp", dinp), ("softmax dout", dout), ("softmax out", out)] {
        b.check(what, n * v)?;
    }
    launch(bt, "softmax_backward", n, v, &[(OUT, dinp), (G, dout), (Y, out)])
}

/// out (N, V) = log_softmax(inp) over the last dim.
pub fn log_softmax_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    inp: &GpuBuffer,
    n: usize,
    v: usize,
) -> Result<(), GpuError> {
    out.check("log_softmax out", n * v)?;
    inp.check("log_softmax inp", n * v)?;
    launch(bt, "log_softmax_forward", n, v, &[(OUT, out), (X, inp)])
}

/// dinp (N, V) += dout - exp(y) sum(dout), from the saved output y.
pub fn log_softmax_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    out: &GpuBuffer,
    n: usize,
    v: usize,
) -> Result<(), GpuError> {
    for (what, b) in
        [("log_softmax dinp", dinp), ("log_softmax dout", dout), ("log_softmax out", out)]
    {
        b.check(what, n * v)?;
    }
    launch(bt, "log_softmax_backward", n, v, &[(OUT, dinp), (G, dout), (Y, out)])
}

/// losses (N) = logsumexp(logits_i) - logits_i[t_i] (0 where ignored); lse (N) saved.
/// Targets (N, i32) must be -1 or in 0..V (the caller validates them).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_forward(
    bt: &mut Batch,
    losses: &GpuBuffer,
    lse: &GpuBuffer,
    logits: &GpuBuffer,
    targets: &GpuBuffer,
    n: usize,
    v: usize,
) -> Result<(), GpuError> {
    losses.check("cross_entropy losses", n)?;
    lse.check("cross_entropy lse", n)?;
    targets.check("cross_entropy targets", n)?;
    logits.check("cross_entropy logits", n * v)?;
    let bufs = [(OUT, losses), (LSE, lse), (X, logits), (TARGETS, targets)];
    launch(bt, "cross_entropy_forward", n, v, &bufs)
}

/// dlogits (N, V) += dlosses_i (softmax(logits_i) - onehot(t_i)); ignored rows get nothing.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward(
    bt: &mut Batch,
    dlogits: &GpuBuffer,
    dlosses: &GpuBuffer,
    logits: &GpuBuffer,
    lse: &GpuBuffer,
    targets: &GpuBuffer,
    n: usize,
    v: usize,
) -> Result<(), GpuError> {
    dlogits.check("cross_entropy dlogits", n * v)?;
    logits.check("cross_entropy logits", n * v)?;
    for (what, b) in [("cross_entropy dlosses", dlosses), ("cross_entropy lse", lse)] {
        b.check(what, n)?;
    }
    targets.check("cross_entropy targets", n)?;
    let bufs = [(OUT, dlogits), (LSE, lse), (X, logits), (G, dlosses), (TARGETS, targets)];
    launch(bt, "cross_entropy_backward", n, v, &bufs)
}

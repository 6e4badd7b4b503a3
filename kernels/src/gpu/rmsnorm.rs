//! Launchers for `wgsl/rmsnorm.wgsl`, one workgroup per row (as `cpu::rmsnorm`).
use super::context::{Batch, GpuBuffer, GpuError};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    eps: f32,
    _pad: u32,
}

/// out (N, C) = inp * rstd, rstd (N) = 1 / sqrt(mean(inp^2) + eps)
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    rstd: &GpuBuffer,
    inp: &GpuBuffer,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<(), GpuError> {
    out.check("rmsnorm out", n * c)?;
    inp.check("rmsnorm inp", n * c)?;
    rstd.check("rmsnorm rstd", n)?;
    let p = Params { n: n as u32, c: c as u32, eps, _pad: 0 };
    let groups = if c == 0 { 0 } else { n as u32 };
    bt.dispatch("rmsnorm", "rmsnorm_forward", &p, &[out, rstd, inp], [groups, 1, 1])
}

/// dinp (N, C) += rmsnorm backward, from the saved rstd (N).
pub fn rmsnorm_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    inp: &GpuBuffer,
    rstd: &GpuBuffer,
    n: usize,
    c: usize,
) -> Result<(), GpuError> {
    dinp.check("rmsnorm dinp", n * c)?;
    dout.check("rmsnorm dout", n * c)?;
    inp.check("rmsnorm inp", n * c)?;
    rstd.check("rmsnorm rstd", n)?;
    let p = Params { n: n as u32, c: c as u32, eps: 0.0, _pad: 0 };
    let groups = if c == 0 { 0 } else { n as u32 };
    bt.dispatch("rmsnorm", "rmsnorm_backward", &p, &[dinp, rstd, inp, dout], [groups, 1, 1])
}

//! Launchers for `wgsl/elementwise.wgsl`. Forward: `out =`; backward: `dinp +=` (as `cpu::elementwise`).
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};

const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    s: f32,
    _pad: [u32; 2],
}

fn launch(
    bt: &mut Batch,
    entry: &'static str,
    s: f32,
    bufs: &[&GpuBuffer],
) -> Result<(), GpuError> {
    let n = bufs[0].len();
    for b in &bufs[1..] {
        b.check(entry, n)?;
    }
    let p = Params { n: n as u32, s, _pad: [0; 2] };
    bt.dispatch("elementwise", entry, &p, bufs, grid_1d(n, WG))
}

/// out (N) = s * inp
pub fn scale_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    inp: &GpuBuffer,
    s: f32,
) -> Result<(), GpuError> {
    launch(bt, "scale_forward", s, &[out, inp])
}

/// dinp (N) += s * dout
pub fn scale_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    s: f32,
) -> Result<(), GpuError> {
    launch(bt, "scale_backward", s, &[dinp, dout])
}

/// out (N) = relu(inp)^2
pub fn relu2_forward(bt: &mut Batch, out: &GpuBuffer, inp: &GpuBuffer) -> Result<(), GpuError> {
    launch(bt, "relu2_forward", 0.0, &[out, inp])
}

/// dinp (N) += dout * 2 relu(inp)
pub fn relu2_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    inp: &GpuBuffer,
) -> Result<(), GpuError> {
    launch(bt, "relu2_backward", 0.0, &[dinp, dout, inp])
}

/// out (N) = c tanh(inp / c)
pub fn softcap_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    inp: &GpuBuffer,
    c: f32,
) -> Result<(), GpuError> {
    launch(bt, "softcap_forward", c, &[out, inp])
}

/// dinp (N) += dout * (1 - (out/c)^2), from the saved forward output.
pub fn softcap_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    out: &GpuBuffer,
    c: f32,
) -> Result<(), GpuError> {
    launch(bt, "softcap_backward", c, &[dinp, dout, out])
}

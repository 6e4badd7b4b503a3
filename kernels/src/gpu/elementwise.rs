//! Launchers for `wgsl/elementwise.wgsl`. Forward: `out =`; backward: `dinp +=` (as `cpu::elementwise`).
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};
use crate::cpu::elementwise::Broadcast;

const WG: usize = 256;
/// Most collapsed broadcast dims the shader walks (`MAX_RANK` in the WGSL).
const MAX_RANK: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    s: f32,
    rank: u32,
    accumulate: u32,
    dims: [u32; MAX_RANK],
    stride_a: [u32; MAX_RANK],
    stride_b: [u32; MAX_RANK],
}

impl Params {
    fn unary(n: usize, s: f32) -> Params {
        Params { n: n as u32, s, ..bytemuck::Zeroable::zeroed() }
    }
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
    bt.dispatch("elementwise", entry, &Params::unary(n, s), bufs, grid_1d(n, WG))
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

/// out (N) = sigmoid(inp)
pub fn sigmoid_forward(bt: &mut Batch, out: &GpuBuffer, inp: &GpuBuffer) -> Result<(), GpuError> {
    launch(bt, "sigmoid_forward", 0.0, &[out, inp])
}

/// dinp (N) += dout * y (1 - y), from the saved output y.
pub fn sigmoid_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    out: &GpuBuffer,
) -> Result<(), GpuError> {
    launch(bt, "sigmoid_backward", 0.0, &[dinp, dout, out])
}

/// out (N) = tanh(inp)
pub fn tanh_forward(bt: &mut Batch, out: &GpuBuffer, inp: &GpuBuffer) -> Result<(), GpuError> {
    launch(bt, "tanh_forward", 0.0, &[out, inp])
}

/// dinp (N) += dout * (1 - y^2), from the saved output y.
pub fn tanh_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    out: &GpuBuffer,
) -> Result<(), GpuError> {
    launch(bt, "tanh_backward", 0.0, &[dinp, dout, out])
}

fn binary(
    bt: &mut Batch,
    entry: &'static str,
    out: &GpuBuffer,
    a: &GpuBuffer,
    b: &GpuBuffer,
    bc: &Broadcast,
    accumulate: bool,
) -> Result<(), GpuError> {
    let (dims, sa, sb) = bc.collapsed();
    if dims.len() > MAX_RANK {
        return Err(GpuError::Unsupported(format!(
            "{entry}: {} collapsed broadcast dims (at most {MAX_RANK})",
            dims.len()
        )));
    }
    let n = bc.numel();
    out.check(entry, n)?;
    // Operands are contiguous, so each holds exactly 1 + its largest broadcast offset elements.
    let numel = |st: &[usize]| {
        if n == 0 { 0 } else { 1 + dims.iter().zip(st).map(|(d, s)| (d - 1) * s).sum::<usize>() }
    };
    a.check(entry, numel(sa))?;
    b.check(entry, numel(sb))?;
    let mut p = Params::unary(n, 0.0);
    p.rank = dims.len() as u32;
    p.accumulate = accumulate as u32;
    for (i, ((&d, &x), &y)) in dims.iter().zip(sa).zip(sb).enumerate() {
        (p.dims[i], p.stride_a[i], p.stride_b[i]) = (d as u32, x as u32, y as u32);
    }
    bt.dispatch("elementwise", entry, &p, &[out, a, b], grid_1d(n, WG))
}

/// out (=|+=) a + b with numpy broadcasting (as `cpu::elementwise::add_forward`).
pub fn add_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    a: &GpuBuffer,
    b: &GpuBuffer,
    bc: &Broadcast,
    accumulate: bool,
) -> Result<(), GpuError> {
    binary(bt, "add_forward", out, a, b, bc, accumulate)
}

/// out (=|+=) a - b with numpy broadcasting.
pub fn sub_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    a: &GpuBuffer,
    b: &GpuBuffer,
    bc: &Broadcast,
    accumulate: bool,
) -> Result<(), GpuError> {
    binary(bt, "sub_forward", out, a, b, bc, accumulate)
}

/// out (=|+=) a * b with numpy broadcasting.
pub fn mul_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    a: &GpuBuffer,
    b: &GpuBuffer,
    bc: &Broadcast,
    accumulate: bool,
) -> Result<(), GpuError> {
    binary(bt, "mul_forward", out, a, b, bc, accumulate)
}

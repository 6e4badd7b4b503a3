//! Launchers for `wgsl/rope.wgsl` (as `cpu::rope`): x (B, T, H, D) at positions pos0..pos0+T.
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};
use crate::cpu::rope::RopeShape;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    t: u32,
    h: u32,
    d: u32,
    pos0: u32,
    sign: f32,
    accumulate: u32,
    _pad: u32,
}

#[allow(clippy::too_many_arguments)]
fn rotate(
    bt: &mut Batch,
    out: &GpuBuffer,
    inp: &GpuBuffer,
    cos: &GpuBuffer,
    sin: &GpuBuffer,
    s: RopeShape,
    sign: f32,
    accumulate: bool,
) -> Result<(), GpuError> {
    let numel = s.b * s.t * s.h * s.d;
    out.check("rope out", numel)?;
    inp.check("rope inp", numel)?;
    let table = (s.pos0 + s.t) * (s.d / 2);
    for (what, b) in [("rope cos", cos), ("rope sin", sin)] {
        if b.len() < table {
            return Err(GpuError::Shape { what, got: b.len(), expected: table });
        }
    }
    let n = numel / 2;
    let p = Params {
        n: n as u32,
        t: s.t as u32,
        h: s.h as u32,
        d: s.d as u32,
        pos0: s.pos0 as u32,
        sign,
        accumulate: accumulate as u32,
        _pad: 0,
    };
    bt.dispatch("rope", "rope_apply", &p, &[out, inp, cos, sin], grid_1d(n, 256))
}

/// out (B, T, H, D) = rope(inp); cos, sin (T_max, D/2) as `cpu::rope::rope_tables`.
pub fn rope_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    inp: &GpuBuffer,
    cos: &GpuBuffer,
    sin: &GpuBuffer,
    s: RopeShape,
) -> Result<(), GpuError> {
    rotate(bt, out, inp, cos, sin, s, 1.0, false)
}

/// dinp (B, T, H, D) += rope^T(dout)
pub fn rope_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    cos: &GpuBuffer,
    sin: &GpuBuffer,
    s: RopeShape,
) -> Result<(), GpuError> {
    rotate(bt, dinp, dout, cos, sin, s, -1.0, true)
}

//! Launchers for `wgsl/attention.wgsl`, the straightforward GPU attention (as
//! `cpu::attention`): forward saves lse (B, Tq, H); backward is two passes without atomics.
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};
use crate::cpu::attention::AttnShape;

/// Largest head dim the kernel's private arrays hold (`MAX_D` in the WGSL).
pub const MAX_HEAD_DIM: usize = 256;
const WG: usize = 64;

/// The uniform of both attention shaders (`attention.wgsl`, `flash_attention.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    b: u32,
    tq: u32,
    tk: u32,
    h: u32,
    hkv: u32,
    d: u32,
    window: u32,
    pos0: u32,
    scale: f32,
    /// Row blocks per (batch, head) (flash only).
    pub(crate) blocks: u32,
    _pad: [u32; 2],
}

/// Validated uniform for shape `s`, with `blocks` row blocks per (batch, head).
pub(crate) fn params(s: AttnShape, blocks: usize) -> Result<Params, GpuError> {
    if s.d == 0 || s.d > MAX_HEAD_DIM {
        return Err(GpuError::Unsupported(format!(
            "attention head dim {} (1..={MAX_HEAD_DIM})",
            s.d
        )));
    }
    if s.hkv == 0 || !s.h.is_multiple_of(s.hkv) || s.tk < s.pos0 + s.tq {
        return Err(GpuError::Unsupported(format!("attention shape {s:?}")));
    }
    Ok(Params {
        b: s.b as u32,
        tq: s.tq as u32,
        tk: s.tk as u32,
        h: s.h as u32,
        hkv: s.hkv as u32,
        d: s.d as u32,
        // usize::MAX means plain causal; any window >= Tk is the same and fits in u32.
        window: s.window.min(s.tk) as u32,
        pos0: s.pos0 as u32,
        scale: 1.0 / (s.d as f32).sqrt(),
        blocks: blocks as u32,
        _pad: [0; 2],
    })
}

pub(crate) fn check_io(
    s: AttnShape,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
) -> Result<(), GpuError> {
    q.check("attention q", s.b * s.tq * s.h * s.d)?;
    k.check("attention k", s.b * s.tk * s.hkv * s.d)?;
    v.check("attention v", s.b * s.tk * s.hkv * s.d)
}

/// out (B, Tq, H, D) = attention(q, k, v); lse (B, Tq, H) saved for backward.
pub fn attention_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    lse: &GpuBuffer,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    s: AttnShape,
) -> Result<(), GpuError> {
    let p = params(s, 0)?;
    check_io(s, q, k, v)?;
    out.check("attention out", q.len())?;
    lse.check("attention lse", s.b * s.tq * s.h)?;
    let rows = s.b * s.tq * s.h;
    let bufs = [(1, out), (2, lse), (3, q), (4, k), (5, v)];
    bt.dispatch_bound("attention", "attention_forward", &p, &bufs, grid_1d(rows, WG))
}

/// dq += .., dk += .., dv += .. given dout and the forward's out and lse.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    bt: &mut Batch,
    dq: &GpuBuffer,
    dk: &GpuBuffer,
    dv: &GpuBuffer,
    dout: &GpuBuffer,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    out: &GpuBuffer,
    lse: &GpuBuffer,
    s: AttnShape,
) -> Result<(), GpuError> {
    let p = params(s, 0)?;
    check_io(s, q, k, v)?;
    for (what, b) in [("attention dq", dq), ("attention dout", dout), ("attention out", out)] {
        b.check(what, q.len())?;
    }
    dk.check("attention dk", k.len())?;
    dv.check("attention dv", k.len())?;
    let rows = s.b * s.tq * s.h;
    lse.check("attention lse", rows)?;
    let delta = bt.context().alloc(rows)?;
    let b1 = [(1, dq), (2, lse), (3, q), (4, k), (5, v), (6, dout), (7, out), (8, &delta)];
    bt.dispatch_bound("attention", "attention_backward_dq", &p, &b1, grid_1d(rows, WG))?;
    let b2 = [(1, dk), (2, lse), (3, q), (4, k), (5, v), (6, dout), (8, &delta), (9, dv)];
    let krows = s.b * s.tk * s.hkv;
    bt.dispatch_bound("attention", "attention_backward_dkv", &p, &b2, grid_1d(krows, WG))
}

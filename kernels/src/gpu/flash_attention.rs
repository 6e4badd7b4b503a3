//! Launchers for `wgsl/flash_attention.wgsl`: tiled flash attention, forward (saves lse) and
//! backward with recomputation (a dQ pass, then a dK/dV pass), the GPU twin of
//! `cpu::flash_attention`. Extra memory: delta (B, Tq, H), nothing of size T x T.
use super::attention::{Params, check_io};
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};
use crate::cpu::attention::AttnShape;

/// Rows per workgroup (`BR` in the WGSL).
const BR: usize = 64;
/// Keys per decode chunk (`KC` in the WGSL).
const KC: usize = 256;
/// Up to this many query rows, the forward splits the keys into chunks (flash decoding).
pub const DECODE_MAX_ROWS: usize = 4;
/// Largest head dim the kernel's private arrays hold (`MAX_D` in the WGSL).
pub const MAX_HEAD_DIM: usize = super::attention::MAX_HEAD_DIM;

fn params(s: AttnShape, rows: usize) -> Result<Params, GpuError> {
    super::attention::params(s, rows.div_ceil(BR))
}

/// out (B, Tq, H, D) = attention(q, k, v); lse (B, Tq, H) saved for backward.
pub fn flash_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    lse: &GpuBuffer,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    s: AttnShape,
) -> Result<(), GpuError> {
    let entry = if tiled_fits(s.d) { "flash_forward_tiled" } else { "flash_forward" };
    forward_with(bt, entry, out, lse, q, k, v, s)
}

/// `flash_forward` forced onto the one-thread-per-query-row kernel, the fallback for head dims
/// `tiled_fits` rejects; for benchmarks (`kernel-bench attention --impl flash-rows`).
pub fn flash_forward_rows(
    bt: &mut Batch,
    out: &GpuBuffer,
    lse: &GpuBuffer,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    s: AttnShape,
) -> Result<(), GpuError> {
    forward_with(bt, "flash_forward", out, lse, q, k, v, s)
}

#[allow(clippy::too_many_arguments)]
fn forward_with(
    bt: &mut Batch,
    entry: &'static str,
    out: &GpuBuffer,
    lse: &GpuBuffer,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    s: AttnShape,
) -> Result<(), GpuError> {
    check_io(s, q, k, v)?;
    out.check("flash attention out", q.len())?;
    lse.check("flash attention lse", s.b * s.tq * s.h)?;
    if s.tq <= DECODE_MAX_ROWS {
        return flash_decode(bt, out, lse, q, k, v, s);
    }
    let p = params(s, s.tq)?;
    let groups = grid_1d(s.b * s.h * p.blocks as usize, 1);
    if entry == "flash_forward_tiled" {
        // The tiled kernels share helpers that can read dout (binding 6); the forward never
        // does, so q stands in for it.
        let bufs = [(1, out), (2, lse), (3, q), (4, k), (5, v), (6, q)];
        return bt.dispatch_bound("flash_attention", entry, &p, &bufs, groups);
    }
    let bufs = [(1, out), (2, lse), (3, q), (4, k), (5, v)];
    bt.dispatch_bound("flash_attention", entry, &p, &bufs, groups)
}

/// Whether forward and backward run the `*_tiled` kernels (matmul-style register tiles spread
/// over a 16 x 16 workgroup) rather than one thread per row: head dims that are multiples of 16
/// up to 128, which covers the model's (64, 128).
pub fn tiled_fits(d: usize) -> bool {
    d.is_multiple_of(16) && d <= 128
}

/// dq += .., dk += .., dv += .. given dout and the forward's out and lse.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
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
    backward_with(bt, tiled_fits(s.d), [dq, dk, dv, dout, q, k, v, out, lse], s)
}

/// `flash_backward` forced onto the one-thread-per-row kernels (for benchmarks).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward_rows(
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
    backward_with(bt, false, [dq, dk, dv, dout, q, k, v, out, lse], s)
}

/// The backward's two passes; `bufs` = dq, dk, dv, dout, q, k, v, out, lse.
fn backward_with(
    bt: &mut Batch,
    tiled: bool,
    bufs: [&GpuBuffer; 9],
    s: AttnShape,
) -> Result<(), GpuError> {
    let [dq, dk, dv, dout, q, k, v, out, lse] = bufs;
    let pq = params(s, s.tq)?;
    let pk = params(s, s.tk)?;
    check_io(s, q, k, v)?;
    for (what, b) in [("flash dq", dq), ("flash dout", dout), ("flash out", out)] {
        b.check(what, q.len())?;
    }
    dk.check("flash dk", k.len())?;
    dv.check("flash dv", k.len())?;
    let rows = s.b * s.tq * s.h;
    lse.check("flash lse", rows)?;
    let delta = bt.context().alloc(rows)?;
    let (dq_entry, dkv_entry) = if tiled {
        ("flash_backward_dq_tiled", "flash_backward_dkv_tiled")
    } else {
        ("flash_backward_dq", "flash_backward_dkv")
    };
    let b1 = [(1, dq), (2, lse), (3, q), (4, k), (5, v), (6, dout), (7, out), (8, &delta)];
    let g1 = grid_1d(s.b * s.h * pq.blocks as usize, 1);
    bt.dispatch_bound("flash_attention", dq_entry, &pq, &b1, g1)?;
    let b2 = [(1, dk), (2, lse), (3, q), (4, k), (5, v), (6, dout), (8, &delta), (9, dv)];
    let g2 = grid_1d(s.b * s.hkv * pk.blocks as usize, 1);
    bt.dispatch_bound("flash_attention", dkv_entry, &pk, &b2, g2)
}

/// Decode forward: the keys up to the last query split into KC-key chunks, one workgroup per
/// (query row, chunk), then one per row to combine the chunks by their (max, sum).
fn flash_decode(
    bt: &mut Batch,
    out: &GpuBuffer,
    lse: &GpuBuffer,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    s: AttnShape,
) -> Result<(), GpuError> {
    let chunks = (s.pos0 + s.tq).div_ceil(KC).max(1);
    let p = super::attention::params(s, chunks)?;
    let rows = s.b * s.tq * s.h;
    let ctx = bt.context();
    let (part, stats) = (ctx.alloc(rows * chunks * s.d)?, ctx.alloc(rows * chunks * 2)?);
    let b1 = [(3, q), (4, k), (5, v), (8, &stats), (9, &part)];
    let g1 = grid_1d(rows * chunks, 1);
    bt.dispatch_bound("flash_attention", "flash_decode_partial", &p, &b1, g1)?;
    let b2 = [(1, out), (2, lse), (8, &stats), (9, &part)];
    bt.dispatch_bound("flash_attention", "flash_decode_combine", &p, &b2, grid_1d(rows, 1))
}

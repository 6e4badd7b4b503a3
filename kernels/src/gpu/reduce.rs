//! Launchers for `wgsl/reduce.wgsl` (as `cpu::reduce`).
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};
use crate::cpu::elementwise::Broadcast;

const MAX_RANK: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    outer: u32,
    red: u32,
    inner: u32,
    alpha: f32,
    accumulate: u32,
    nkeep: u32,
    nred: u32,
    keep_dims: [u32; MAX_RANK],
    keep_stride: [u32; MAX_RANK],
    red_dims: [u32; MAX_RANK],
    red_stride: [u32; MAX_RANK],
}

fn params() -> Params {
    bytemuck::Zeroable::zeroed()
}

/// Elements per workgroup above which `sum_all` first reduces to per-workgroup partials.
const PARTIAL_CHUNK: usize = 16 * 256;
const MAX_PARTIALS: usize = 1024;

/// out (1) (=|+=) alpha * sum(inp): compensated per-thread sums and workgroup trees, in two
/// stages for large inputs (fixed order, deterministic).
pub fn sum_all(
    bt: &mut Batch,
    out: &GpuBuffer,
    inp: &GpuBuffer,
    alpha: f32,
    accumulate: bool,
) -> Result<(), GpuError> {
    out.check("sum_all out", 1)?;
    let n = inp.len();
    let p = Params { alpha, accumulate: accumulate as u32, ..params() };
    if n <= PARTIAL_CHUNK {
        let p = Params { n: n as u32, ..p };
        return bt.dispatch("reduce", "sum_all", &p, &[out, inp], [1, 1, 1]);
    }
    let groups = n.div_ceil(PARTIAL_CHUNK).min(MAX_PARTIALS);
    let partials = bt.context().alloc(groups)?;
    let p1 = Params { n: n as u32, ..params() };
    bt.dispatch("reduce", "sum_partial", &p1, &[&partials, inp], [groups as u32, 1, 1])?;
    let p2 = Params { n: groups as u32, ..p };
    bt.dispatch("reduce", "sum_all", &p2, &[out, &partials], [1, 1, 1])
}

/// out (outer, inner) = inp (outer, n, inner) summed over n.
pub fn sum_dim_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    inp: &GpuBuffer,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<(), GpuError> {
    out.check("sum_dim out", outer * inner)?;
    inp.check("sum_dim inp", outer * n * inner)?;
    let cnt = outer * inner;
    let p = Params {
        n: cnt as u32,
        outer: outer as u32,
        red: n as u32,
        inner: inner as u32,
        ..params()
    };
    bt.dispatch("reduce", "sum_dim_forward", &p, &[out, inp], grid_1d(cnt, 256))
}

/// dinp (outer, n, inner) += dout (outer, inner) repeated along n.
pub fn sum_dim_backward(
    bt: &mut Batch,
    dinp: &GpuBuffer,
    dout: &GpuBuffer,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<(), GpuError> {
    dinp.check("sum_dim dinp", outer * n * inner)?;
    dout.check("sum_dim dout", outer * inner)?;
    let cnt = outer * n * inner;
    let p = Params {
        n: cnt as u32,
        outer: outer as u32,
        red: n as u32,
        inner: inner as u32,
        ..params()
    };
    bt.dispatch("reduce", "sum_dim_backward", &p, &[dinp, dout], grid_1d(cnt, 256))
}

/// dst (dst_shape) += alpha * src (src_shape) summed over the dims where dst was broadcast;
/// `dst_shape` must broadcast to exactly `src_shape` (as `cpu::reduce::sum_to_shape`).
pub fn sum_to_shape(
    bt: &mut Batch,
    dst: &GpuBuffer,
    dst_shape: &[usize],
    src: &GpuBuffer,
    src_shape: &[usize],
    alpha: f32,
) -> Result<(), GpuError> {
    let (dn, sn) = (dst_shape.iter().product::<usize>(), src_shape.iter().product::<usize>());
    dst.check("sum_to_shape dst", dn)?;
    src.check("sum_to_shape src", sn)?;
    let bad = || GpuError::Unsupported(format!("sum_to_shape {dst_shape:?} <- {src_shape:?}"));
    let bc = Broadcast::new(dst_shape, src_shape).ok_or_else(bad)?;
    if bc.out_shape.iter().product::<usize>() != sn {
        return Err(bad());
    }
    if sn == 0 || dn == 0 {
        return Ok(());
    }
    if dn == 1 {
        // Everything summed (a scalar parameter's gradient): the two-stage reduction.
        return sum_all(bt, dst, src, alpha, true);
    }
    // Collapsed dims where dst has stride 0 are summed; the others are kept. The source is
    // contiguous over all collapsed dims.
    let (dims, sd, _) = bc.collapsed();
    let mut src_stride = vec![0; dims.len()];
    let mut acc = 1;
    for i in (0..dims.len()).rev() {
        src_stride[i] = acc;
        acc *= dims[i];
    }
    let mut p = params();
    let (mut nk, mut nr, mut red) = (0, 0, 1);
    for i in 0..dims.len() {
        if sd[i] == 0 && dims[i] > 1 {
            if nr == MAX_RANK {
                return Err(bad());
            }
            (p.red_dims[nr], p.red_stride[nr]) = (dims[i] as u32, src_stride[i] as u32);
            nr += 1;
            red *= dims[i];
        } else {
            if nk == MAX_RANK {
                return Err(bad());
            }
            (p.keep_dims[nk], p.keep_stride[nk]) = (dims[i] as u32, src_stride[i] as u32);
            nk += 1;
        }
    }
    (p.n, p.red, p.alpha, p.nkeep, p.nred) = (dn as u32, red as u32, alpha, nk as u32, nr as u32);
    bt.dispatch("reduce", "sum_to_shape", &p, &[dst, src], grid_1d(dn, 256))
}

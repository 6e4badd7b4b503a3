//! Launcher for `wgsl/slice.wgsl` (as `cpu::slice::copy_block`).
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};
use crate::cpu::slice::BlockView;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    count: u32,
    len: u32,
    inner: u32,
    dst_n: u32,
    dst_off: u32,
    src_n: u32,
    src_off: u32,
    accumulate: u32,
}

/// dst (outer, dv.n, inner)[:, dv.off..+len, :] (=|+=) src (outer, sv.n, inner)[:, sv.off..+len, :]
#[allow(clippy::too_many_arguments)]
pub fn copy_block(
    bt: &mut Batch,
    dst: &GpuBuffer,
    dv: BlockView,
    src: &GpuBuffer,
    sv: BlockView,
    outer: usize,
    len: usize,
    inner: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    dst.check("copy_block dst", outer * dv.n * inner)?;
    src.check("copy_block src", outer * sv.n * inner)?;
    if dv.off + len > dv.n || sv.off + len > sv.n {
        return Err(GpuError::Shape { what: "copy_block block", got: len, expected: dv.n });
    }
    let count = outer * len * inner;
    let p = Params {
        count: count as u32,
        len: len as u32,
        inner: inner as u32,
        dst_n: dv.n as u32,
        dst_off: dv.off as u32,
        src_n: sv.n as u32,
        src_off: sv.off as u32,
        accumulate: accumulate as u32,
    };
    bt.dispatch("slice", "copy_block", &p, &[dst, src], grid_1d(count, 256))
}

//! Launcher for `wgsl/matmul.wgsl` (matmul_tiled_64x64_4x4): C (M, N) (=|+=) op(A) . op(B).
use super::context::{Batch, GpuBuffer, GpuError};
use crate::cpu::matmul::MatmulShape;

const TILE: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    k: u32,
    n: u32,
    trans_a: u32,
    trans_b: u32,
    accumulate: u32,
    _pad: [u32; 2],
}

/// `batch` problems laid out contiguously: A (batch, M, K), B (batch, K, N), C (batch, M, N),
/// with the per-problem layouts of `s` (as `cpu::matmul::matmul_batched`).
pub fn matmul_batched(
    bt: &mut Batch,
    c: &GpuBuffer,
    a: &GpuBuffer,
    b: &GpuBuffer,
    batch: usize,
    s: MatmulShape,
    accumulate: bool,
) -> Result<(), GpuError> {
    a.check("matmul A", batch * s.m * s.k)?;
    b.check("matmul B", batch * s.k * s.n)?;
    c.check("matmul C", batch * s.m * s.n)?;
    let p = Params {
        m: s.m as u32,
        k: s.k as u32,
        n: s.n as u32,
        trans_a: s.trans_a as u32,
        trans_b: s.trans_b as u32,
        accumulate: accumulate as u32,
        _pad: [0; 2],
    };
    let groups = [s.n.div_ceil(TILE) as u32, s.m.div_ceil(TILE) as u32, batch as u32];
    bt.dispatch("matmul", "matmul_forward", &p, &[c, a, b], groups)
}

/// C (M, N) (=|+=) op(A) . op(B) (as `cpu::matmul::matmul`).
pub fn matmul(
    bt: &mut Batch,
    c: &GpuBuffer,
    a: &GpuBuffer,
    b: &GpuBuffer,
    s: MatmulShape,
    accumulate: bool,
) -> Result<(), GpuError> {
    matmul_batched(bt, c, a, b, 1, s, accumulate)
}

//! Launchers for `wgsl/matmul.wgsl`: C (M, N) (=|+=) op(A) . op(B), with two tilings
//! (`MatmulTiling`): 64x64 tiles of 4x4 register blocks (the default) and 128x128 of 8x8.
use super::context::{Batch, GpuBuffer, GpuError};
use crate::cpu::matmul::MatmulShape;

/// Which kernel of `matmul.wgsl` runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulTiling {
    /// 64x64 C tiles, 4x4 per thread (`matmul_forward`).
    #[default]
    T64,
    /// 128x128 C tiles, 8x8 per thread (`matmul_forward_128`).
    T128,
}

impl MatmulTiling {
    pub fn name(self) -> &'static str {
        match self {
            MatmulTiling::T64 => "wgsl_tiled_64x64_4x4",
            MatmulTiling::T128 => "wgsl_tiled_128x128_8x8",
        }
    }

    /// The tiling for a problem: 128x128 tiles feed each loaded value to twice the FMAs but give
    /// a quarter of the workgroups, so they pay only when C is large enough to fill the GPU with
    /// them (about 32 tiles of 128x128 per problem and up).
    pub fn auto(batch: usize, m: usize, n: usize) -> MatmulTiling {
        if batch * m.div_ceil(128) * n.div_ceil(128) >= 32 && m >= 128 && n >= 128 {
            MatmulTiling::T128
        } else {
            MatmulTiling::T64
        }
    }

    fn tile_and_entry(self) -> (usize, &'static str) {
        match self {
            MatmulTiling::T64 => (64, "matmul_forward"),
            MatmulTiling::T128 => (128, "matmul_forward_128"),
        }
    }
}

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
    matmul_batched_with(bt, MatmulTiling::auto(batch, s.m, s.n), c, a, b, batch, s, accumulate)
}

/// `matmul_batched` with a chosen tiling.
#[allow(clippy::too_many_arguments)]
pub fn matmul_batched_with(
    bt: &mut Batch,
    tiling: MatmulTiling,
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
    let (tile, entry) = tiling.tile_and_entry();
    let groups = [s.n.div_ceil(tile) as u32, s.m.div_ceil(tile) as u32, batch as u32];
    bt.dispatch("matmul", entry, &p, &[c, a, b], groups)
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

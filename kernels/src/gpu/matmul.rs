//! Launchers for `wgsl/matmul.wgsl`: C (M, N) (=|+=) op(A) . op(B), with three tilings
//! (`MatmulTiling`): 64x64 tiles of 4x4 register blocks, 128x128 of 8x8, and 128x128 of 8x8 with
//! vec4 loads and a prefetched K slice (for operands whose contiguous extents are multiples of 4).
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
    /// 128x128 C tiles, 8x8 per thread, vec4 global and workgroup loads, the next K slice
    /// prefetched into registers (`matmul_forward_v4`); needs `MatmulTiling::vec4_fits`.
    V4(Vec4Slices),
}

/// The vec4 kernel's pipeline constants: `bk`, the K slice depth (8, 16 or 32), and `stages`,
/// the workgroup buffers (1, or 2 to ping-pong with one barrier per slice). Workgroup memory:
/// stages x bk KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vec4Slices {
    pub bk: usize,
    pub stages: usize,
}

impl Default for Vec4Slices {
    /// 16-deep slices, one buffer: 16 KiB, WebGPU's guaranteed workgroup memory.
    fn default() -> Self {
        Vec4Slices { bk: 16, stages: 1 }
    }
}

impl Vec4Slices {
    pub fn workgroup_bytes(self) -> usize {
        self.stages * self.bk * 1024
    }

    fn constants(self, bt: &Batch) -> Result<[(&'static str, f64); 2], GpuError> {
        if !matches!(self.bk, 8 | 16 | 32) || !matches!(self.stages, 1 | 2) {
            return Err(GpuError::Unsupported(format!(
                "vec4 matmul slices: bk {} (8, 16 or 32), stages {} (1 or 2)",
                self.bk, self.stages
            )));
        }
        let what = format!("vec4 matmul bk {} x {} stages", self.bk, self.stages);
        bt.context().check_workgroup_bytes(&what, self.workgroup_bytes())?;
        Ok([("MM_BK", self.bk as f64), ("MM_STAGES", self.stages as f64)])
    }
}

impl MatmulTiling {
    /// The vec4 kernel with default slices.
    pub const V4_DEFAULT: MatmulTiling = MatmulTiling::V4(Vec4Slices { bk: 16, stages: 1 });

    /// The kernel's name in benchmark output (the vec4 kernel's slices when not the default).
    pub fn name(self) -> String {
        match self {
            MatmulTiling::T64 => "wgsl_tiled_64x64_4x4".into(),
            MatmulTiling::T128 => "wgsl_tiled_128x128_8x8".into(),
            MatmulTiling::V4(v) if v == Vec4Slices::default() => {
                "wgsl_tiled_128x128_8x8_vec4".into()
            }
            MatmulTiling::V4(v) => format!("wgsl_tiled_128x128_8x8_vec4_bk{}_s{}", v.bk, v.stages),
        }
    }

    /// Whether `V4` can run `s`: every operand's contiguous extent (K for A and B^T, M for A^T,
    /// N for B) is a multiple of 4, so each vec4 it loads is wholly inside or outside.
    pub fn vec4_fits(s: &MatmulShape) -> bool {
        let a = if s.trans_a { s.m } else { s.k };
        let b = if s.trans_b { s.k } else { s.n };
        a.is_multiple_of(4) && b.is_multiple_of(4)
    }

    /// The tiling for a problem: 128x128 tiles feed each loaded value to twice the FMAs but give
    /// a quarter of the workgroups, so they pay only when C is large enough to fill the GPU with
    /// them (about 32 tiles of 128x128 per problem and up). Among those, aligned problems (every
    /// matmul of the model: its widths are multiples of 4) take the vec4 kernel.
    pub fn auto(batch: usize, s: &MatmulShape) -> MatmulTiling {
        let (m, n) = (s.m, s.n);
        if batch * m.div_ceil(128) * n.div_ceil(128) >= 32 && m >= 128 && n >= 128 {
            if MatmulTiling::vec4_fits(s) { MatmulTiling::V4_DEFAULT } else { MatmulTiling::T128 }
        } else {
            MatmulTiling::T64
        }
    }

    fn tile_and_entry(self) -> (usize, &'static str) {
        match self {
            MatmulTiling::T64 => (64, "matmul_forward"),
            MatmulTiling::T128 => (128, "matmul_forward_128"),
            MatmulTiling::V4(_) => (128, "matmul_forward_v4"),
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
    matmul_batched_with(bt, MatmulTiling::auto(batch, &s), c, a, b, batch, s, accumulate)
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
    if let MatmulTiling::V4(slices) = tiling {
        if !MatmulTiling::vec4_fits(&s) {
            return Err(GpuError::Unsupported(format!(
                "{}: {s:?} has a contiguous extent that is not a multiple of 4",
                tiling.name()
            )));
        }
        let consts = slices.constants(bt)?;
        // The vec4 views of A and B live at bindings 4 and 5 (the scalar kernels' 2 and 3).
        let bufs = [(1, c), (4, a), (5, b)];
        return bt.dispatch_tuned("matmul", entry, &consts, &p, &bufs, groups);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_vec4_for_large_aligned_problems() {
        let s = |m, k, n, ta, tb| MatmulShape::new(m, k, n, ta, tb);
        // d12 shapes: (B T, C) x (C, 4C), the lm head, and a weight gradient (A^T B).
        assert_eq!(
            MatmulTiling::auto(1, &s(16384, 768, 3072, false, true)),
            MatmulTiling::V4_DEFAULT
        );
        assert_eq!(
            MatmulTiling::auto(1, &s(16384, 768, 32768, false, true)),
            MatmulTiling::V4_DEFAULT
        );
        assert_eq!(
            MatmulTiling::auto(1, &s(768, 16384, 768, true, false)),
            MatmulTiling::V4_DEFAULT
        );
        // A ragged contiguous extent falls back to the scalar 128 tiling, small problems to 64.
        assert_eq!(MatmulTiling::auto(1, &s(4096, 766, 4096, false, false)), MatmulTiling::T128);
        assert_eq!(MatmulTiling::auto(1, &s(4097, 768, 4096, true, false)), MatmulTiling::T128);
        assert_eq!(
            MatmulTiling::auto(1, &s(4097, 768, 4096, false, false)),
            MatmulTiling::V4_DEFAULT
        );
        assert_eq!(MatmulTiling::auto(1, &s(256, 256, 256, false, false)), MatmulTiling::T64);
    }
}

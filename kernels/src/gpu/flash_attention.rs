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

fn params(s: AttnShape, rows: usize, block: usize) -> Result<Params, GpuError> {
    super::attention::params(s, rows.div_ceil(block))
}

/// Tile sizes of the `*_tiled` kernels: `rows` (queries, or keys in the dK/dV pass) per
/// workgroup and `cols` per tile of the other side, each 16, 32 or 64 (16 x 16 threads hold
/// rows / 16 x cols / 16 each). Pipeline constants: changing them builds another pipeline, not
/// another shader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashTiles {
    pub rows: usize,
    pub cols: usize,
}

impl Default for FlashTiles {
    /// 64 x 32: 14.5 KiB of workgroup memory, within WebGPU's guaranteed 16 KiB.
    fn default() -> Self {
        FlashTiles { rows: 64, cols: 32 }
    }
}

impl FlashTiles {
    /// Workgroup memory the tiled kernels need: t_p (rows x cols), the staged slices
    /// (16 (rows + cols)) and two 64-float row vectors.
    pub fn workgroup_bytes(self) -> usize {
        4 * (self.rows * self.cols + 16 * (self.rows + self.cols) + 128)
    }

    fn constants(self, bt: &Batch) -> Result<[(&'static str, f64); 2], GpuError> {
        let ok = |n: usize| matches!(n, 16 | 32 | 64);
        if !ok(self.rows) || !ok(self.cols) {
            return Err(GpuError::Unsupported(format!(
                "flash tiles {}x{}: rows and cols must each be 16, 32 or 64",
                self.rows, self.cols
            )));
        }
        let what = format!("flash tiles {}x{}", self.rows, self.cols);
        bt.context().check_workgroup_bytes(&what, self.workgroup_bytes())?;
        Ok([("FT_RPT", (self.rows / 16) as f64), ("FT_CPT", (self.cols / 16) as f64)])
    }
}

/// Which kernels run attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashKernel {
    /// The `*_tiled` kernels: register tiles over a 16 x 16 workgroup. Head dims that are
    /// multiples of 16 up to 128.
    Tiled(FlashTiles),
    /// One thread per query (or key) row: every head dim up to 256.
    Rows,
}

impl FlashKernel {
    /// The tiled kernels with default tiles where the head dim allows them (the model's 64 and
    /// 128), else one thread per row.
    pub fn for_head_dim(d: usize) -> FlashKernel {
        if d.is_multiple_of(16) && d <= 128 {
            FlashKernel::Tiled(FlashTiles::default())
        } else {
            FlashKernel::Rows
        }
    }
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
    flash_forward_with(bt, FlashKernel::for_head_dim(s.d), out, lse, q, k, v, s)
}

/// `flash_forward` on chosen kernels (benchmarks, tuning, tests).
#[allow(clippy::too_many_arguments)]
pub fn flash_forward_with(
    bt: &mut Batch,
    kernel: FlashKernel,
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
    match kernel {
        FlashKernel::Tiled(tiles) => {
            check_tiled(s)?;
            let consts = tiles.constants(bt)?;
            let p = params(s, s.tq, tiles.rows)?;
            let groups = grid_1d(s.b * s.h * p.blocks as usize, 1);
            // The tiled kernels share helpers that can read dout (binding 6); the forward never
            // does, so q stands in for it.
            let bufs = [(1, out), (2, lse), (3, q), (4, k), (5, v), (6, q)];
            bt.dispatch_tuned("flash_attention", "flash_forward_tiled", &consts, &p, &bufs, groups)
        }
        FlashKernel::Rows => {
            let p = params(s, s.tq, BR)?;
            let groups = grid_1d(s.b * s.h * p.blocks as usize, 1);
            let bufs = [(1, out), (2, lse), (3, q), (4, k), (5, v)];
            bt.dispatch_bound("flash_attention", "flash_forward", &p, &bufs, groups)
        }
    }
}

fn check_tiled(s: AttnShape) -> Result<(), GpuError> {
    if FlashKernel::for_head_dim(s.d) == FlashKernel::Rows {
        return Err(GpuError::Unsupported(format!(
            "tiled flash attention needs a head dim that is a multiple of 16 up to 128, got {}",
            s.d
        )));
    }
    Ok(())
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
    let bufs = [dq, dk, dv, dout, q, k, v, out, lse];
    flash_backward_with(bt, FlashKernel::for_head_dim(s.d), bufs, s)
}

/// `flash_backward` on chosen kernels; `bufs` = dq, dk, dv, dout, q, k, v, out, lse.
pub fn flash_backward_with(
    bt: &mut Batch,
    kernel: FlashKernel,
    bufs: [&GpuBuffer; 9],
    s: AttnShape,
) -> Result<(), GpuError> {
    let [dq, dk, dv, dout, q, k, v, out, lse] = bufs;
    check_io(s, q, k, v)?;
    for (what, b) in [("flash dq", dq), ("flash dout", dout), ("flash out", out)] {
        b.check(what, q.len())?;
    }
    dk.check("flash dk", k.len())?;
    dv.check("flash dv", k.len())?;
    let rows = s.b * s.tq * s.h;
    lse.check("flash lse", rows)?;
    let (block, consts, dq_entry, dkv_entry) = match kernel {
        FlashKernel::Tiled(tiles) => {
            check_tiled(s)?;
            let c = tiles.constants(bt)?;
            (tiles.rows, c.to_vec(), "flash_backward_dq_tiled", "flash_backward_dkv_tiled")
        }
        FlashKernel::Rows => (BR, Vec::new(), "flash_backward_dq", "flash_backward_dkv"),
    };
    let (pq, pk) = (params(s, s.tq, block)?, params(s, s.tk, block)?);
    let delta = bt.context().alloc(rows)?;
    let b1 = [(1, dq), (2, lse), (3, q), (4, k), (5, v), (6, dout), (7, out), (8, &delta)];
    let g1 = grid_1d(s.b * s.h * pq.blocks as usize, 1);
    bt.dispatch_tuned("flash_attention", dq_entry, &consts, &pq, &b1, g1)?;
    let b2 = [(1, dk), (2, lse), (3, q), (4, k), (5, v), (6, dout), (8, &delta), (9, dv)];
    let g2 = grid_1d(s.b * s.hkv * pk.blocks as usize, 1);
    bt.dispatch_tuned("flash_attention", dkv_entry, &consts, &pk, &b2, g2)
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

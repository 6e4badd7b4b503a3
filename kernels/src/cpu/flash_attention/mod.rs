//! Tiled flash attention (after FlashAttention-2) with the semantics of `attention.rs`: causal
//! sliding-window GQA in nanochat's layout, q (B, Tq, H, D), k, v (B, Tk, Hkv, D), query row i at
//! absolute position pos0 + i, scale 1/sqrt(D). `attention.rs` stays as the reference.
//!
//! Work is cut into Br x Bc tiles (`FlashBlocks`); no buffer ever spans all keys, so the extra
//! memory is O(threads (Br Bc + D max(Br, Bc))) whatever T is. Tile products run on the
//! `simd::BlockGemm` broadcast-FMA micro-kernels, whose B operand must be contiguous along the
//! output columns, so one operand of each score product is packed transposed: the query block
//! once per forward / dQ task (scores come out transposed, St = K Qt), the key and value blocks
//! once per dK/dV task.
//! - Forward: one task per (b, h, block of Br query rows). It walks the Bc-key blocks its rows
//!   see, keeping a running max m and sum l per row (online softmax) and accumulating out in
//!   place, rescaled by e^(m_old - m_new) when the max grows. Saves lse (B, Tq, H) for backward.
//! - Backward recomputes P = e^(S - lse) tile by tile, in two passes that each own what they
//!   write (no float atomics, deterministic):
//!   1. one task per (b, kv head g, key block): dk, dv of those keys, summed over every query
//!      head of g's group and every query block that sees the keys;
//!   2. one task per (b, h, query block): dq.
//!
//!   delta_i = dout_i . out_i is recomputed per tile (D FLOPs a row) instead of stored (B, T, H).
//! - Decode (Tq <= `DECODE_MAX_TQ`): too few query rows for a (b, h, query block) grid, so the
//!   keys are split into chunks instead (split-K, "flash-decoding"): one task per (b, kv head,
//!   chunk) covers all query rows of the group, then the chunks' (max, sum, out) are combined.
//!
//! Tiles are only visited inside each row block's key span [lo(first row), hi(last row)]; the
//! union of consecutive rows' windows is contiguous, so every visited tile has a visible key.
//! Forward writes `out =`, `lse =`; backward accumulates `dq +=`, `dk +=`, `dv +=`.
use super::SyncPtr;
use super::attention::AttnShape;
use super::isa::Isa;
use super::simd::Portable;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2Fma, Avx512};

/// Runs the instance of a task function for the `Kernels` `$k`: an AVX-512 or AVX2 instance
/// (entered with the markers that prove the CPU has their features) or the portable one. Task
/// functions take their (BlockGemm, Lanes) markers as the first argument.
macro_rules! dispatch {
    ($k:expr, $f:ident($($arg:expr),*)) => {
        match $k {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the markers exist only on CPUs with AVX-512F, AVX2 and FMA.
            Kernels::Avx512(g, l) => unsafe { x86_512::$f((g, l), $($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the marker exists only on CPUs with AVX2 + FMA.
            Kernels::Avx2(l) => unsafe { x86_256::$f((l, l), $($arg),*) },
            Kernels::Portable => $f((Portable, Portable), $($arg),*),
        }
    };
}

mod backward;
mod decode;
mod forward;
#[cfg(test)]
mod tests;

pub use backward::{flash_attention_backward, flash_backward_with};
pub use decode::flash_decode_with;
pub use forward::flash_forward_with;

/// Query rows (Br) and key rows (Bc) of one tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashBlocks {
    pub br: usize,
    pub bc: usize,
}

impl FlashBlocks {
    /// Forward blocks for head dim `d`: 64 x 64 up to D 64; above, 64 x 32. A tile's working set
    /// is the score tile (Br Bc floats) plus the packed Qt block (D Br), so at D 128 halving Bc
    /// keeps it at 40 KiB (in L1) for a 3% slowdown, where halving Br (the packed block) costs
    /// 17% (docs/perf/attention.md, "Choosing the blocks").
    pub fn forward(d: usize) -> FlashBlocks {
        if d <= 64 { FlashBlocks { br: 64, bc: 64 } } else { FlashBlocks { br: 64, bc: 32 } }
    }

    /// Backward blocks for head dim `d`: 64 x 32 up to D 64; above, 32 x 32. Backward holds two
    /// score tiles (P, dP) and two packed blocks (Kt and Vt, or Qt and dOut^T: D max(Br, Bc)
    /// each), twice the forward's, so it takes smaller tiles for the same working set.
    pub fn backward(d: usize) -> FlashBlocks {
        if d <= 64 { FlashBlocks { br: 64, bc: 32 } } else { FlashBlocks { br: 32, bc: 32 } }
    }
}

/// At or below this many query rows the forward splits keys instead of queries.
pub const DECODE_MAX_TQ: usize = 4;
/// Keys per split-K chunk. Fixed (not derived from the thread count) so results do not depend
/// on the machine; a chunk's 256 keys (2 D FMAs each per row) dwarf its D + 2 partial floats.
const DECODE_CHUNK: usize = 256;

/// Per-thread tiles: s (Br, Bc) scores / probabilities, dp (Br, Bc), kt, vt (D, max(Br, Bc))
/// transposed query, key, value or dout blocks, m, l (Br) running max and sum (backward: lse and
/// delta), tm, al (Br) a tile's row maxima and rescale factors.
struct Scratch {
    s: Vec<f32>,
    dp: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    tm: Vec<f32>,
    al: Vec<f32>,
}

impl Scratch {
    fn new(s: AttnShape, bl: FlashBlocks, backward: bool) -> Scratch {
        // Forward packs Qt (D, Br); backward Qt, dout^T (D, Br) or Kt, Vt (D, Bc).
        let sb = bl.br * bl.bc;
        let tb = if backward { s.d * bl.br.max(bl.bc) } else { s.d * bl.br };
        let (dp, vt) = if backward { (sb, tb) } else { (0, 0) };
        Scratch {
            s: vec![0.0; sb],
            dp: vec![0.0; dp],
            kt: vec![0.0; tb],
            vt: vec![0.0; vt],
            m: vec![0.0; bl.br],
            l: vec![0.0; bl.br],
            tm: vec![0.0; if backward { 0 } else { bl.br }],
            al: vec![0.0; if backward { 0 } else { bl.br }],
        }
    }
}

/// Inputs of the forward; out (B, Tq, H, D) and lse (B, Tq, H) are written by row owners (raw
/// pointers: rows of one head interleave with other heads' rows, so no task may hold a `&mut`
/// slice spanning them).
struct Fwd<'a> {
    s: AttnShape,
    bl: FlashBlocks,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: SyncPtr,
    lse: SyncPtr,
}

/// Inputs of the backward; dq (B, Tq, H, D), dk, dv (B, Tk, Hkv, D) are written by row owners.
struct Bwd<'a> {
    s: AttnShape,
    bl: FlashBlocks,
    dout: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    dq: SyncPtr,
    dk: SyncPtr,
    dv: SyncPtr,
}

/// dst (D, n) = the n rows src[at + jj stride..][..D] transposed: the B operand of a score
/// product, contiguous along its output columns as `BlockGemm` needs (no horizontal sums).
#[inline(always)]
fn pack_t(dst: &mut [f32], src: &[f32], at: usize, stride: usize, n: usize, d: usize) {
    for jj in 0..n {
        for (c, &x) in src[at + jj * stride..][..d].iter().enumerate() {
            dst[c * n + jj] = x;
        }
    }
}

/// Visible columns a..=z of query row i in the key tile j0..j0+n, or `None`.
#[inline(always)]
fn cols(s: &AttnShape, i: usize, j0: usize, n: usize) -> Option<(usize, usize)> {
    let (lo, hi) = s.key_range(i);
    let (a, z) = (lo.max(j0), hi.min(j0 + n - 1));
    (a <= z).then(|| (a - j0, z - j0))
}

/// Max in 16 lanes so it vectorises (`f32::max` folds stay scalar: NaN semantics).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let pick = |m: f32, v: f32| if v > m { v } else { m };
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| pick(m, v));
    for c in chunks {
        for k in 0..16 {
            acc[k] = pick(acc[k], c[k]);
        }
    }
    acc.iter().fold(tail, |m, &v| pick(m, v))
}

/// The `d` floats at `p`.
///
/// # Safety
/// They are in bounds and no other reference to them is live.
#[inline(always)]
unsafe fn row_mut<'a>(p: *mut f32, d: usize) -> &'a mut [f32] {
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts_mut(p, d) }
}

/// Visible query columns a..=z of key j in the query tile i0..i0+n, or `None`.
#[inline(always)]
fn qcols(s: &AttnShape, j: usize, i0: usize, n: usize) -> Option<(usize, usize)> {
    let (lo, hi) = s.query_range(j)?;
    let (a, z) = (lo.max(i0), hi.min(i0 + n - 1));
    (a <= z).then(|| (a - i0, z - i0))
}

/// Whether every query row i0..i0+nr sees every key j0..j0+nc (the tile needs no mask): the
/// first row's position bounds the keys above, the last row's window start below.
#[inline(always)]
fn full_tile(s: &AttnShape, i0: usize, nr: usize, j0: usize, nc: usize) -> bool {
    j0 + nc - 1 <= s.key_range(i0).1 && j0 >= s.key_range(i0 + nr - 1).0
}

/// The kernels flash attention runs for `isa`, holding the markers that prove the CPU has
/// their features.
#[derive(Clone, Copy)]
enum Kernels {
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512, Avx2Fma),
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2Fma),
    Portable,
}

fn kernels(isa: Isa) -> Kernels {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        let (g, l) = (Avx512::new(), Avx2Fma::new());
        match (isa, g, l) {
            (Isa::Avx512, Some(g), Some(l)) => return Kernels::Avx512(g, l),
            (_, _, Some(l)) => return Kernels::Avx2(l),
            _ => {}
        }
    }
    let _ = isa;
    Kernels::Portable
}

/// out (B, Tq, H, D), lse (B, Tq, H) = attention(q (B, Tq, H, D), k, v (B, Tk, Hkv, D)), tiled;
/// split-K over the keys when Tq <= `DECODE_MAX_TQ`.
pub fn flash_attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    bl: FlashBlocks,
) {
    if s.tq <= DECODE_MAX_TQ {
        flash_decode_with(Isa::detect(), out, lse, q, k, v, s, bl)
    } else {
        flash_forward_with(Isa::detect(), out, lse, q, k, v, s, bl)
    }
}

/// Panics unless the blocks are non-empty and the buffers (q, k, v, out[, dq, dk, dv, dout])
/// and lse have the lengths of `s`: in release builds too, since the tasks write through raw
/// pointers.
fn check_sizes(s: AttnShape, bl: FlashBlocks, qkv: &[usize], lse: usize) {
    assert!(bl.br > 0 && bl.bc > 0, "flash attention: empty blocks {bl:?}");
    s.check_buffers(qkv, &[lse]);
}

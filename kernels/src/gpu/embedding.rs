//! Launchers for `wgsl/embedding.wgsl` (as `cpu::embedding`). The backward is deterministic
//! without atomics: positions are grouped by id on the host (ids live on the host anyway).
use super::context::{Batch, GpuBuffer, GpuError, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    _pad: [u32; 2],
}

/// out (N, C) = weight (V, C)[ids (N)]; ids must be < V (the caller validates them).
pub fn embedding_forward(
    bt: &mut Batch,
    out: &GpuBuffer,
    weight: &GpuBuffer,
    ids: &GpuBuffer,
    c: usize,
) -> Result<(), GpuError> {
    let n = ids.len() * c;
    out.check("embedding out", n)?;
    let p = Params { n: n as u32, c: c as u32, _pad: [0; 2] };
    bt.dispatch("embedding", "embedding_forward", &p, &[out, weight, ids], grid_1d(n, 256))
}

/// Positions grouped by id: (unique ids, offsets (U + 1), positions (N) ascending within an id).
pub fn group_positions(ids: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&i| (ids[i as usize], i)); // stable by position within an id
    let (mut uniq, mut offsets) = (Vec::new(), Vec::new());
    for (e, &i) in order.iter().enumerate() {
        let id = ids[i as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            offsets.push(e as u32);
        }
    }
    offsets.push(order.len() as u32);
    (uniq, offsets, order)
}

/// dweight (V, C) += sum of dout (N, C) rows at the positions holding each id.
pub fn embedding_backward(
    bt: &mut Batch,
    dweight: &GpuBuffer,
    dout: &GpuBuffer,
    ids: &[u32],
    c: usize,
) -> Result<(), GpuError> {
    dout.check("embedding dout", ids.len() * c)?;
    if ids.is_empty() || c == 0 {
        return Ok(());
    }
    let (uniq, offsets, positions) = group_positions(ids);
    let (u, o, pos) = (bt.upload(&uniq)?, bt.upload(&offsets)?, bt.upload(&positions)?);
    let n = uniq.len() * c;
    let p = Params { n: n as u32, c: c as u32, _pad: [0; 2] };
    bt.dispatch(
        "embedding",
        "embedding_backward",
        &p,
        &[dweight, dout, &u, &o, &pos],
        grid_1d(n, 256),
    )
}

//! A recycler for large f32 buffers, like PyTorch's caching allocator.
//!
//! Why: a training step allocates the same activation and gradient sizes every step, and the
//! first touch of fresh memory costs a page fault per 4 KiB page (two when a `+=` kernel reads a
//! zero page before writing it). On a (B*T, V) logits buffer that is 5-20x the kernel itself.
//! Freed buffers of at least `MIN_LEN` elements are kept by exact length, up to a byte limit
//! (reaching it empties the pool), and handed back to the next allocation of that length.
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use femtochat_kernels::cpu::elementwise::CHUNK;
use rayon::prelude::*;

/// Smaller buffers are left to malloc, whose free lists already recycle them cheaply.
const MIN_LEN: usize = 1 << 14;

/// Default cap on the bytes held for reuse.
pub const DEFAULT_POOL_LIMIT: usize = 4 << 30;

struct Pool {
    free: BTreeMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
    limit: usize,
}

static POOL: Mutex<Pool> =
    Mutex::new(Pool { free: BTreeMap::new(), bytes: 0, limit: DEFAULT_POOL_LIMIT });

fn pool() -> MutexGuard<'static, Pool> {
    // The pool holds only spare memory, so a panic mid-update leaves nothing inconsistent.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Cap the memory kept for reuse (0 disables pooling); drops what is over the new cap.
pub fn set_pool_limit(bytes: usize) {
    let mut p = pool();
    p.limit = bytes;
    if p.bytes > bytes {
        p.free.clear();
        p.bytes = 0;
    }
}

/// Hand every buffer held for reuse back to the system (after a phase whose sizes will not
/// come again, e.g. a model's f32 weights dropped for a bf16 copy); the limit stays.
pub fn trim_pool() {
    let mut p = pool();
    p.free.clear();
    p.bytes = 0;
}

/// Bytes currently held for reuse.
pub fn pooled_bytes() -> usize {
    pool().bytes
}

fn reuse(n: usize) -> Option<Vec<f32>> {
    if n < MIN_LEN {
        return None;
    }
    let mut p = pool();
    let v = p.free.get_mut(&n)?.pop()?;
    p.bytes -= n * 4;
    Some(v)
}

/// A buffer of `n` elements with unspecified contents, for outputs a kernel fully overwrites.
pub(crate) fn alloc_uninit(n: usize) -> Vec<f32> {
    reuse(n).unwrap_or_else(|| vec![0.0; n])
}

/// A zero-filled buffer of `n` elements, for gradients that kernels accumulate into.
pub(crate) fn alloc_zeroed(n: usize) -> Vec<f32> {
    let mut v = reuse(n).unwrap_or_else(|| Vec::with_capacity(n));
    // Writing zeros (rather than calloc's lazily mapped zero pages) takes one write fault per
    // fresh page, in parallel, instead of a read fault then a copy-on-write fault inside `+=`.
    if v.len() != n {
        v.clear();
        v.resize(n, 0.0);
    } else if n > CHUNK {
        v.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
    } else {
        v.fill(0.0);
    }
    v
}

/// Hand a buffer back for reuse.
pub(crate) fn recycle(v: Vec<f32>) {
    let n = v.len();
    if n < MIN_LEN || v.capacity() != n {
        return;
    }
    let mut p = pool();
    if p.bytes + n * 4 > p.limit {
        // Shapes changed (a new sequence length, say): drop the stale set rather than pinning
        // memory that may never be asked for again.
        p.free.clear();
        p.bytes = 0;
        if n * 4 > p.limit {
            return;
        }
    }
    p.bytes += n * 4;
    p.free.entry(n).or_default().push(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycles_by_length_and_zeroes_on_request() {
        let n = MIN_LEN + 12_345; // a length no other test uses
        let mut v = alloc_uninit(n);
        v.fill(7.0);
        let ptr = v.as_ptr();
        recycle(v);
        let z = alloc_zeroed(n);
        assert_eq!(z.as_ptr(), ptr);
        assert!(z.iter().all(|&x| x == 0.0));
        recycle(alloc_uninit(10)); // too small: ignored
    }
}

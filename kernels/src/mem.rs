//! Memory accounting: live bytes and their high-water mark, on the host and on the GPU.
//!
//! Host: [`CountingAlloc`] wraps the system allocator and counts every heap byte the process
//! holds (tensor storage, saved activations, gradients, optimizer state, the engine's buffer
//! recycler, and the small bookkeeping around them). It counts only where a binary installs it
//! (`#[global_allocator] static A: CountingAlloc = CountingAlloc;`); elsewhere the host counters
//! stay at 0 and [`host_counting`] says so. Why the allocator and not the tensor types: transient
//! buffers (a gradient in flight between two backward rules, a kernel's scratch) are part of the
//! peak too, and only the allocator sees all of them.
//!
//! GPU: the buffer pool counts the storage buffers it has created and not yet released to the
//! driver, idle pooled ones included (they are still device memory).
//!
//! Each counter is two relaxed atomics (an add and a max) per allocation.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

static HOST_LIVE: AtomicUsize = AtomicUsize::new(0);
static HOST_PEAK: AtomicUsize = AtomicUsize::new(0);

static GPU_LIVE: AtomicU64 = AtomicU64::new(0);
static GPU_PEAK: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting live bytes and their high-water mark.
pub struct CountingAlloc;

fn grew(n: usize) {
    let live = HOST_LIVE.fetch_add(n, Ordering::Relaxed) + n;
    // Load first: the common case (below the peak) then costs no write to the shared line.
    if live > HOST_PEAK.load(Ordering::Relaxed) {
        HOST_PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

fn shrank(n: usize) {
    HOST_LIVE.fetch_sub(n, Ordering::Relaxed);
}

// SAFETY: every call forwards to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Count the new block before releasing the old: both exist during the copy.
            grew(new_size);
            shrank(layout.size());
        }
        p
    }
}

/// Whether this process counts host allocations (its binary installed [`CountingAlloc`]): any
/// allocation through it has moved the high-water mark off 0.
pub fn host_counting() -> bool {
    HOST_PEAK.load(Ordering::Relaxed) > 0
}

/// Heap bytes live now.
pub fn host_bytes() -> usize {
    HOST_LIVE.load(Ordering::Relaxed)
}

/// The high-water mark of [`host_bytes`] since the process started or the last
/// [`reset_peaks`].
pub fn host_peak_bytes() -> usize {
    HOST_PEAK.load(Ordering::Relaxed)
}

/// GPU storage bytes allocated now (in use or idle in the pool).
pub fn gpu_bytes() -> u64 {
    GPU_LIVE.load(Ordering::Relaxed)
}

/// The high-water mark of [`gpu_bytes`].
pub fn gpu_peak_bytes() -> u64 {
    GPU_PEAK.load(Ordering::Relaxed)
}

/// Restart both high-water marks from what is live now (e.g. after a warm-up step, or to
/// measure one phase).
pub fn reset_peaks() {
    HOST_PEAK.store(HOST_LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    GPU_PEAK.store(GPU_LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

pub(crate) fn gpu_grew(n: u64) {
    let live = GPU_LIVE.fetch_add(n, Ordering::Relaxed) + n;
    GPU_PEAK.fetch_max(live, Ordering::Relaxed);
}

pub(crate) fn gpu_shrank(n: u64) {
    GPU_LIVE.fetch_sub(n, Ordering::Relaxed);
}

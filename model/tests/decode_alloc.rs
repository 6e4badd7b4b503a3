//! Decode steps allocate nothing once the `Decoder`'s buffers fit the batch and the cache. One
//! test in its own binary: the counter is process-wide (the step may run on rayon's threads),
//! so no other test may run beside it.
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use femtochat_engine::Ids;
use femtochat_model::parity::Fixture;
use femtochat_model::{Decoder, KvCache};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> usize {
    ALLOCS.load(Ordering::Relaxed)
}

#[test]
fn steady_state_steps_do_not_allocate() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/model");
    let gpt = Fixture::load(&p.join("gqa_window.safetensors")).unwrap().model().unwrap();
    let v = gpt.config().vocab_size;
    let mut cache = KvCache::new(gpt.config(), 64);
    for n in [3, 9] {
        let mut one = KvCache::with_rows(gpt.config(), 1, 64);
        let ids = Ids::new((0..n).map(|i| i * 11 % v as u32).collect(), &[1, n as usize]).unwrap();
        gpt.forward_cached_last(&ids, &mut one).unwrap();
        cache.absorb(one).unwrap();
    }
    let mut dec = Decoder::new();
    gpt.decode_step(&[1, 2], &mut cache, &mut dec).unwrap();
    let grows = dec.grows();
    let before = allocs();
    for t in 0..20u32 {
        let logits = gpt.decode_step(&[t, t + 1], &mut cache, &mut dec).unwrap();
        assert_eq!(logits.len(), 2 * v);
    }
    assert_eq!(allocs() - before, 0, "decode steps allocated");
    assert_eq!(dec.grows(), grows);
    // A smaller batch reuses the buffers too.
    cache.take_row(1).unwrap();
    let before = allocs();
    gpt.decode_step(&[7], &mut cache, &mut dec).unwrap();
    assert_eq!(allocs() - before, 0);
    // The counter does count: a larger batch than before grows the buffers.
    let more = cache.fork_row(0, 3).unwrap();
    cache.absorb(more).unwrap();
    let before = allocs();
    gpt.decode_step(&[1, 2, 3, 4], &mut cache, &mut dec).unwrap();
    assert!(allocs() > before);
    assert!(dec.grows() > grows);
}

//! The GPU buffer pool, in its own test binary: the pool is process-wide, so tests running in
//! parallel beside these would move its byte counts. The tests here take `SERIAL` for the same
//! reason.
use std::sync::Mutex;

use femtochat_kernels::gpu::{self, GpuContext};

static SERIAL: Mutex<()> = Mutex::new(());

/// Freed buffers are pooled up to the cap and reused; past the cap they go back to the driver.
#[test]
fn buffer_pool_reuses_and_respects_its_cap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = match GpuContext::get() {
        Ok(c) => c,
        Err(e) if std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1") => {
            eprintln!("skipping GPU test: {e}");
            return;
        }
        Err(e) => panic!("{e} (set FEMTOCHAT_SKIP_GPU=1 to skip GPU tests locally)"),
    };
    let before = ctx.pooled_bytes(); // what the other test left
    drop(ctx.alloc(300_000).unwrap()); // 1.2 MB -> the 2 MiB class
    assert_eq!(ctx.pooled_bytes() - before, 2 << 20, "the freed buffer is kept");
    let b = ctx.alloc(300_000).unwrap(); // reuses it
    assert_eq!(ctx.pooled_bytes(), before);
    drop(b);
    ctx.set_pool_limit(0);
    assert_eq!(ctx.pooled_bytes(), 0);
    drop(ctx.alloc(300_000).unwrap());
    assert_eq!(ctx.pooled_bytes(), 0, "nothing is kept past the cap");
    ctx.set_pool_limit(gpu::DEFAULT_POOL_LIMIT);
}

/// A buffer dropped while an unsubmitted batch still writes it is not handed out again until
/// that batch is submitted: otherwise a queue write to its new owner would run first and the
/// batch would then overwrite it.
#[test]
fn buffers_of_unsubmitted_batches_are_not_reused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Ok(ctx) = GpuContext::get() else {
        assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "no GPU adapter");
        return;
    };
    let n = 1000;
    let src = ctx.upload(&vec![1.0f32; n]).unwrap();
    let x = ctx.alloc(n).unwrap();
    let mut bt = ctx.batch();
    bt.copy(&x, &src).unwrap(); // the batch writes x ...
    drop(x); // ... whose owner lets go before the batch is submitted
    let z = ctx.upload(&vec![2.0f32; n]).unwrap(); // same size class
    bt.submit();
    assert!(z.to_vec::<f32>().unwrap().iter().all(|&v| v == 2.0), "z was overwritten");
}

//! The GPU buffer pool, alone in its test binary: the pool is process-wide, so tests running in
//! parallel beside it would move its byte counts.
use femtochat_kernels::gpu::{self, GpuContext};

/// Freed buffers are pooled up to the cap and reused; past the cap they go back to the driver.
#[test]
fn buffer_pool_reuses_and_respects_its_cap() {
    let ctx = match GpuContext::get() {
        Ok(c) => c,
        Err(e) if std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1") => {
            eprintln!("skipping GPU test: {e}");
            return;
        }
        Err(e) => panic!("{e} (set FEMTOCHAT_SKIP_GPU=1 to skip GPU tests locally)"),
    };
    drop(ctx.alloc(300_000).unwrap()); // 1.2 MB -> the 2 MiB class
    let held = ctx.pooled_bytes();
    assert_eq!(held, 2 << 20, "the freed buffer is kept");
    let b = ctx.alloc(300_000).unwrap(); // reuses it
    assert_eq!(ctx.pooled_bytes(), 0);
    drop(b);
    ctx.set_pool_limit(0);
    assert_eq!(ctx.pooled_bytes(), 0);
    drop(ctx.alloc(300_000).unwrap());
    assert_eq!(ctx.pooled_bytes(), 0, "nothing is kept past the cap");
    ctx.set_pool_limit(gpu::DEFAULT_POOL_LIMIT);
}

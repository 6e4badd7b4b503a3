//! The host accounting (`mem`, through the counting allocator) equals the sum of the buffers a
//! hand-built graph holds, at each stage of a forward and backward, and its high-water mark is
//! the largest such sum.
use femtochat_engine::mem::{self, CountingAlloc};
use femtochat_engine::{Tensor, pool};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Elements per buffer: 1 MiB of f32, large next to the graph's bookkeeping.
const N: usize = 1 << 18;
/// Bookkeeping allowed on top of the buffers (graph nodes, shapes, the gradient map).
const SLACK: usize = 16 << 10;

fn assert_near(what: &str, got: usize, want: usize) {
    assert!(got.abs_diff(want) <= SLACK, "{what}: {got} bytes counted, {want} expected");
}

#[test]
fn accounting_equals_the_live_buffers_of_a_graph() {
    assert!(mem::host_counting());
    // Freed buffers go back to the system, so what is counted is exactly what is held.
    pool::set_pool_limit(0);
    // Warm up: the kernels' thread pool allocates its own state on first use.
    drop(Tensor::param(vec![0.5; N], &[N]).unwrap().tanh().unwrap().mul(&Tensor::scalar(2.0)));
    let buf = 4 * N;
    let base = mem::host_bytes();
    let w = Tensor::param(vec![0.5; N], &[N]).unwrap();
    assert_near("parameter", mem::host_bytes() - base, buf);
    mem::reset_peaks();
    let a = w.tanh().unwrap();
    let b = a.mul(&a).unwrap();
    let loss = b.sum().unwrap();
    assert_near("after the forward", mem::host_bytes() - base, 3 * buf);
    let grads = loss.backward().unwrap();
    // w, a, b, and w's gradient.
    assert_near("after the backward", mem::host_bytes() - base, 4 * buf);
    // The peak: w, a, b with d b and d a in flight (then with d a and d w).
    assert_near("peak of the backward", mem::host_peak_bytes() - base, 5 * buf);
    drop((loss, b, a));
    assert_near("graph dropped", mem::host_bytes() - base, 2 * buf);
    drop(grads);
    assert_near("gradients dropped", mem::host_bytes() - base, buf);
    drop(w);
    assert_near("all dropped", mem::host_bytes(), base);
    pool::set_pool_limit(pool::DEFAULT_POOL_LIMIT);
}

//! Data-parallel training across processes (docs/distributed.md): a small collective interface
//! (`Comm`), the process's world, and the rank-strided view of the batch stream.
//!
//! Built without the `mpi` feature, or started without `mpirun`/`srun`, the world is one process
//! (`Single`) and nothing here communicates. With the feature and a launcher, every rank is one
//! process: it trains on its share of each step's micro-batches, the optimizer (`optim.rs`)
//! reduces the gradients and shares the update work as nanochat's distributed MuonAdamW does, and
//! rank 0 alone writes the run directory.
//!
//! MPI is called from the main thread only (`Threading::Funneled`); the loader and rayon threads
//! never communicate.
pub mod optim;

#[cfg(feature = "mpi")]
mod mpi_comm;

use std::sync::OnceLock;

use anyhow::{Result, bail};

use crate::trainer::{Batch, BatchSource};

/// Collectives over the ranks of a job. Every rank must call the same collectives in the same
/// order with the same lengths. Sums are in f32 (gradients) or f64 (losses, flags).
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `buf` becomes the element-wise sum of every rank's `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// send (size * k) -> recv (k): the sum over ranks of block `rank` of `send`.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// send (k) -> recv (size * k): block r of `recv` is rank r's `send`.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Rank 0's bytes, on every rank.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()>;
    /// Wait for every rank, with no time limit: where rank 0 works alone for as long as it
    /// takes (validation, CORE, samples) and the others wait for it.
    fn wait_for_all(&self) -> Result<()>;
    /// Stop every rank of the job now (after a rank's error, so that no rank waits forever in a
    /// collective the failed rank will never join).
    fn abort(&self, code: i32) -> !;
    /// Payload bytes this rank has sent so far under a ring schedule (see `ring_bytes`).
    fn bytes_sent(&self) -> u64;
}

/// What one rank sends under the ring algorithm for a collective over `elems` f32 values (the
/// whole vector, i.e. `size * k` for reduce-scatter and all-gather): all-reduce sends
/// 2 (N-1)/N of it, reduce-scatter and all-gather (N-1)/N. The communication model of
/// docs/distributed.md.
pub fn ring_bytes(op: Collective, elems: usize, size: usize) -> u64 {
    let n = size as u64;
    let whole = 4 * elems as u64;
    match op {
        Collective::AllReduce => 2 * (n - 1) * whole / n,
        Collective::ReduceScatter | Collective::AllGather => (n - 1) * whole / n,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    AllReduce,
    ReduceScatter,
    AllGather,
}

/// The world of one process: every collective is a copy.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_lengths("reduce-scatter", send.len(), recv.len(), 1)?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_lengths("all-gather", recv.len(), send.len(), 1)?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn wait_for_all(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn bytes_sent(&self) -> u64 {
        0
    }
}

/// `whole` must be `size` blocks of `part`.
pub fn check_lengths(op: &str, whole: usize, part: usize, size: usize) -> Result<()> {
    if whole != part * size {
        bail!("{op}: {whole} values are not {size} blocks of {part}");
    }
    Ok(())
}

static WORLD: OnceLock<Box<dyn Comm>> = OnceLock::new();

/// This process's world: MPI's when `init` started it, else one process.
pub fn world() -> &'static dyn Comm {
    match WORLD.get() {
        Some(w) => w.as_ref(),
        None => &Single,
    }
}

/// Rank 0 writes the run directory, logs, evaluates and draws progress.
pub fn is_lead() -> bool {
    world().rank() == 0
}

/// Keeps MPI initialised; finalises it when dropped (the end of `main`).
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Whether a launcher (mpirun, srun) started this process as one rank of a job.
pub fn launched_as_rank() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// This process's rank among the job's ranks on its machine, when a launcher started it
/// (OpenMPI, Slurm, MPICH/Hydra): the GPU it takes by default.
pub fn local_rank() -> Option<usize> {
    if !launched_as_rank() {
        return None;
    }
    ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// Join the job this process was launched into (feature `mpi` and a launcher), else stay one
/// process. A launcher without the feature is an error: N copies would each train alone.
pub fn init() -> Result<Guard> {
    if !launched_as_rank() {
        return Ok(Guard {
            #[cfg(feature = "mpi")]
            _universe: None,
        });
    }
    #[cfg(feature = "mpi")]
    {
        let (universe, comm) = mpi_comm::start()?;
        if comm.size() > 1 {
            let _ = WORLD.set(Box::new(comm));
        }
        Ok(Guard { _universe: Some(universe) })
    }
    #[cfg(not(feature = "mpi"))]
    {
        let size = std::env::var("OMPI_COMM_WORLD_SIZE")
            .or_else(|_| std::env::var("PMI_SIZE"))
            .unwrap_or_default();
        if size.is_empty() || size == "1" {
            return Ok(Guard {});
        }
        bail!(
            "launched as one of {size} MPI ranks, but this `train` was built without MPI: build \
             it with `cargo build --release --features mpi` (docs/distributed.md), or run one \
             process without mpirun"
        )
    }
}

/// This rank's contiguous share of `n` items, [r n / N, (r + 1) n / N) (one process: all of
/// them): how `train eval` splits each task's problems over the ranks.
pub fn share(n: usize) -> std::ops::Range<usize> {
    let w = world();
    share_of(n, w.rank(), w.size())
}

/// Rank `r`'s share of `n` items among `size` ranks; the shares tile 0..n in rank order.
pub fn share_of(n: usize, r: usize, size: usize) -> std::ops::Range<usize> {
    r * n / size..(r + 1) * n / size
}

/// Say which share of `what` this rank evaluates (one line on stderr, only in a job of
/// several ranks).
pub fn say_share(what: &str, range: &std::ops::Range<usize>, n: usize) {
    let w = world();
    if w.size() > 1 {
        eprintln!("rank {} of {}: {what}: problems {range:?} of {n}", w.rank(), w.size());
    }
}

/// `counts` summed over the ranks (unchanged in one process): each rank's share of a task's
/// solved problems added up. Sums of integers in f64 are exact, so the totals are those of one
/// process.
pub fn sum_counts(counts: &mut [f64]) -> Result<()> {
    let w = world();
    if w.size() > 1 {
        w.all_reduce_sum_f64(counts)?;
    }
    Ok(())
}

/// Every rank's (loss sum, learned micro-batches) added up: the step's loss over all ranks.
pub fn sum_loss(loss_sum: f64, batches: usize) -> Result<(f64, usize)> {
    let w = world();
    if w.size() == 1 {
        return Ok((loss_sum, batches));
    }
    let mut buf = [loss_sum, batches as f64];
    w.all_reduce_sum_f64(&mut buf)?;
    Ok((buf[0], buf[1] as usize))
}

/// Whether `r` succeeded on every rank; a failure on another rank becomes an error here too,
/// so that every rank takes the same branch after a step that may fail on some (a checkpoint).
pub fn agree<T>(what: &str, r: Result<T>) -> Result<T> {
    let w = world();
    if w.size() == 1 {
        return r;
    }
    let mut failed = [if r.is_err() { 1.0 } else { 0.0 }];
    w.all_reduce_sum_f64(&mut failed)?;
    match r {
        Err(e) => Err(e),
        Ok(_) if failed[0] > 0.0 => bail!("{what} failed on {} other rank(s)", failed[0]),
        Ok(v) => Ok(v),
    }
}

/// The other ranks wait, without the watchdog's limit, while rank 0 evaluates.
pub fn wait_for_lead() -> Result<()> {
    let w = world();
    if w.size() == 1 {
        return Ok(());
    }
    w.wait_for_all()
}

/// Rank 0's string on every rank (the run id of a new run).
pub fn broadcast_string(s: String) -> Result<String> {
    let w = world();
    if w.size() == 1 {
        return Ok(s);
    }
    let mut bytes = s.into_bytes();
    w.broadcast_bytes(&mut bytes)?;
    Ok(String::from_utf8(bytes)?)
}

/// Per-rank micro-batches per optimizer step: `grad_accum` (the whole step's micro-batches,
/// as one process counts them) split evenly over the ranks.
pub fn local_accum(grad_accum: usize) -> Result<usize> {
    let n = world().size();
    if !grad_accum.is_multiple_of(n) {
        bail!(
            "a step of {grad_accum} micro-batches does not split over {n} ranks: give a total \
             batch size that is a multiple of device batch x sequence length x {n}, or another \
             number of ranks"
        );
    }
    Ok(grad_accum / n)
}

/// This rank's share of a batch stream: micro-batches rank, rank + N, rank + 2N, ... of the
/// stream one process would read. Each call reads N micro-batches and keeps one, so between
/// calls the inner stream stands at a multiple of N on every rank and `state` is the same on
/// every rank: a checkpoint written by rank 0 restores every rank. The union of the ranks'
/// micro-batches for a step is exactly the step of one process with N times the accumulation.
///
/// Every rank reads (tokenizes, packs) the whole stream, a cost of (N-1) redundant loader work
/// per rank, paid on the loader's own thread; docs/distributed.md weighs it.
pub struct Strided<'a> {
    inner: &'a mut dyn BatchSource,
    rank: usize,
    size: usize,
}

impl<'a> Strided<'a> {
    pub fn new(inner: &'a mut dyn BatchSource, rank: usize, size: usize) -> Strided<'a> {
        Strided { inner, rank, size: size.max(1) }
    }

    /// The world's share of `inner`.
    pub fn of_world(inner: &'a mut dyn BatchSource) -> Strided<'a> {
        let w = world();
        Strided::new(inner, w.rank(), w.size())
    }
}

impl BatchSource for Strided<'_> {
    fn next_batch(&mut self) -> Result<Batch> {
        let mut mine = None;
        for i in 0..self.size {
            let b = self.inner.next_batch()?;
            if i == self.rank {
                mine = Some(b);
            }
        }
        mine.ok_or_else(|| anyhow::anyhow!("rank {} is not below {}", self.rank, self.size))
    }
    fn state(&self) -> serde_json::Value {
        self.inner.state()
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.inner.restore(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Count(u32);
    impl BatchSource for Count {
        fn next_batch(&mut self) -> Result<Batch> {
            self.0 += 1;
            Ok(Batch { inputs: vec![self.0 - 1], targets: vec![0] })
        }
        fn state(&self) -> serde_json::Value {
            serde_json::json!(self.0)
        }
        fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
            self.0 = state.as_u64().unwrap_or(0) as u32;
            Ok(())
        }
    }

    /// The ranks' shares of n problems tile 0..n in order, sizes differing by at most one.
    #[test]
    fn shares_tile_the_problems() {
        for n in [0, 1, 5, 13, 64] {
            for size in 1..=5 {
                let parts: Vec<_> = (0..size).map(|r| share_of(n, r, size)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, n);
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
                let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "{lens:?}");
            }
        }
        assert_eq!(share(7), 0..7, "one process evaluates everything");
    }

    /// Three ranks' shares interleave to the one stream, and stand at the same state after
    /// each call.
    #[test]
    fn strided_shares_cover_the_stream() {
        let mut seen = Vec::new();
        let mut states = Vec::new();
        for rank in 0..3 {
            let mut inner = Count(0);
            let mut s = Strided::new(&mut inner, rank, 3);
            let mine: Vec<u32> = (0..4).map(|_| s.next_batch().unwrap().inputs[0]).collect();
            assert_eq!(mine, (0..4).map(|i| 3 * i + rank as u32).collect::<Vec<_>>());
            states.push(s.state());
            seen.extend(mine);
        }
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
        assert!(states.iter().all(|s| *s == serde_json::json!(12)));
    }

    #[test]
    fn ring_bytes_model() {
        assert_eq!(ring_bytes(Collective::AllReduce, 1000, 1), 0);
        assert_eq!(ring_bytes(Collective::AllReduce, 1000, 2), 4000);
        assert_eq!(ring_bytes(Collective::ReduceScatter, 1200, 3), 3200);
        assert_eq!(ring_bytes(Collective::AllGather, 1200, 4), 3600);
    }
}

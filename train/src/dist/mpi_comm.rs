//! `Comm` over MPI (the `mpi` crate, rsmpi), with a watchdog: a collective that does not
//! complete within the timeout (a rank died without the launcher noticing, or hangs) ends this
//! rank with an error, and the launcher then stops the job.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{Collective, Comm, check_lengths, ring_bytes};

/// Seconds a collective may take before the watchdog ends the rank (`FEMTOCHAT_DIST_TIMEOUT`).
const DEFAULT_TIMEOUT_S: u64 = 600;

pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    sent: AtomicU64,
    /// When the collective in progress started (None between collectives), for the watchdog.
    busy: Arc<Mutex<Option<(Instant, &'static str)>>>,
}

// SAFETY: MPI was initialised with `Threading::Funneled` and every collective is issued from the
// main thread (the trainer's loop); other threads only hold the `&'static dyn Comm` without
// calling it. The communicator handle itself is an immutable integer/pointer.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

/// Initialise MPI and the watchdog.
pub fn start() -> Result<(Universe, MpiComm)> {
    let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
        .context("MPI was already initialised")?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let timeout = std::env::var("FEMTOCHAT_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_TIMEOUT_S);
    let busy: Arc<Mutex<Option<(Instant, &'static str)>>> = Arc::new(Mutex::new(None));
    let watched = busy.clone();
    std::thread::Builder::new()
        .name("mpi-watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let state = *watched.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((since, op)) = state
                    && since.elapsed() > Duration::from_secs(timeout)
                {
                    eprintln!(
                        "error (rank {rank} of {size}): a {op} waited more than {timeout}s for \
                         the other ranks (one died or hangs); stopping \
                         (FEMTOCHAT_DIST_TIMEOUT sets the limit)"
                    );
                    // Not MPI_Abort: MPI is funneled through the main thread. Exiting without
                    // finalising makes the launcher end the other ranks.
                    std::process::exit(3);
                }
            }
        })
        .context("starting the MPI watchdog")?;
    Ok((universe, MpiComm { world, rank, size, sent: AtomicU64::new(0), busy }))
}

impl MpiComm {
    /// Run one collective under the watchdog, counting its ring bytes.
    fn timed<R>(&self, op: &'static str, bytes: u64, f: impl FnOnce() -> R) -> R {
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), op));
        let r = f();
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.sent.fetch_add(bytes, Ordering::Relaxed);
        r
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        let bytes = ring_bytes(Collective::AllReduce, buf.len(), self.size);
        self.timed("all-reduce", bytes, || {
            self.world.all_reduce_into(&send[..], buf, SystemOperation::sum())
        });
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.timed("all-reduce", 0, || {
            self.world.all_reduce_into(&send[..], buf, SystemOperation::sum())
        });
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_lengths("reduce-scatter", send.len(), recv.len(), self.size)?;
        let bytes = ring_bytes(Collective::ReduceScatter, send.len(), self.size);
        self.timed("reduce-scatter", bytes, || {
            self.world.reduce_scatter_block_into(send, recv, SystemOperation::sum())
        });
        Ok(())
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_lengths("all-gather", recv.len(), send.len(), self.size)?;
        let bytes = ring_bytes(Collective::AllGather, recv.len(), self.size);
        self.timed("all-gather", bytes, || self.world.all_gather_into(send, recv));
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let mut len = [buf.len() as u64];
        self.timed("broadcast", 0, || root.broadcast_into(&mut len[..]));
        buf.resize(len[0] as usize, 0);
        self.timed("broadcast", 0, || root.broadcast_into(&mut buf[..]));
        Ok(())
    }
    fn wait_for_all(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

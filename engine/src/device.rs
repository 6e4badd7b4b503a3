//! Where a tensor's storage lives and its ops run. A runtime enum, not a type parameter: model code
//! is written once and the device is picked on the command line.
//!
//! GPU work is recorded into one open command batch per process and submitted when something
//! needs the results on the host (a download), when the batch grows long, or on `sync()`; so a
//! whole forward/backward is a handful of submissions with no CPU round trip inside.
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use femtochat_kernels::gpu::{Batch, GpuContext, GpuError};

use crate::error::{EngineError, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// rayon + SIMD kernels on the host.
    #[default]
    Cpu,
    /// WGSL kernels through wgpu (Vulkan, Metal, DX12), one process-wide GPU context.
    Gpu,
}

impl Device {
    /// Check that this device can run: for the GPU, that an adapter exists.
    pub fn ensure_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Gpu => context().map(|_| ()),
        }
    }

    /// The adapter's name and backend, for logs (the host for the CPU).
    pub fn describe(self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Gpu => match GpuContext::get() {
                Ok(c) => format!("gpu: {} ({:?})", c.info.name, c.info.backend),
                Err(e) => format!("gpu: unavailable ({e})"),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
        })
    }
}

impl FromStr for Device {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Device> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "gpu" => Ok(Device::Gpu),
            _ => Err(EngineError::Invalid {
                op: "device",
                msg: format!("unknown device `{s}` (expected cpu or gpu)"),
            }),
        }
    }
}

impl From<GpuError> for EngineError {
    fn from(e: GpuError) -> Self {
        EngineError::Gpu(e.to_string())
    }
}

/// GPU compute dispatches recorded so far in this process (0 without a GPU context).
pub fn gpu_dispatch_count() -> u64 {
    GpuContext::get().map_or(0, |c| c.dispatch_count())
}

pub(crate) fn context() -> Result<&'static GpuContext> {
    Ok(GpuContext::get()?)
}

/// Dispatches recorded before the open batch is submitted, so the GPU starts on long graphs
/// while the host is still recording them.
const MAX_PENDING: usize = 128;

struct Pending {
    batch: Option<Batch>,
    dispatches: usize,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending { batch: None, dispatches: 0 });

fn pending() -> MutexGuard<'static, Pending> {
    // A panic mid-record leaves at worst a half-recorded batch, which is still valid to submit.
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Record GPU work into the process's open batch (opening one if needed). Buffers released
/// while recording go back to the pool and may back later recordings of the same batch; that is
/// safe because the batch runs its commands in order, and every host-side write goes through it.
pub(crate) fn record<R>(
    f: impl FnOnce(&mut Batch) -> std::result::Result<R, GpuError>,
) -> Result<R> {
    let ctx = context()?;
    let mut p = pending();
    let bt = p.batch.get_or_insert_with(|| ctx.batch());
    let r = f(bt)?;
    p.dispatches += 1;
    if p.dispatches >= MAX_PENDING {
        flush_locked(&mut p);
    }
    Ok(r)
}

fn flush_locked(p: &mut Pending) {
    if let Some(bt) = p.batch.take() {
        bt.submit();
    }
    p.dispatches = 0;
}

/// Submit all recorded GPU work (does not wait for it). Downloads call this themselves.
pub fn sync() {
    flush_locked(&mut pending());
}

//! The process-wide GPU context (adapter, device, queue), device buffers and command batches.
use std::sync::{Arc, Mutex, OnceLock};

use wgpu::util::DeviceExt;

use super::pipelines::Pipelines;
use super::pool::BufferPool;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter found: install a Vulkan driver (without a GPU on Debian/Ubuntu: \
         `apt-get install mesa-vulkan-drivers libvulkan1`), or set FEMTOCHAT_SKIP_GPU=1 to skip \
         the GPU tests"
    )]
    NoAdapter,
    #[error("GPU device request failed: {0}")]
    Device(String),
    #[error("buffer of {bytes} bytes exceeds the device limit of {limit} bytes")]
    BufferTooLarge { bytes: u64, limit: u64 },
    #[error("dispatch of {groups} workgroups exceeds the device limit of {limit} per dimension")]
    DispatchTooLarge { groups: u64, limit: u32 },
    #[error("buffer length mismatch: {what} has {got} elements, expected {expected}")]
    Shape { what: &'static str, got: usize, expected: usize },
    #[error("not supported on the GPU: {0}")]
    Unsupported(String),
    #[error("GPU readback failed: {0}")]
    Readback(String),
    #[error("GPU adapter {index} does not exist; this machine has {count}: {list}")]
    AdapterIndex { index: usize, count: usize, list: String },
}

/// Which adapter the process-wide context opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterChoice {
    /// wgpu's high-performance adapter (the default).
    Preferred,
    /// The index-th adapter of `adapters()`; an error when there are fewer.
    Index(usize),
    /// Local rank r of a multi-process job on one machine: adapter r modulo their number, so
    /// each rank gets its own GPU while there are enough, and ranks share them when not
    /// (several ranks on lavapipe, for tests).
    LocalRank(usize),
}

static CHOICE: OnceLock<AdapterChoice> = OnceLock::new();

/// Choose the adapter before the first GPU use (`train --gpu-index`, or the local rank under
/// `mpirun`); `FEMTOCHAT_GPU_INDEX=N` in the environment does the same as `Index(N)`. Refused
/// once the context exists or another choice was made.
pub fn select_adapter(choice: AdapterChoice) -> Result<(), GpuError> {
    if CONTEXT.get().is_some() {
        return Err(GpuError::Device(
            "the GPU context already exists; choose its adapter first".into(),
        ));
    }
    match CHOICE.set(choice) {
        Ok(()) => Ok(()),
        Err(_) if CHOICE.get() == Some(&choice) => Ok(()),
        Err(_) => Err(GpuError::Device(format!(
            "GPU adapter already chosen ({:?}); cannot change it to {choice:?}",
            CHOICE.get()
        ))),
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter wgpu finds, in the order `AdapterChoice::Index` counts them: "name (backend,
/// device type)".
pub fn adapters() -> Vec<String> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(describe)
        .collect()
}

fn describe(a: &wgpu::Adapter) -> String {
    let i = a.get_info();
    format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
}

thread_local! {
    /// Downloads on this thread that are still to fail (`fail_next_downloads`).
    static FAIL_DOWNLOADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Fault injection for tests: the next `n` downloads on the calling thread fail with
/// `GpuError::Readback`, as on a lost device, so tests can show that a failed read becomes an
/// error (never NaNs in a checkpoint). Per thread, so parallel tests do not see it.
#[doc(hidden)]
pub fn fail_next_downloads(n: usize) {
    FAIL_DOWNLOADS.with(|c| c.set(n));
}

pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub(crate) limits: wgpu::Limits,
    pub(crate) pipelines: Pipelines,
    pub(crate) pool: BufferPool,
    dispatches: std::sync::atomic::AtomicU64,
}

static CONTEXT: OnceLock<Result<GpuContext, GpuError>> = OnceLock::new();

impl GpuContext {
    /// The process-wide context, created on first use; a failure is remembered, not retried.
    pub fn get() -> Result<&'static GpuContext, GpuError> {
        CONTEXT.get_or_init(|| pollster::block_on(Self::create())).as_ref().map_err(Clone::clone)
    }

    async fn create() -> Result<GpuContext, GpuError> {
        let instance = instance();
        let choice = match (CHOICE.get(), std::env::var("FEMTOCHAT_GPU_INDEX")) {
            (Some(&c), _) => c,
            (None, Ok(v)) => AdapterChoice::Index(v.trim().parse().map_err(|_| {
                GpuError::Device(format!("FEMTOCHAT_GPU_INDEX={v:?} is not an adapter index"))
            })?),
            (None, Err(_)) => AdapterChoice::Preferred,
        };
        let adapter = match choice {
            AdapterChoice::Preferred => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    ..Default::default()
                })
                .await
                .map_err(|_| GpuError::NoAdapter)?,
            AdapterChoice::Index(i) | AdapterChoice::LocalRank(i) => {
                let mut all = instance.enumerate_adapters(wgpu::Backends::all()).await;
                if all.is_empty() {
                    return Err(GpuError::NoAdapter);
                }
                let count = all.len();
                let index = if let AdapterChoice::LocalRank(r) = choice { r % count } else { i };
                if index >= count {
                    let list = all.iter().map(describe).collect::<Vec<_>>().join("; ");
                    return Err(GpuError::AdapterIndex { index, count, list });
                }
                all.swap_remove(index)
            }
        };
        // Ask for everything the adapter offers so large weight/activation buffers fit.
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("femtochat"),
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::Device(e.to_string()))?;
        Ok(GpuContext {
            info: adapter.get_info(),
            limits,
            pipelines: Pipelines::default(),
            pool: BufferPool::default(),
            dispatches: Default::default(),
            device,
            queue,
        })
    }

    /// Largest storage buffer binding this device accepts, in bytes.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.limits.max_buffer_size.min(self.limits.max_storage_buffer_binding_size)
    }

    /// Compute dispatches recorded since the context was created (launch overhead diagnostics:
    /// `train bench` reports them per step).
    pub fn dispatch_count(&self) -> u64 {
        self.dispatches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An error naming `what` unless `bytes` of workgroup memory fit this device (pipelines with
    /// larger tiles are refused here rather than failing pipeline validation).
    pub(crate) fn check_workgroup_bytes(&self, what: &str, bytes: usize) -> Result<(), GpuError> {
        let limit = self.limits.max_compute_workgroup_storage_size as usize;
        if bytes > limit {
            return Err(GpuError::Unsupported(format!(
                "{what} needs {bytes} B of workgroup memory; this device has {limit}"
            )));
        }
        Ok(())
    }

    /// Bytes of freed buffers the pool keeps for reuse.
    pub fn pooled_bytes(&self) -> u64 {
        self.pool.idle_bytes()
    }

    /// Cap the bytes the buffer pool keeps idle (default 4 GiB; 0 disables pooling).
    pub fn set_pool_limit(&self, bytes: u64) {
        self.pool.set_limit(bytes);
    }

    /// A buffer of `len` 4-byte elements from the pool; its contents are unspecified.
    pub fn alloc(&'static self, len: usize) -> Result<GpuBuffer, GpuError> {
        // Zero-length bindings are invalid in WebGPU: keep at least one element.
        let bytes = (len.max(1) * 4) as u64;
        let limit = self.max_buffer_bytes();
        if bytes > limit {
            return Err(GpuError::BufferTooLarge { bytes, limit });
        }
        let buf = self.pool.take(&self.device, bytes, limit);
        let state = Mutex::new(SlotState { pending: 0, dropped: false });
        Ok(GpuBuffer { slot: Arc::new(Slot { buf, state }), len, ctx: self })
    }

    /// Upload `data` (f32 or u32, any Pod of 4 bytes) into a new buffer.
    pub fn upload<T: bytemuck::Pod>(&'static self, data: &[T]) -> Result<GpuBuffer, GpuError> {
        debug_assert_eq!(std::mem::size_of::<T>(), 4);
        let b = self.alloc(data.len())?;
        if !data.is_empty() {
            self.queue.write_buffer(b.raw(), 0, bytemuck::cast_slice(data));
        }
        Ok(b)
    }

    /// A buffer of `len` zeros.
    pub fn zeros(&'static self, len: usize) -> Result<GpuBuffer, GpuError> {
        self.upload(&vec![0u32; len])
    }

    pub fn batch(&'static self) -> Batch {
        let encoder = self.device.create_command_encoder(&Default::default());
        Batch { ctx: self, encoder: Some(encoder), used: Vec::new() }
    }

    /// Block until all submitted work has finished.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| GpuError::Readback(e.to_string()))
    }

    /// Copy `buf` back to the host; waits for all submitted work.
    pub fn download<T: bytemuck::Pod>(&self, buf: &GpuBuffer) -> Result<Vec<T>, GpuError> {
        let inject = FAIL_DOWNLOADS.with(|c| {
            let n = c.get();
            c.set(n.saturating_sub(1));
            n > 0
        });
        if inject {
            return Err(GpuError::Readback("injected failure (fail_next_downloads)".into()));
        }
        let bytes = (buf.len * 4) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf.raw(), 0, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        rx.recv()
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let view = slice.get_mapped_range().map_err(|e| GpuError::Readback(e.to_string()))?;
        let out = bytemuck::cast_slice(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }
}

/// A device storage buffer of `len` 4-byte elements (f32 or u32). Returned to the pool on drop,
/// but only once no unsubmitted `Batch` still uses it: a buffer dropped while a recorded (not yet
/// submitted) batch reads or writes it would otherwise be handed to another user, whose writes
/// (a queue write, or another thread's batch submitted first) would land before that batch runs.
pub struct GpuBuffer {
    slot: Arc<Slot>,
    len: usize,
    ctx: &'static GpuContext,
}

/// A pooled buffer shared by its `GpuBuffer` and the batches that recorded commands on it.
struct Slot {
    buf: wgpu::Buffer,
    state: Mutex<SlotState>,
}

struct SlotState {
    /// Recorded uses in batches not yet submitted (or dropped).
    pending: usize,
    /// The `GpuBuffer` is gone: return to the pool when `pending` reaches 0.
    dropped: bool,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // Two plain counters: a panic elsewhere cannot leave them half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl GpuBuffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn raw(&self) -> &wgpu::Buffer {
        &self.slot.buf
    }

    pub fn to_vec<T: bytemuck::Pod>(&self) -> Result<Vec<T>, GpuError> {
        self.ctx.download(self)
    }

    pub(crate) fn check(&self, what: &'static str, expected: usize) -> Result<(), GpuError> {
        if self.len != expected {
            return Err(GpuError::Shape { what, got: self.len, expected });
        }
        Ok(())
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        let mut st = self.slot.state();
        st.dropped = true;
        if st.pending == 0 {
            self.ctx.pool.give(self.slot.buf.clone());
        }
    }
}

/// A sequence of kernel launches recorded into one command encoder and sent in one submit.
/// Buffers it uses stay out of the pool until it is submitted (or dropped).
pub struct Batch {
    ctx: &'static GpuContext,
    encoder: Option<wgpu::CommandEncoder>,
    used: Vec<Arc<Slot>>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Submitted, or abandoned unsubmitted (its commands never run): either way the buffers
        // it used are free for others now.
        for slot in self.used.drain(..) {
            let mut st = slot.state();
            st.pending -= 1;
            if st.pending == 0 && st.dropped {
                self.ctx.pool.give(slot.buf.clone());
            }
        }
    }
}

impl Batch {
    /// Note a recorded use of `b` (see `GpuBuffer`).
    fn uses(&mut self, b: &GpuBuffer) {
        b.slot.state().pending += 1;
        self.used.push(b.slot.clone());
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.encoder.as_mut().expect("the encoder lives until submit consumes the batch")
    }

    pub fn context(&self) -> &'static GpuContext {
        self.ctx
    }

    /// Upload `data` into a new buffer, ordered with the batch's dispatches: a pooled buffer may
    /// have been released by an earlier (unsubmitted) dispatch of this batch, and a queue write
    /// would land before that dispatch runs. So the bytes go through a staging copy instead.
    pub fn upload<T: bytemuck::Pod>(&mut self, data: &[T]) -> Result<GpuBuffer, GpuError> {
        debug_assert_eq!(std::mem::size_of::<T>(), 4);
        let b = self.ctx.alloc(data.len())?;
        if !data.is_empty() {
            let staging = self.ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("upload"),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::COPY_SRC,
            });
            self.uses(&b);
            self.encoder().copy_buffer_to_buffer(&staging, 0, b.raw(), 0, (data.len() * 4) as u64);
        }
        Ok(b)
    }

    /// A buffer of `len` zeros, cleared in order with the batch's dispatches.
    pub fn zeros(&mut self, len: usize) -> Result<GpuBuffer, GpuError> {
        let b = self.ctx.alloc(len)?;
        if len > 0 {
            self.uses(&b);
            self.encoder().clear_buffer(b.raw(), 0, Some((len * 4) as u64));
        }
        Ok(b)
    }

    /// Copy `src` into `dst` (same length), in order with the batch's dispatches.
    pub fn copy(&mut self, dst: &GpuBuffer, src: &GpuBuffer) -> Result<(), GpuError> {
        dst.check("copy dst", src.len)?;
        if src.len > 0 {
            self.uses(dst);
            self.uses(src);
            self.encoder().copy_buffer_to_buffer(src.raw(), 0, dst.raw(), 0, (src.len * 4) as u64);
        }
        Ok(())
    }

    /// Record one dispatch of `stem::entry` with `params` at binding 0 and `bufs` at 1.. in order.
    pub(crate) fn dispatch<P: bytemuck::Pod>(
        &mut self,
        stem: &'static str,
        entry: &'static str,
        params: &P,
        bufs: &[&GpuBuffer],
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        let bound: Vec<(u32, &GpuBuffer)> =
            bufs.iter().enumerate().map(|(i, b)| (i as u32 + 1, *b)).collect();
        self.dispatch_bound(stem, entry, params, &bound, groups)
    }

    /// Record one dispatch with `params` at binding 0 and each buffer at its given binding; an
    /// entry point's auto-derived layout holds only the bindings it uses, and exactly those
    /// must be bound.
    pub(crate) fn dispatch_bound<P: bytemuck::Pod>(
        &mut self,
        stem: &'static str,
        entry: &'static str,
        params: &P,
        bufs: &[(u32, &GpuBuffer)],
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        self.dispatch_tuned(stem, entry, &[], params, bufs, groups)
    }

    /// `dispatch_bound` on the pipeline specialised with `constants` (WGSL `override`s, by name).
    pub(crate) fn dispatch_tuned<P: bytemuck::Pod>(
        &mut self,
        stem: &'static str,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        params: &P,
        bufs: &[(u32, &GpuBuffer)],
        groups: [u32; 3],
    ) -> Result<(), GpuError> {
        let limit = self.ctx.limits.max_compute_workgroups_per_dimension;
        if let Some(&g) = groups.iter().find(|&&g| g > limit) {
            return Err(GpuError::DispatchTooLarge { groups: g as u64, limit });
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let dev = &self.ctx.device;
        let pipeline = self.ctx.pipelines.get(dev, stem, entry, constants);
        self.ctx.dispatches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A fresh uniform per dispatch: queue writes would land before the whole batch runs.
        let ubuf = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(entry),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries =
            vec![wgpu::BindGroupEntry { binding: 0, resource: ubuf.as_entire_binding() }];
        for &(binding, b) in bufs {
            entries.push(wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.raw(),
                    offset: 0,
                    size: wgpu::BufferSize::new((b.len.max(1) * 4) as u64),
                }),
            });
        }
        let bind = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        for &(_, b) in bufs {
            self.uses(b);
        }
        let mut pass = self.encoder().begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        Ok(())
    }

    /// Send everything recorded in one submit; does not wait.
    pub fn submit(mut self) {
        if let Some(encoder) = self.encoder.take() {
            self.ctx.queue.submit([encoder.finish()]);
        }
        // Drop releases the buffers this batch used, now that its commands are queued ahead of
        // anything their next owner records or writes.
    }
}

/// Workgroup counts for `n` one-thread-per-element invocations of `wg` threads, folded into 2-D
/// when x would pass the 65535 per-dimension limit.
pub(crate) fn grid_1d(n: usize, wg: usize) -> [u32; 3] {
    let groups = n.div_ceil(wg);
    let x = groups.min(65535);
    let y = if x == 0 { 0 } else { groups.div_ceil(x) };
    [x as u32, y as u32, 1]
}

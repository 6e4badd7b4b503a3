//! Buffer pool: freed storage buffers are kept by power-of-two size class and handed out again,
//! so a training step allocates nothing after the first. The bytes held idle are capped: a buffer
//! returned past the cap is released to the driver instead (and the cap is adjustable).
use std::collections::HashMap;
use std::sync::Mutex;

/// Default cap on idle pooled bytes.
pub const DEFAULT_POOL_LIMIT: u64 = 4 << 30;

struct Free {
    by_class: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
    limit: u64,
}

pub(crate) struct BufferPool {
    free: Mutex<Free>,
}

impl Default for BufferPool {
    fn default() -> Self {
        let free = Free { by_class: HashMap::new(), bytes: 0, limit: DEFAULT_POOL_LIMIT };
        BufferPool { free: Mutex::new(free) }
    }
}

/// Size class of a request: the next power of two, at least 256 bytes.
fn class(bytes: u64) -> u64 {
    bytes.max(256).next_power_of_two()
}

impl BufferPool {
    pub(crate) fn take(&self, device: &wgpu::Device, bytes: u64, limit: u64) -> wgpu::Buffer {
        // Rounding up may pass the limit for huge buffers: then allocate exactly.
        let c = if class(bytes) > limit { bytes } else { class(bytes) };
        let reused = self.free.lock().ok().and_then(|mut f| {
            let b = f.by_class.get_mut(&c).and_then(Vec::pop)?;
            f.bytes -= b.size();
            Some(b)
        });
        reused.unwrap_or_else(|| {
            crate::mem::gpu_grew(c);
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("pool"),
                size: c,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    pub(crate) fn give(&self, buf: wgpu::Buffer) {
        if let Ok(mut f) = self.free.lock()
            && f.bytes + buf.size() <= f.limit
        {
            f.bytes += buf.size();
            f.by_class.entry(buf.size()).or_default().push(buf);
            return;
        }
        // `buf` drops here and wgpu frees it once no submitted work uses it.
        crate::mem::gpu_shrank(buf.size());
    }

    /// Bytes held idle for reuse.
    pub(crate) fn idle_bytes(&self) -> u64 {
        self.free.lock().map(|f| f.bytes).unwrap_or(0)
    }

    /// Cap the idle bytes (0 disables pooling); releases what is over the new cap.
    pub(crate) fn set_limit(&self, limit: u64) {
        if let Ok(mut f) = self.free.lock() {
            f.limit = limit;
            if f.bytes > limit {
                f.by_class.clear();
                crate::mem::gpu_shrank(f.bytes);
                f.bytes = 0;
            }
        }
    }
}

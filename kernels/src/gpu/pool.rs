//! Buffer pool: freed storage buffers are kept by power-of-two size class and handed out again.
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
}

/// Size class of a request: the next power of two, at least 256 bytes.
fn class(bytes: u64) -> u64 {
    bytes.max(256).next_power_of_two()
}

impl BufferPool {
    pub(crate) fn take(&self, device: &wgpu::Device, bytes: u64, limit: u64) -> wgpu::Buffer {
        // Rounding up may pass the limit for huge buffers: then allocate exactly.
        let c = if class(bytes) > limit { bytes } else { class(bytes) };
        let reused = self.free.lock().ok().and_then(|mut f| f.get_mut(&c).and_then(Vec::pop));
        reused.unwrap_or_else(|| {
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
        if let Ok(mut f) = self.free.lock() {
            f.entry(buf.size()).or_default().push(buf);
        }
    }
}

//! Shader sources and the pipeline cache: one compute pipeline per (stem, entry point, values of
//! its pipeline-overridable constants), built once.
use std::collections::HashMap;
use std::sync::Mutex;

/// Every WGSL source by stem (the same stem as its CPU twin in `cpu/`).
pub const SHADERS: &[(&str, &str)] = &[
    ("attention", include_str!("../wgsl/attention.wgsl")),
    ("elementwise", include_str!("../wgsl/elementwise.wgsl")),
    ("embedding", include_str!("../wgsl/embedding.wgsl")),
    ("flash_attention", include_str!("../wgsl/flash_attention.wgsl")),
    ("matmul", include_str!("../wgsl/matmul.wgsl")),
    ("optim", include_str!("../wgsl/optim.wgsl")),
    ("reduce", include_str!("../wgsl/reduce.wgsl")),
    ("rmsnorm", include_str!("../wgsl/rmsnorm.wgsl")),
    ("rope", include_str!("../wgsl/rope.wgsl")),
    ("slice", include_str!("../wgsl/slice.wgsl")),
    ("softmax", include_str!("../wgsl/softmax.wgsl")),
];

#[derive(Default)]
pub(crate) struct Pipelines {
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
}

/// Stem, entry point, and each overridden constant's name and value bits.
type PipelineKey = (&'static str, &'static str, Vec<(&'static str, u64)>);

impl Pipelines {
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        stem: &'static str,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> wgpu::ComputePipeline {
        let key = (stem, entry, constants.iter().map(|&(n, v)| (n, v.to_bits())).collect());
        let mut pipes = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pipes.get(&key) {
            return p.clone();
        }
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let module = mods.entry(stem).or_insert_with(|| {
            // Stems are compile-time constants of this crate, so a missing one is a bug here.
            let src = SHADERS.iter().find(|(s, _)| *s == stem).map(|(_, src)| *src);
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(stem),
                source: wgpu::ShaderSource::Wgsl(src.expect("known shader stem").into()),
            })
        });
        let p = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                ..Default::default()
            },
            cache: None,
        });
        pipes.insert(key, p.clone());
        p
    }
}

#[cfg(test)]
mod tests {
    /// Every WGSL source parses and validates with naga (no adapter needed).
    #[test]
    fn wgsl_validates() {
        for (stem, src) in super::SHADERS {
            let module = naga::front::wgsl::parse_str(src)
                .unwrap_or_else(|e| panic!("{stem}.wgsl: {}", e.emit_to_string(src)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::default(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{stem}.wgsl: {e:?}"));
        }
    }
}

//! Where a tensor's storage lives and its ops run. A runtime enum, not a type parameter: model code
//! is written once and the device is picked on the command line.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// rayon + SIMD kernels on the host.
    #[default]
    Cpu,
}

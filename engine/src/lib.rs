//! femtochat engine: tensors, a runtime `Device`, and graph-based autograd over the kernels crate.
pub mod device;

pub use device::Device;

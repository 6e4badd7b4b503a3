//! The engine's one error type. Every user-reachable failure (bad shape, bad dim, out-of-range
//! id, ...) is reported here with the op that raised it, never as a panic.
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Error)]
pub enum EngineError {
    #[error("{op}: {got} values do not fill shape {shape:?} ({expected} elements)")]
    DataLength { op: &'static str, shape: Vec<usize>, expected: usize, got: usize },
    #[error("{op}: incompatible shapes {lhs:?} and {rhs:?}")]
    ShapeMismatch { op: &'static str, lhs: Vec<usize>, rhs: Vec<usize> },
    #[error("{op}: expected rank {expected}, got shape {shape:?}")]
    BadRank { op: &'static str, expected: usize, shape: Vec<usize> },
    #[error("{op}: dim {dim} out of range for rank {rank}")]
    BadDim { op: &'static str, dim: isize, rank: usize },
    #[error("{op}: range {start}..{end} out of bounds for a dim of size {size}")]
    OutOfBounds { op: &'static str, start: usize, end: usize, size: usize },
    #[error("{op}: id {id} at position {pos} out of range 0..{bound}")]
    IdOutOfRange { op: &'static str, id: i64, pos: usize, bound: usize },
    #[error("{op}: expected a single-element tensor, got shape {shape:?}")]
    NotScalar { op: &'static str, shape: Vec<usize> },
    #[error("parameter `{name}` not found")]
    MissingParam { name: String },
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error("{op}: tensors on different devices ({lhs} and {rhs})")]
    DeviceMismatch { op: &'static str, lhs: crate::Device, rhs: crate::Device },
    #[error("GPU: {0}")]
    Gpu(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

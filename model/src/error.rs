//! The model crate's one error type.
use femtochat_engine::EngineError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("invalid config: {0}")]
    Config(String),
    #[error("parameter `{name}`: expected shape {expected:?}, got {got:?}")]
    ParamShape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("parameter `{name}` is missing")]
    MissingParam { name: String },
    #[error("unexpected parameter `{name}`")]
    UnexpectedParam { name: String },
    #[error("token id {id} out of range for vocab size {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("context full: position {pos} + {len} new tokens exceeds the cache's {capacity}")]
    ContextFull { pos: usize, len: usize, capacity: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: std::path::PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("fixture {}: {msg}", path.display())]
    Fixture { path: std::path::PathBuf, msg: String },
    #[error("checkpoint {} is truncated: {got} bytes, the header needs {expected}", path.display())]
    Truncated { path: std::path::PathBuf, expected: u64, got: usize },
    #[error("checkpoint {}: tensor `{name}` has dtype {dtype}; only F32, BF16 and F16 load", path.display())]
    Dtype { path: std::path::PathBuf, name: String, dtype: String },
    /// A pickle (inside a torch checkpoint, or a pickled tokenizer) that is malformed or uses
    /// more than the subset read; `entry` is the pickle's name inside the file.
    #[error("{}: {entry} at byte {offset}: {msg}", path.display())]
    Pickle { path: std::path::PathBuf, entry: String, offset: usize, msg: String },
}

pub type Result<T> = std::result::Result<T, ModelError>;

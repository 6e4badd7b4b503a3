//! femtochat: the nanochat LLM stack in Rust.
//!
//! This root package only owns the workspace-level `tests/` and `benches/`; the code lives in the
//! member crates, re-exported here for them.
pub use femtochat_engine as engine;
pub use femtochat_kernels as kernels;
pub use femtochat_model as model;

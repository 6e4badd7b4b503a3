//! `train eval`: scoring models as nanochat does.
pub mod execution;

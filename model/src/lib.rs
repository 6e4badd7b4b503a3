//! The nanochat GPT, tokenizer, checkpoints, KV-cache inference and sampling.
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod error;
pub mod generate;
pub mod gpt;
pub mod kv_cache;
pub mod memory;
pub mod nanochat;
pub mod optim;
pub mod parity;
pub mod recompute;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod tokenizer;
pub mod tool;
pub mod weights;

pub use config::GPTConfig;
pub use decode::Decoder;
pub use error::{ModelError, Result};
pub use gpt::Gpt;
pub use kv_cache::KvCache;
pub use recompute::Recompute;
pub use weights::WeightDtype;

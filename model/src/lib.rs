//! The nanochat GPT, tokenizer, checkpoints, KV-cache inference and sampling.

//! femtochat's server: an OpenAI-compatible HTTP API over a continuous-batching engine, a
//! response cache, and a web chat page. The `serve` binary wires these to the command line;
//! tests start the same server in-process.
pub mod api;
mod body;
pub mod cache;
pub mod error;
pub mod fixture;
pub mod http;
mod row;
pub mod scheduler;
pub mod server;
mod sse;

pub use error::{Result, ServeError};

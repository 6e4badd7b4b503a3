//! Shared by the serve integration tests: a tiny random model with the fixture tokenizer, an
//! in-process server on an ephemeral port, and a small blocking HTTP/SSE client.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use femtochat_model::Gpt;
use femtochat_model::tokenizer::{SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, parse_tiktoken};
use femtochat_serve::cache::CacheConfig;
use femtochat_serve::fixture::{tiny_config, tiny_model};
use femtochat_serve::http::AppState;
use femtochat_serve::scheduler::{Engine, EngineConfig, Loader};
use femtochat_serve::server::{HttpConfig, RunningServer, start};
use serde_json::Value;

/// Context of the test model: room for a few hundred tokens so long requests can be cut short.
pub const CONTEXT: usize = 512;
pub const MODEL: &str = "tiny";

pub fn tokenizer() -> Tokenizer {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tokenizer/ranks_2048.tiktoken");
    let text = std::fs::read_to_string(&path).expect("fixture tokenizer");
    Tokenizer::new(parse_tiktoken(&text).expect("ranks"), &SPECIAL_TOKENS, SPLIT_PATTERN)
        .expect("tokenizer")
}

pub fn model() -> Gpt {
    tiny_model(tiny_config(tokenizer().vocab_size(), CONTEXT), 7).expect("tiny model")
}

/// A child process that is killed (and reaped) when this goes out of scope, so a failing test
/// leaves no server running.
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct TestServer {
    pub base: String,
    server: Option<RunningServer>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

pub fn engine_config(max_batch: usize, max_queue: usize, step_delay_ms: u64) -> EngineConfig {
    EngineConfig {
        max_batch,
        max_queue,
        step_delay: Duration::from_millis(step_delay_ms),
        ..Default::default()
    }
}

pub fn no_cache() -> CacheConfig {
    CacheConfig { max_entries: 0, ..Default::default() }
}

/// The test servers' HTTP settings: an ephemeral loopback port, two workers.
pub fn http_config() -> HttpConfig {
    HttpConfig { host: "127.0.0.1".into(), port: 0, workers: 2, ..Default::default() }
}

/// A server over the tiny model, loaded by `loader` (default: at once).
pub fn serve_with(config: EngineConfig, cache: CacheConfig, loader: Option<Loader>) -> TestServer {
    serve_http(config, cache, loader, &http_config())
}

/// `serve_with` under the HTTP settings `http`.
pub fn serve_http(
    config: EngineConfig,
    cache: CacheConfig,
    loader: Option<Loader>,
    http: &HttpConfig,
) -> TestServer {
    let loader = loader.unwrap_or_else(|| Box::new(|| Ok((model(), tokenizer()))));
    let engine = Engine::spawn(config, loader).expect("engine");
    let state = Arc::new(AppState::new(engine, MODEL.into(), cache));
    let server = start(state, http).expect("server");
    TestServer { base: format!("http://{}", server.addr), server: Some(server) }
}

pub fn serve(config: EngineConfig, cache: CacheConfig) -> TestServer {
    let s = serve_with(config, cache, None);
    wait_healthy(&s.base);
    s
}

pub fn wait_healthy(base: &str) {
    for _ in 0..600 {
        if get(base, "/health").0 == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server at {base} never became healthy");
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// Status, body text, and the x-cache header.
pub struct Reply {
    pub status: u16,
    pub text: String,
    pub cache: Option<String>,
    pub content_type: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
}

pub fn post_raw(base: &str, path: &str, body: &str) -> Reply {
    let mut r = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(body)
        .expect("request");
    let header = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (cache, content_type) = (header("x-cache"), header("content-type").unwrap_or_default());
    Reply {
        status: r.status().as_u16(),
        text: r.body_mut().with_config().limit(64 << 20).read_to_string().expect("body"),
        cache,
        content_type,
    }
}

pub fn post(base: &str, path: &str, body: &Value) -> Reply {
    post_raw(base, path, &body.to_string())
}

pub fn get(base: &str, path: &str) -> (u16, String) {
    match agent().get(&format!("{base}{path}")).call() {
        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// An open SSE response, read event by event.
pub struct Stream {
    pub status: u16,
    pub content_type: String,
    lines: Box<dyn BufRead + Send>,
}

impl Stream {
    /// The next `data:` payload (`[DONE]` included), or None at the end of the body.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            if self.lines.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }

    /// Every remaining event up to `[DONE]` (which must come, and last).
    pub fn all(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let d = self.next_data().expect("stream ended before [DONE]");
            if d == "[DONE]" {
                assert_eq!(self.next_data(), None, "events after [DONE]");
                return out;
            }
            out.push(serde_json::from_str(&d).unwrap_or_else(|e| panic!("{e}: {d}")));
        }
    }
}

pub fn stream(base: &str, path: &str, body: &Value) -> Stream {
    let r = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("request");
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Stream { status, content_type, lines: Box::new(BufReader::new(r.into_body().into_reader())) }
}

pub fn health(base: &str) -> Value {
    serde_json::from_str(&get(base, "/health").1).expect("health json")
}

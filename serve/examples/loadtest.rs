//! Load test for the HTTP API: C concurrent streaming chat clients for S seconds, after a
//! single-client phase for the unloaded speed. Prints one JSON object: requests, failed count,
//! aggregate and single-client completion tok/s, p50/p99 time to first token.
//!
//! ```text
//! cargo run --release -p femtochat-serve --example loadtest -- --tiny --seconds 30
//! cargo run --release -p femtochat-serve --example loadtest -- --url http://127.0.0.1:8000
//! ```
//! `--tiny` starts an in-process server over a random 2-layer model (the test model), so the
//! numbers measure the server and batching more than the model.
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use femtochat_model::tokenizer::{SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, parse_tiktoken};
use femtochat_serve::cache::CacheConfig;
use femtochat_serve::fixture::{tiny_config, tiny_model};
use femtochat_serve::http::AppState;
use femtochat_serve::scheduler::{Engine, EngineConfig};
use femtochat_serve::server::{HttpConfig, start};
use serde_json::{Value, json};

struct Args {
    url: Option<String>,
    clients: usize,
    seconds: f64,
    single_seconds: f64,
    max_tokens: usize,
    max_batch: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        url: None,
        clients: 32,
        seconds: 30.0,
        single_seconds: 5.0,
        max_tokens: 64,
        max_batch: 8,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = Some(val()),
            "--tiny" => a.url = None,
            "--clients" => a.clients = val().parse().expect("--clients N"),
            "--seconds" => a.seconds = val().parse().expect("--seconds S"),
            "--single-seconds" => a.single_seconds = val().parse().expect("--single-seconds S"),
            "--max-tokens" => a.max_tokens = val().parse().expect("--max-tokens N"),
            "--max-batch" => a.max_batch = val().parse().expect("--max-batch N"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// One streamed request's outcome.
struct Sample {
    ok: bool,
    ttft: Option<Duration>,
    tokens: usize,
}

fn one_request(agent: &ureq::Agent, url: &str, max_tokens: usize, i: usize) -> Sample {
    let fail = Sample { ok: false, ttft: None, tokens: 0 };
    let body = json!({
        "messages": [{"role": "user", "content": format!("Tell me story number {i}.")}],
        "max_tokens": max_tokens, "temperature": 0.8, "stream": true,
        "stream_options": {"include_usage": true},
    });
    let t0 = Instant::now();
    let Ok(resp) = agent
        .post(&format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
    else {
        return fail;
    };
    if resp.status() != 200 {
        return fail;
    }
    let mut lines = BufReader::new(resp.into_body().into_reader());
    let (mut ttft, mut tokens, mut done) = (None, 0, false);
    let mut line = String::new();
    while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
        if let Some(d) = line.trim_end().strip_prefix("data: ") {
            if d == "[DONE]" {
                done = true;
                break;
            }
            let Ok(v) = serde_json::from_str::<Value>(d) else { return fail };
            if v.get("error").is_some() {
                return fail;
            }
            let content = &v["choices"][0]["delta"]["content"];
            if ttft.is_none() && content.as_str().is_some_and(|s| !s.is_empty()) {
                ttft = Some(t0.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
        line.clear();
    }
    Sample { ok: done, ttft, tokens }
}

/// `clients` threads sending requests back to back for `seconds`; returns samples and the
/// wall time.
fn phase(url: &str, clients: usize, seconds: f64, max_tokens: usize) -> (Vec<Sample>, f64) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.to_string();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(600)))
                    .build()
                    .into();
                let mut out = Vec::new();
                let mut i = c * 1_000_000;
                while Instant::now() < deadline {
                    out.push(one_request(&agent, &url, max_tokens, i));
                    i += 1;
                }
                out
            })
        })
        .collect();
    let samples: Vec<Sample> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    (samples, t0.elapsed().as_secs_f64())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let a = parse_args();
    let _server;
    let url = match &a.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/tokenizer/ranks_2048.tiktoken");
            let ranks = parse_tiktoken(&std::fs::read_to_string(path).unwrap()).unwrap();
            let tok = Tokenizer::new(ranks, &SPECIAL_TOKENS, SPLIT_PATTERN).unwrap();
            let gpt = tiny_model(tiny_config(tok.vocab_size(), 512), 7).unwrap();
            let config =
                EngineConfig { max_batch: a.max_batch, max_queue: 256, ..Default::default() };
            let engine = Engine::spawn(config, Box::new(move || Ok((gpt, tok)))).unwrap();
            engine.wait_ready().unwrap();
            let no_cache = CacheConfig { max_entries: 0, ..Default::default() };
            let state = Arc::new(AppState::new(engine, "tiny".into(), no_cache));
            let http = HttpConfig { port: 0, workers: 2, ..Default::default() };
            let server = start(state, &http).unwrap();
            let url = format!("http://{}", server.addr);
            _server = server;
            url
        }
    };
    let (single, single_secs) = phase(&url, 1, a.single_seconds, a.max_tokens);
    let single_tokens: usize = single.iter().map(|s| s.tokens).sum();
    let (samples, secs) = phase(&url, a.clients, a.seconds, a.max_tokens);
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> =
        samples.iter().filter_map(|s| s.ttft).map(|d| d.as_secs_f64() * 1e3).collect();
    ttft.sort_by(f64::total_cmp);
    let report = json!({
        "url": url,
        "clients": a.clients,
        "seconds": secs,
        "max_tokens": a.max_tokens,
        "requests": samples.len(),
        "failed": samples.iter().filter(|s| !s.ok).count() + single.iter().filter(|s| !s.ok).count(),
        "completion_tokens": tokens,
        "aggregate_tok_s": tokens as f64 / secs,
        "single_client_tok_s": single_tokens as f64 / single_secs,
        "ttft_ms_p50": percentile(&ttft, 0.5),
        "ttft_ms_p99": percentile(&ttft, 0.99),
    });
    println!("{report}");
}

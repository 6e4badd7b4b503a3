//! The server's promises under misbehaving clients and failures (docs/reliability.md), over
//! loopback with bounded counts and deadlines: slow and idle clients are cut off in bounded time,
//! oversized bodies are refused unread, the connection cap holds, a burst up to max_batch +
//! max_queue is accepted, a generation that fails is a 500 (not a 200 cut short), a dead engine
//! is reported to /health and to every request, and any max_tokens gets the right message.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use femtochat_serve::scheduler::{EngineConfig, Loader};
use femtochat_serve::server::HttpConfig;
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";
const TEXT: &str = "/v1/completions";

fn greedy_chat(content: &str, max_tokens: u64) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
           "temperature": 0, "max_tokens": max_tokens})
}

/// A request that keeps its row for seconds: sampled (greedy's path meets an end token early)
/// with a seed whose 400 tokens hold no end token, at the configured step delay.
fn long_stream() -> Value {
    let mut long = greedy_chat("a long one", 400);
    long["stream"] = json!(true);
    long["temperature"] = json!(1.0);
    long["seed"] = json!(1);
    long
}

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Everything the server sends until it closes the connection; Err if it is still open at
/// `deadline`.
fn read_until_closed(sock: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("still open; got {:?}", String::from_utf8_lossy(&got)));
        }
        sock.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match sock.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("still open; got {:?}", String::from_utf8_lossy(&got)));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// This process's soft limit on open files (Linux), to size the slow-client flood.
fn open_file_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(1024)
}

fn short_timeouts() -> HttpConfig {
    HttpConfig {
        request_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_secs(1),
        ..http_config()
    }
}

/// Slow clients of every kind — a head cut off, a body cut off (sized and chunked), an idle
/// keep-alive connection — up to 1,500 of them (fewer if the open-file limit is low: the server
/// runs in this process, so each costs two descriptors): the server keeps answering while they
/// hang, and closes every one of them within its timeout (408 for an unfinished request).
#[test]
fn slow_and_idle_clients_are_cut_off_and_cannot_pin_the_server() {
    let s = serve_http(engine_config(2, 8, 0), no_cache(), None, &short_timeouts());
    wait_healthy(&s.base);
    let n = ((open_file_limit().saturating_sub(300)) / 2).min(1500);
    assert!(n >= 200, "open-file limit {} leaves room for only {n} clients", open_file_limit());
    let a = addr(&s.base);
    let body = greedy_chat("never finished", 4).to_string();
    let kinds = [
        format!("POST {CHAT} HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\n"),
        format!(
            "POST {CHAT} HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{}",
            body.len(),
            &body[..body.len() / 2]
        ),
        format!(
            "POST {CHAT} HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n8\r\n{}\r\n",
            &body[..8]
        ),
        format!("GET /health HTTP/1.1\r\nHost: {a}\r\n\r\n"),
        format!(
            "GET /health HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n"
        ),
    ];
    let t0 = Instant::now();
    let mut socks: Vec<(usize, TcpStream)> = (0..n)
        .map(|i| {
            let mut sock = TcpStream::connect(&a).expect("connect");
            sock.write_all(kinds[i % kinds.len()].as_bytes()).expect("write");
            (i % kinds.len(), sock)
        })
        .collect();
    let opened = t0.elapsed();
    // While every one of them hangs, real requests are served.
    let t = Instant::now();
    let r = post(&s.base, CHAT, &greedy_chat("still here?", 4));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(health(&s.base)["status"], "ok");
    let served = t.elapsed();
    assert!(served < Duration::from_secs(5), "a real request took {served:?} among {n} slow ones");
    // Every slow connection is closed by the server in about its timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    for (kind, sock) in &mut socks {
        let got = read_until_closed(sock, deadline).unwrap_or_else(|e| panic!("kind {kind}: {e}"));
        let text = String::from_utf8_lossy(&got);
        let want = if *kind >= 3 { "HTTP/1.1 200" } else { "HTTP/1.1 408" };
        assert!(text.starts_with(want), "kind {kind}: {text:?}");
        if *kind == 1 || *kind == 2 {
            assert!(text.contains("request_timeout"), "kind {kind}: {text:?}");
        }
    }
    let all_closed = t0.elapsed();
    eprintln!(
        "{n} slow clients: opened in {opened:?}, a real request took {served:?}, \
         all closed after {all_closed:?}"
    );
    assert!(all_closed < Duration::from_secs(20));
    let h = health(&s.base);
    assert_eq!((h["active_rows"].as_u64(), h["queued"].as_u64()), (Some(0), Some(0)));
}

/// Past --max-connections, a client waits in the listen backlog until a slot frees (here when
/// two silent clients time out), and is then served.
#[test]
fn connections_past_the_cap_wait_for_a_slot() {
    let http = HttpConfig { max_connections: 2, ..short_timeouts() };
    let s = serve_http(engine_config(2, 8, 0), no_cache(), None, &http);
    wait_healthy(&s.base);
    // Let the health check's connection close (keep-alive 1 s), so the cap is all ours.
    std::thread::sleep(Duration::from_millis(1500));
    let silent: Vec<TcpStream> =
        (0..2).map(|_| TcpStream::connect(addr(&s.base)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let (code, _) = get(&s.base, "/health");
    let waited = t.elapsed();
    assert_eq!(code, 200);
    assert!(
        waited > Duration::from_millis(500) && waited < Duration::from_secs(10),
        "served after {waited:?}: the cap did not hold, or the slots never freed"
    );
    drop(silent);
}

/// A Content-Length over the limit gets its 413 at once, without the body being sent.
#[test]
fn an_oversized_content_length_is_refused_before_the_body() {
    let s = serve(engine_config(2, 8, 0), no_cache());
    let a = addr(&s.base);
    let mut sock = TcpStream::connect(&a).unwrap();
    write!(
        sock,
        "POST {TEXT} HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000000000\r\n\r\n"
    )
    .unwrap();
    let t = Instant::now();
    // Well before the 30 s body timeout, and with no byte of the body sent.
    let got = read_until_closed(&mut sock, t + Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("request_too_large"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// max_batch + max_queue requests arriving together are all accepted, however far behind the
/// engine thread is (here it sleeps 20 ms per step); the next one is a 429.
#[test]
fn a_burst_of_max_batch_plus_max_queue_is_accepted() {
    let (max_batch, max_queue) = (4, 3);
    let s = serve(engine_config(max_batch, max_queue, 20), no_cache());
    let mut streams: Vec<Stream> =
        (0..max_batch + max_queue).map(|_| stream(&s.base, CHAT, &long_stream())).collect();
    for (i, st) in streams.iter().enumerate() {
        assert_eq!(st.status, 200, "request {i} of the burst");
    }
    let r = post(&s.base, CHAT, &greedy_chat("one too many", 3));
    assert_eq!(r.status, 429, "{}", r.text);
    // The first max_batch decode; the rest wait.
    for st in &mut streams[..max_batch] {
        st.next_data().unwrap();
        st.next_data().unwrap();
    }
    let h = health(&s.base);
    assert_eq!((h["active_rows"].as_u64(), h["queued"].as_u64()), (Some(4), Some(3)), "{h}");
    drop(streams);
    let t = Instant::now();
    while health(&s.base)["active_rows"] != 0 || health(&s.base)["queued"] != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "rows not freed: {}", health(&s.base));
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The tiny model, broken so that generation fails at its second token: the lm head is zero
/// (every logit 0, so greedy takes token 0) and token 0's embedding is NaN (so the step after
/// it has NaN logits, which the sampler refuses).
fn nan_after_first_token() -> Loader {
    Box::new(|| {
        let gpt = model();
        let c = gpt.config().n_embd;
        for (name, t) in gpt.params().iter() {
            match name {
                "lm_head.weight" => t.with_data_mut(|d| d.fill(0.0))?,
                "transformer.wte.weight" => t.with_data_mut(|d| d[..c].fill(f32::NAN))?,
                _ => {}
            }
        }
        Ok((gpt, tokenizer()))
    })
}

/// A request that fails after its first token: non-streaming, a 500 in OpenAI's error format
/// (not a 200 whose body breaks off); streaming, the 200 already sent, an error event and
/// [DONE]. The server goes on serving.
#[test]
fn a_failure_during_generation_is_a_500_not_a_cut_off_200() {
    let s = serve_with(engine_config(2, 8, 0), no_cache(), Some(nan_after_first_token()));
    wait_healthy(&s.base);
    let r = post(&s.base, CHAT, &greedy_chat("hi", 20));
    assert_eq!(r.status, 500, "{}", r.text);
    let e = &r.json()["error"];
    assert_eq!(e["type"], "server_error");
    assert!(e["message"].as_str().unwrap().contains("NaN"), "{e}");
    let mut sreq = greedy_chat("hi", 20);
    sreq["stream"] = json!(true);
    let st = stream(&s.base, CHAT, &sreq);
    assert_eq!(st.status, 200);
    let events = st.all();
    let last = events.last().unwrap();
    assert!(last["error"]["message"].as_str().unwrap().contains("NaN"), "{last}");
    // One token is fine: the server still serves.
    let r = post(&s.base, CHAT, &greedy_chat("hi", 1));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(health(&s.base)["status"], "ok");
}

/// The engine thread dies (a panic injected at a decode step): requests in flight get 503
/// naming why (non-streaming) or an error event naming why (streaming); /health turns 503 with
/// the reason; later requests get 503 naming it too.
#[test]
fn a_dead_engine_is_reported_to_health_and_every_request() {
    let config = EngineConfig { panic_at_step: Some(5), ..engine_config(2, 8, 10) };
    let s = serve(config, no_cache());
    let mut st = stream(&s.base, CHAT, &long_stream());
    assert_eq!(st.status, 200);
    let r = post(
        &s.base,
        CHAT,
        &long_stream()
            .as_object()
            .map(|o| {
                let mut o = o.clone();
                o.insert("stream".into(), json!(false));
                Value::Object(o)
            })
            .unwrap(),
    );
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.text.contains("panicked") && r.text.contains("fault injected"), "{}", r.text);
    let mut last = String::new();
    while let Some(d) = st.next_data() {
        if d != "[DONE]" {
            last = d;
        }
    }
    assert!(last.contains("panicked"), "{last}");
    let (code, body) = get(&s.base, "/health");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("fault injected"), "{body}");
    let r = post(&s.base, CHAT, &greedy_chat("anyone?", 3));
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.text.contains("fault injected"), "{}", r.text);
}

/// max_tokens of any size, up to u64::MAX, is told the exact total it asked for.
#[test]
fn any_max_tokens_gets_the_right_message() {
    let s = serve(engine_config(2, 8, 0), no_cache());
    let prompt = post(&s.base, CHAT, &greedy_chat("hi", 1)).json()["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap();
    for m in [CONTEXT as u64, 1 << 40, u64::MAX - prompt, u64::MAX - 1, u64::MAX] {
        let r = post(&s.base, CHAT, &greedy_chat("hi", m));
        assert_eq!(r.status, 400, "{}", r.text);
        let e = &r.json()["error"];
        assert_eq!(e["code"], "context_length_exceeded");
        let want = format!("requested {} tokens", prompt as u128 + m as u128);
        assert!(e["message"].as_str().unwrap().contains(&want), "max_tokens {m}: {e}");
    }
}

/// A request with n choices runs its prompt once: one prefill of the prompt's tokens.
#[test]
fn n_choices_share_one_prefill() {
    let s = serve(engine_config(4, 8, 0), no_cache());
    let before = health(&s.base);
    let mut body = greedy_chat("one prompt, four choices", 6);
    body["n"] = json!(4);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(2);
    let v = post(&s.base, CHAT, &body).json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 4);
    let after = health(&s.base);
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(delta("prefills"), 1);
    assert_eq!(delta("prefill_tokens"), v["usage"]["prompt_tokens"].as_u64().unwrap());
}

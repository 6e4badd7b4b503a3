//! The HTTP API over loopback with a tiny random model: response shapes field by field, every
//! error status, stop strings, n > 1, seeds, greedy determinism, batched == unbatched, queueing,
//! cancellation and the response cache.
mod common;

use std::time::{Duration, Instant};

use common::*;
use femtochat_model::Gpt;
use femtochat_model::generate::generate;
use femtochat_model::sampler::{Sampler, SamplingParams};
use femtochat_serve::cache::CacheConfig;
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";
const TEXT: &str = "/v1/completions";

fn greedy_chat(content: &str, max_tokens: u64) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
           "temperature": 0, "max_tokens": max_tokens})
}

fn assert_usage(u: &Value) {
    let (p, c, t) =
        (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64(), u["total_tokens"].as_u64());
    assert_eq!(p.unwrap() + c.unwrap(), t.unwrap(), "{u}");
}

/// The reference: single-sequence greedy generation with the model crate, decoded the way the
/// server decodes (end tokens dropped).
fn reference_greedy(prompt: &[u32], max_tokens: usize) -> (String, &'static str) {
    reference_greedy_with(&model(), prompt, max_tokens)
}

fn reference_greedy_with(gpt: &Gpt, prompt: &[u32], max_tokens: usize) -> (String, &'static str) {
    let tok = tokenizer();
    let end = [tok.special("<|assistant_end|>").unwrap(), tok.bos()];
    let mut sampler =
        Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() }, 0).unwrap();
    let (ids, _) = generate(gpt, prompt, &mut sampler, max_tokens, &end, |_| true).unwrap();
    let stopped = ids.last().is_some_and(|t| end.contains(t));
    let body: Vec<u32> = ids.into_iter().filter(|t| !end.contains(t)).collect();
    (tok.decode(&body).unwrap(), if stopped { "stop" } else { "length" })
}

fn chat_prompt_ids(content: &str) -> Vec<u32> {
    use femtochat_model::tokenizer::{ChatMessage, Content, Conversation};
    let conv = Conversation {
        messages: vec![ChatMessage { role: "user".into(), content: Content::Text(content.into()) }],
    };
    tokenizer().render_prompt(&conv).unwrap()
}

#[test]
fn chat_completion_shape() {
    let s = serve(engine_config(4, 8, 0), no_cache());
    let r = post(&s.base, CHAT, &greedy_chat("Hello there", 12));
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.content_type.starts_with("application/json"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], MODEL);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    let c = &choices[0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    let (want, finish) = reference_greedy(&chat_prompt_ids("Hello there"), 12);
    assert_eq!(c["message"]["content"], want.as_str());
    assert_eq!(c["finish_reason"], finish);
    assert_usage(&v["usage"]);
    assert_eq!(v["usage"]["prompt_tokens"], chat_prompt_ids("Hello there").len());
    if finish == "length" {
        assert_eq!(v["usage"]["completion_tokens"], 12);
    }
    // `model` may be left out, and max_completion_tokens wins over max_tokens.
    let r = post(
        &s.base,
        CHAT,
        &json!({"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                "temperature": 0, "max_tokens": 50, "max_completion_tokens": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json()["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
}

#[test]
fn chat_streaming_shape() {
    let s = serve(engine_config(4, 8, 0), no_cache());
    let mut body = greedy_chat("Tell me a story", 16);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let st = stream(&s.base, CHAT, &body);
    assert_eq!(st.status, 200);
    assert!(st.content_type.starts_with("text/event-stream"), "{}", st.content_type);
    let events = st.all();
    let id = events[0]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("chatcmpl-"));
    let (first, last) = (&events[0], events.last().unwrap());
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let mut content = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        assert_eq!(e["id"], id.as_str());
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["model"], MODEL);
        assert!(e["created"].is_u64());
        assert!(e["usage"].is_null(), "usage before the last chunk: {e}");
        let c = &e["choices"][0];
        assert_eq!(c["index"], 0);
        if let Some(t) = c["delta"]["content"].as_str() {
            assert!(finish.is_none(), "content after finish");
            content.push_str(t);
        }
        if !c["finish_reason"].is_null() {
            finish = Some(c["finish_reason"].as_str().unwrap().to_string());
            assert_eq!(c["delta"], json!({}));
        }
    }
    // The usage chunk: no choices.
    assert_eq!(last["choices"], json!([]));
    assert_usage(&last["usage"]);
    let (want, want_finish) = reference_greedy(&chat_prompt_ids("Tell me a story"), 16);
    assert_eq!(content, want);
    assert_eq!(finish.as_deref(), Some(want_finish));

    // Without include_usage there is no usage field at all.
    body["stream_options"] = json!(null);
    let events = stream(&s.base, CHAT, &body).all();
    assert!(
        events
            .iter()
            .all(|e| e.get("usage").is_none() && e["choices"].as_array().unwrap().len() == 1)
    );
}

#[test]
fn text_completion_shapes() {
    let s = serve(engine_config(4, 8, 0), no_cache());
    let body = json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 10});
    let r = post(&s.base, TEXT, &body);
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], MODEL);
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    let tok = tokenizer();
    let mut prompt = vec![tok.bos()];
    prompt.extend(tok.encode("Once upon a time"));
    let (want, finish) = reference_greedy(&prompt, 10);
    assert_eq!(c["text"], want.as_str());
    assert_eq!(c["finish_reason"], finish);
    assert_usage(&v["usage"]);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = stream(&s.base, TEXT, &sb).all();
    let mut text = String::new();
    for e in &events {
        assert_eq!(e["object"], "text_completion");
        text.push_str(e["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(text, want);
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], finish);
    // A one-element list is a prompt too.
    let r = post(
        &s.base,
        TEXT,
        &json!({"prompt": ["Once upon a time"], "temperature": 0, "max_tokens": 10}),
    );
    assert_eq!(r.json()["choices"][0]["text"], want.as_str());
}

#[test]
fn models_health_page_and_unknown_routes() {
    let s = serve(engine_config(4, 8, 0), no_cache());
    let (code, body) = get(&s.base, "/v1/models");
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(get(&s.base, "/v1/models/tiny").0, 200);
    let (code, body) = get(&s.base, "/v1/models/gpt-4");
    assert_eq!(code, 404);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "model_not_found");
    let h = health(&s.base);
    assert_eq!((h["status"].as_str(), h["context"].as_u64()), (Some("ok"), Some(CONTEXT as u64)));
    let (code, page) = get(&s.base, "/");
    assert_eq!(code, 200);
    assert!(page.contains("<html") && page.contains("/v1/chat/completions"));
    let (code, body) = get(&s.base, "/v2/nothing");
    assert_eq!(code, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["type"],
        "invalid_request_error"
    );
}

/// Status, error type, param and code of a failed request.
fn error_of(r: &Reply) -> (u16, String, Value, Value) {
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    (
        r.status,
        e["type"].as_str().unwrap_or_default().to_string(),
        e["param"].clone(),
        e["code"].clone(),
    )
}

#[test]
fn every_bad_request_is_an_openai_error() {
    let s = serve(engine_config(2, 8, 0), no_cache());
    let chat = |extra: Value| {
        let mut b = greedy_chat("hi", 4);
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(&s.base, CHAT, &b)
    };
    let invalid = |r: Reply, param: Value| {
        let (status, kind, p, _) = error_of(&r);
        assert_eq!((status, kind.as_str()), (400, "invalid_request_error"), "{}", r.text);
        if !param.is_null() {
            assert_eq!(p, param, "{}", r.text);
        }
    };
    invalid(post_raw(&s.base, CHAT, "{not json"), Value::Null);
    invalid(post_raw(&s.base, CHAT, "{}"), Value::Null);
    invalid(post_raw(&s.base, CHAT, r#"{"messages": "hi"}"#), Value::Null);
    invalid(chat(json!({"temperature": "hot"})), Value::Null);
    invalid(chat(json!({"temperature": 2.5})), json!("temperature"));
    invalid(chat(json!({"temperature": -1})), json!("temperature"));
    invalid(chat(json!({"top_p": 0})), json!("top_p"));
    invalid(chat(json!({"top_p": 1.5})), json!("top_p"));
    invalid(chat(json!({"n": 0})), json!("n"));
    invalid(chat(json!({"n": 3})), json!("n")); // above max batch 2
    invalid(chat(json!({"max_tokens": 0})), json!("max_tokens"));
    invalid(chat(json!({"max_tokens": -5})), Value::Null);
    invalid(chat(json!({"presence_penalty": 2.5})), json!("presence_penalty"));
    invalid(chat(json!({"frequency_penalty": -3})), json!("frequency_penalty"));
    invalid(chat(json!({"stop": ["a", "b", "c", "d", "e"]})), json!("stop"));
    invalid(chat(json!({"stop": ""})), json!("stop"));
    invalid(chat(json!({"messages": []})), json!("messages"));
    invalid(
        chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
        json!("messages[0].role"),
    );
    invalid(
        chat(json!({"messages": [{"role": "user", "content": null}]})),
        json!("messages[0].content"),
    );
    invalid(chat(json!({"messages": [{"role": "assistant", "content": "hi"}]})), json!("messages"));
    invalid(
        chat(
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        ),
        json!("messages"),
    );
    invalid(
        chat(
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}),
        ),
        json!("messages[1].role"),
    );
    invalid(post(&s.base, TEXT, &json!({"prompt": ["a", "b"]})), json!("prompt"));
    invalid(post(&s.base, TEXT, &json!({"max_tokens": 3})), Value::Null);

    // Unknown model: 404.
    let (status, _, param, code) = error_of(&chat(json!({"model": "gpt-4o"})));
    assert_eq!((status, param, code), (404, json!("model"), json!("model_not_found")));

    // Context too long: the prompt alone, and prompt + max_tokens.
    let long = "word ".repeat(CONTEXT * 2);
    let (status, _, _, code) =
        error_of(&chat(json!({"messages": [{"role": "user", "content": long}]})));
    assert_eq!((status, code), (400, json!("context_length_exceeded")));
    let (status, _, _, code) = error_of(&chat(json!({"max_tokens": CONTEXT})));
    assert_eq!((status, code), (400, json!("context_length_exceeded")));
    let (status, _, _, code) = error_of(&post(&s.base, TEXT, &json!({"prompt": long})));
    assert_eq!((status, code), (400, json!("context_length_exceeded")));

    // A body over the limit: 413, still in OpenAI's format.
    let huge =
        format!(r#"{{"prompt": "{}"}}"#, "x".repeat(femtochat_serve::server::MAX_BODY_BYTES));
    let (status, _, _, code) = error_of(&post_raw(&s.base, TEXT, &huge));
    assert_eq!((status, code), (413, json!("request_too_large")));

    // The server is still fine.
    assert_eq!(chat(json!({})).status, 200);
}

#[test]
fn not_ready_is_503_until_loaded() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let s = serve_with(
        engine_config(2, 4, 0),
        no_cache(),
        Some(Box::new(move || {
            let _ = rx.recv();
            Ok((model(), tokenizer()))
        })),
    );
    let (code, body) = get(&s.base, "/health");
    assert_eq!(code, 503, "{body}");
    let r = post(&s.base, CHAT, &greedy_chat("hi", 2));
    let (status, kind, _, code) = error_of(&r);
    assert_eq!((status, kind.as_str(), code), (503, "server_error", json!("not_ready")));
    tx.send(()).unwrap();
    wait_healthy(&s.base);
    assert_eq!(post(&s.base, CHAT, &greedy_chat("hi", 2)).status, 200);

    // A model that fails to load leaves the server answering 503 with the reason.
    let s = serve_with(
        engine_config(2, 4, 0),
        no_cache(),
        Some(Box::new(|| Err(femtochat_model::ModelError::Invalid("broken checkpoint".into())))),
    );
    std::thread::sleep(Duration::from_millis(100));
    let r = post(&s.base, CHAT, &greedy_chat("hi", 2));
    assert_eq!(r.status, 503);
    assert!(r.text.contains("broken checkpoint"), "{}", r.text);
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn full_queue_is_429_and_cancel_frees_the_row() {
    // One row, one queue slot; 20 ms per decode step keeps requests in flight.
    let s = serve(engine_config(1, 1, 20), no_cache());
    let mut long = greedy_chat("a long one", 400);
    long["stream"] = json!(true);
    long["temperature"] = json!(1.0); // avoid an early end token on greedy's path
    long["seed"] = json!(1);
    let mut a = stream(&s.base, CHAT, &long);
    assert_eq!(a.status, 200);
    a.next_data().unwrap(); // role chunk
    a.next_data().unwrap(); // first token: A holds the row
    wait_until("A active", || health(&s.base)["active_rows"] == 1);
    let base = s.base.clone();
    let b = std::thread::spawn(move || post(&base, CHAT, &greedy_chat("queued", 3)));
    wait_until("B queued", || health(&s.base)["queued"] == 1);
    let r = post(&s.base, CHAT, &greedy_chat("no room", 3));
    let (status, kind, _, code) = error_of(&r);
    assert_eq!((status, kind.as_str(), code), (429, "rate_limit_error", json!("queue_full")));
    // Hanging up on A cancels it: B gets the row long before A's 400 tokens would be done.
    let t = Instant::now();
    drop(a);
    let b = b.join().unwrap();
    assert_eq!(b.status, 200, "{}", b.text);
    assert!(t.elapsed() < Duration::from_secs(5), "B waited {:?}", t.elapsed());
}

#[test]
fn cancelled_streams_free_their_rows() {
    let s = serve(engine_config(2, 4, 10), no_cache());
    let mut long = greedy_chat("go on", 400);
    long["stream"] = json!(true);
    long["temperature"] = json!(1.0);
    long["seed"] = json!(3);
    for _ in 0..3 {
        let mut a = stream(&s.base, CHAT, &long);
        let mut b = stream(&s.base, CHAT, &long);
        for st in [&mut a, &mut b] {
            for _ in 0..3 {
                st.next_data().unwrap();
            }
        }
        drop((a, b));
        // 400 tokens at 10 ms would take 4 s; cancellation takes a step or two.
        let t = Instant::now();
        wait_until("rows freed", || health(&s.base)["active_rows"] == 0);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    // Still serving max_batch concurrent requests.
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let base = s.base.clone();
            std::thread::spawn(move || post(&base, CHAT, &greedy_chat(&format!("after {i}"), 5)))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().status, 200);
    }
}

#[test]
fn stop_strings_end_before_the_stop() {
    let s = serve(engine_config(2, 4, 0), no_cache());
    let body = json!({"prompt": "The river", "temperature": 0, "max_tokens": 40});
    let full =
        post(&s.base, TEXT, &body).json()["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() > 12, "too short a completion to test stops: {full:?}");
    // A stop string from the middle; the reply ends where it first occurs.
    let (a, b) = (chars[8].0, chars.get(11).map_or(full.len(), |c| c.0));
    let stop = &full[a..b];
    let cut = full.find(stop).unwrap();
    for stream_it in [false, true] {
        let mut req = body.clone();
        req["stop"] = json!(["never-appears", stop]);
        let (text, finish) = if stream_it {
            req["stream"] = json!(true);
            let ev = stream(&s.base, TEXT, &req).all();
            let t: String = ev.iter().map(|e| e["choices"][0]["text"].as_str().unwrap()).collect();
            (t, ev.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let v = post(&s.base, TEXT, &req).json();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, &full[..cut], "stream={stream_it}");
        assert_eq!(finish, "stop");
    }
    // Chat takes a single string too.
    let mut chat = greedy_chat("x", 30);
    let reply = post(&s.base, CHAT, &chat).json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    if let Some((i, _)) = reply.char_indices().nth(5) {
        let stop: String = reply[i..].chars().take(2).collect();
        chat["stop"] = json!(stop);
        let got = post(&s.base, CHAT, &chat).json();
        assert_eq!(got["choices"][0]["message"]["content"], &reply[..reply.find(&stop).unwrap()]);
    }
}

#[test]
fn n_choices_and_seeds() {
    let s = serve(engine_config(4, 8, 0), no_cache());
    let req = |n: u64, seed: i64| {
        json!({"messages": [{"role": "user", "content": "Pick a word"}], "n": n, "seed": seed,
               "temperature": 1.0, "max_tokens": 12})
    };
    let v = post(&s.base, CHAT, &req(3, 7)).json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut total = 0;
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        // Choice i samples with seed + i: the same as a single request with that seed.
        let one = post(&s.base, CHAT, &req(1, 7 + i as i64)).json();
        assert_eq!(c["message"], one["choices"][0]["message"]);
        total += one["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(v["usage"]["completion_tokens"], total);
    assert_usage(&v["usage"]);
    // Same seed, same text; streaming gives the same text as non-streaming.
    let again = post(&s.base, CHAT, &req(3, 7)).json();
    assert_eq!(v["choices"], again["choices"]);
    let mut sreq = req(3, 7);
    sreq["stream"] = json!(true);
    let mut texts = vec![String::new(); 3];
    for e in stream(&s.base, CHAT, &sreq).all() {
        let c = &e["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            texts[c["index"].as_u64().unwrap() as usize].push_str(t);
        }
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(v["choices"][i]["message"]["content"], t.as_str());
    }
    // Different seeds differ (12 tokens from a 2048-token vocab at temperature 1).
    let other = post(&s.base, CHAT, &req(1, 1000)).json();
    assert_ne!(other["choices"][0]["message"], v["choices"][0]["message"]);
}

#[test]
fn greedy_is_deterministic_and_batched_equals_unbatched() {
    let s = serve(engine_config(4, 8, 5), no_cache());
    let prompts = ["alpha", "a much longer prompt than the others", "c", "delta delta"];
    // Four at once share decode steps (5 ms each keeps them overlapping).
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (base, body) = (s.base.clone(), greedy_chat(p, 24));
            std::thread::spawn(move || post(&base, CHAT, &body).json())
        })
        .collect();
    let batched: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (p, v) in prompts.iter().zip(&batched) {
        let (want, finish) = reference_greedy(&chat_prompt_ids(p), 24);
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str(), "prompt {p:?}");
        assert_eq!(v["choices"][0]["finish_reason"], finish);
        // And again alone: the same.
        let alone = post(&s.base, CHAT, &greedy_chat(p, 24)).json();
        assert_eq!(alone["choices"], v["choices"]);
    }
    // n rows of one greedy request are all the unbatched answer.
    let mut body = greedy_chat(prompts[1], 24);
    body["n"] = json!(4);
    let v = post(&s.base, CHAT, &body).json();
    let (want, _) = reference_greedy(&chat_prompt_ids(prompts[1]), 24);
    for c in v["choices"].as_array().unwrap() {
        assert_eq!(c["message"]["content"], want.as_str());
    }
}

#[test]
fn response_cache_hits_and_clears() {
    let s = serve(engine_config(2, 4, 0), CacheConfig::default());
    let body = greedy_chat("cache me", 8);
    let first = post(&s.base, CHAT, &body);
    assert_eq!(first.cache.as_deref(), Some("miss"));
    let second = post(&s.base, CHAT, &body);
    assert_eq!(second.cache.as_deref(), Some("hit"));
    assert_eq!(first.text, second.text);
    let stats: Value = serde_json::from_str(&get(&s.base, "/admin/cache").1).unwrap();
    assert_eq!((stats["entries"].as_u64(), stats["hits"].as_u64()), (Some(1), Some(1)));
    assert!(stats["bytes"].as_u64().unwrap() >= first.text.len() as u64);
    // A seed makes sampling deterministic too; without one nothing is cached.
    let mut seeded = body.clone();
    seeded["temperature"] = json!(0.9);
    seeded["seed"] = json!(5);
    assert_eq!(post(&s.base, CHAT, &seeded).cache.as_deref(), Some("miss"));
    assert_eq!(post(&s.base, CHAT, &seeded).cache.as_deref(), Some("hit"));
    seeded["seed"] = json!(null);
    assert_eq!(post(&s.base, CHAT, &seeded).cache, None);
    let cleared = post_raw(&s.base, "/admin/cache/clear", "");
    assert_eq!(cleared.json()["cleared"], 2);
    let stats: Value = serde_json::from_str(&get(&s.base, "/admin/cache").1).unwrap();
    assert_eq!((stats["entries"].as_u64(), stats["bytes"].as_u64()), (Some(0), Some(0)));
    let third = post(&s.base, CHAT, &body);
    assert_eq!(third.cache.as_deref(), Some("miss"));
    // Same generation, new response id.
    assert_eq!(third.json()["choices"], first.json()["choices"]);
}

#[test]
fn a_non_streaming_client_that_hangs_up_is_cancelled() {
    use std::io::Write;
    let s = serve(engine_config(2, 4, 10), no_cache());
    let mut body = greedy_chat("hang up on me", 400);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(9);
    let body = body.to_string();
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "POST {CHAT} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_until("row active", || health(&s.base)["active_rows"] == 1);
    drop(sock);
    // 400 tokens at 10 ms each would take 4 s.
    let t = Instant::now();
    wait_until("row freed", || health(&s.base)["active_rows"] == 0);
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
}

/// The model on the GPU (lavapipe in CI): concurrent greedy requests, batched in shared decode
/// steps, give single-sequence generation's text on the same device. (Not the CPU's: the test
/// model's logits sit at the softcap, where greedy ties hinge on the last bit of tanh.)
#[test]
fn gpu_batched_greedy_equals_single_sequence() {
    use femtochat_engine::Device;
    if let Err(e) = Device::Gpu.ensure_available() {
        assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
        return;
    }
    let loader: femtochat_serve::scheduler::Loader =
        Box::new(|| Ok((model().to_device(Device::Gpu)?, tokenizer())));
    let s = serve_with(engine_config(4, 8, 0), no_cache(), Some(loader));
    wait_healthy(&s.base);
    let gpu_model = model().to_device(Device::Gpu).unwrap();
    let prompts = ["Hello there", "Tell me a story", "What is two plus two?", "hi"];
    let replies: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let base = s.base.clone();
                sc.spawn(move || post(&base, CHAT, &greedy_chat(p, 10)).json())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (p, v) in prompts.iter().zip(&replies) {
        let (want, finish) = reference_greedy_with(&gpu_model, &chat_prompt_ids(p), 10);
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str(), "{p}");
        assert_eq!(v["choices"][0]["finish_reason"], finish, "{p}");
    }
}

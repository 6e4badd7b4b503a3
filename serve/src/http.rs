//! The actix-web front: routes, request checks, SSE streaming, the response cache and the
//! OpenAI error format. Handlers never block: generation runs on the engine thread and comes
//! back as events on a channel; dropping that channel (client gone) cancels the request.
//! A non-streaming reply is gathered inside the handler, so a failure mid-generation is still a
//! status code (500, or 503 when the engine died) rather than a 200 cut short.
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use femtochat_model::ModelError;
use femtochat_model::tokenizer::{ChatMessage, Content, Conversation};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::api::*;
use crate::body::read_body;
use crate::cache::{CacheConfig, ResponseCache};
use crate::error::{Result, ServeError};
use crate::scheduler::{Engine, Event, Finish, GenParams, ModelInfo};
use crate::sse::Sse;

/// The web chat page.
const INDEX_HTML: &str = include_str!("web/index.html");

/// Everything the handlers share.
pub struct AppState {
    pub engine: Engine,
    pub model_name: String,
    cache: Mutex<ResponseCache>,
    created: u64,
}

impl AppState {
    pub fn new(engine: Engine, model_name: String, cache: CacheConfig) -> AppState {
        AppState {
            engine,
            model_name,
            cache: Mutex::new(ResponseCache::new(cache)),
            created: unix_now(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ResponseCache> {
        // The cache holds plain data; a panic elsewhere cannot leave it inconsistent.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A random-looking id with OpenAI's prefixes (`chatcmpl-`, `cmpl-`).
pub(crate) fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finaliser: spreads the bits so consecutive ids look unrelated.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("{prefix}-{:016x}", x ^ (x >> 31))
}

impl ResponseError for ServeError {
    fn status_code(&self) -> StatusCode {
        match self {
            ServeError::Invalid { .. } | ServeError::ContextLength { .. } => {
                StatusCode::BAD_REQUEST
            }
            ServeError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ServeError::UnknownModel(_) | ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            ServeError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Engine(_) | ServeError::Model(_) | ServeError::Io(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(error_body(self))
    }
}

/// OpenAI's error object for `e`.
pub fn error_body(e: &ServeError) -> ErrorBody {
    let (kind, param, code) = match e {
        ServeError::Invalid { param, .. } => ("invalid_request_error", param.clone(), None),
        ServeError::ContextLength { .. } => {
            ("invalid_request_error", Some("messages".to_string()), Some("context_length_exceeded"))
        }
        ServeError::TooLarge { .. } => ("invalid_request_error", None, Some("request_too_large")),
        ServeError::Timeout(_) => ("invalid_request_error", None, Some("request_timeout")),
        ServeError::UnknownModel(_) => {
            ("invalid_request_error", Some("model".to_string()), Some("model_not_found"))
        }
        ServeError::NotFound(_) => ("invalid_request_error", None, Some("not_found")),
        ServeError::QueueFull(_) => ("rate_limit_error", None, Some("queue_full")),
        ServeError::NotReady(_) => ("server_error", None, Some("not_ready")),
        _ => ("server_error", None, None),
    };
    ErrorBody {
        error: ErrorDetail {
            message: e.to_string(),
            kind: kind.to_string(),
            param,
            code: code.map(str::to_string),
        },
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/health", web::get().to(health))
        .route("/v1/models", web::get().to(models))
        .route("/v1/models/{id}", web::get().to(model))
        .route("/v1/chat/completions", web::post().to(chat_completions))
        .route("/v1/completions", web::post().to(completions))
        .route("/admin/cache", web::get().to(cache_stats))
        .route("/admin/cache/clear", web::post().to(cache_clear))
        .default_service(web::to(not_found));
}

async fn index() -> HttpResponse {
    HttpResponse::Ok().content_type(ContentType::html()).body(INDEX_HTML)
}

async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse> {
    Err(ServeError::NotFound(format!("{} {}", req.method(), req.path())))
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let e = &state.engine;
    match e.info() {
        Ok(info) => HttpResponse::Ok().json(serde_json::json!({
            "status": "ok",
            "model": state.model_name,
            "context": info.context,
            "active_rows": e.active_rows(),
            "queued": e.queued(),
            "max_batch": e.config().max_batch,
            "max_queue": e.config().max_queue,
            "prefills": e.prefills().0,
            "prefill_tokens": e.prefills().1,
        })),
        Err(err) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"status": "unavailable", "message": err.to_string()})),
    }
}

fn model_card(state: &AppState) -> ModelCard {
    ModelCard {
        id: state.model_name.clone(),
        object: "model".into(),
        created: state.created,
        owned_by: "femtochat".into(),
    }
}

async fn models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ModelList { object: "list".into(), data: vec![model_card(&state)] })
}

async fn model(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse> {
    if *id != state.model_name {
        return Err(ServeError::UnknownModel(id.into_inner()));
    }
    Ok(HttpResponse::Ok().json(model_card(&state)))
}

async fn cache_stats(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.cache().stats())
}

async fn cache_clear(state: web::Data<AppState>) -> HttpResponse {
    let mut cache = state.cache();
    let cleared = cache.stats().entries;
    cache.clear();
    HttpResponse::Ok().json(serde_json::json!({ "cleared": cleared }))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| ServeError::invalid(format!("invalid request body: {e}"), None))
}

/// Turn chat messages into the prompt (docs/reference.md §9): leading system (or developer) messages are
/// folded into the first user message; consecutive messages of one role are joined, since the
/// chat format needs strict user/assistant alternation and OpenAI's API does not.
pub fn chat_prompt(messages: &[Message], info: &ModelInfo) -> Result<Vec<u32>> {
    if messages.is_empty() {
        return Err(ServeError::invalid("messages must not be empty", Some("messages")));
    }
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<ChatMessage> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let text = m.text(i)?;
        let role = match m.role.as_str() {
            "system" | "developer" if turns.is_empty() => {
                system.push(text);
                continue;
            }
            "system" | "developer" => {
                return Err(ServeError::invalid(
                    "system messages are only supported before the first user message",
                    Some(&format!("messages[{i}].role")),
                ));
            }
            r @ ("user" | "assistant") => r,
            other => {
                return Err(ServeError::invalid(
                    format!("unsupported role {other:?} (use system, user or assistant)"),
                    Some(&format!("messages[{i}].role")),
                ));
            }
        };
        match turns.last_mut() {
            Some(ChatMessage { role: r, content: Content::Text(t) }) if r == role => {
                t.push_str("\n\n");
                t.push_str(&text);
            }
            _ => turns.push(ChatMessage { role: role.into(), content: Content::Text(text) }),
        }
    }
    if turns.first().is_none_or(|m| m.role != "user") {
        return Err(ServeError::invalid(
            "the first message after any system messages must be the user's",
            Some("messages"),
        ));
    }
    if turns.last().is_none_or(|m| m.role != "user") {
        return Err(ServeError::invalid("the last message must be the user's", Some("messages")));
    }
    if !system.is_empty() {
        let mut conv = vec![ChatMessage {
            role: "system".into(),
            content: Content::Text(system.join("\n\n")),
        }];
        conv.append(&mut turns);
        turns = conv;
    }
    info.tokenizer.render_prompt(&Conversation { messages: turns }).map_err(|e| match e {
        ModelError::Tokenizer(m) => ServeError::invalid(m, Some("messages")),
        other => other.into(),
    })
}

/// Check the sampling fields against the model and build what the engine runs.
pub fn gen_params(
    s: &SamplingFields,
    prompt: Vec<u32>,
    info: &ModelInfo,
    state: &AppState,
) -> Result<GenParams> {
    if let Some(m) = &s.model
        && *m != state.model_name
    {
        return Err(ServeError::UnknownModel(m.clone()));
    }
    let bad = |m: String, p: &str| Err(ServeError::invalid(m, Some(p)));
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return bad(format!("temperature must be in [0, 2], got {temperature}"), "temperature");
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return bad(format!("top_p must be in (0, 1], got {top_p}"), "top_p");
    }
    let presence_penalty = s.presence_penalty.unwrap_or(0.0);
    let frequency_penalty = s.frequency_penalty.unwrap_or(0.0);
    for (name, v) in
        [("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)]
    {
        if !(-2.0..=2.0).contains(&v) {
            return bad(format!("{name} must be in [-2, 2], got {v}"), name);
        }
    }
    let max_batch = state.engine.config().max_batch;
    let n = s.n.unwrap_or(1) as usize;
    if n == 0 || n > max_batch {
        return bad(format!("n must be between 1 and {max_batch}, got {n}"), "n");
    }
    let stop = s.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return bad("stop takes up to 4 non-empty strings".into(), "stop");
    }
    let (limit, field) = match (s.max_completion_tokens, s.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let prompt_len = prompt.len();
    let room = info.context.saturating_sub(prompt_len);
    if room == 0 {
        return Err(ServeError::ContextLength {
            message: format!(
                "This model's maximum context length is {} tokens; the prompt has {} tokens \
                 and leaves no room for a reply.",
                info.context,
                prompt.len()
            ),
        });
    }
    let max_tokens = match limit {
        None => room,
        Some(0) => return bad(format!("{field} must be at least 1"), field),
        Some(m) if m > room as u64 => {
            // u128: the sum of any prompt length and any u64 is exact.
            let requested = prompt_len as u128 + m as u128;
            return Err(ServeError::ContextLength {
                message: format!(
                    "This model's maximum context length is {} tokens. However, you requested \
                     {requested} tokens ({prompt_len} in the prompt, {m} for the completion).",
                    info.context,
                ),
            });
        }
        Some(m) => m as usize,
    };
    let sampling = femtochat_model::sampler::SamplingParams {
        temperature,
        top_k: s.top_k.filter(|&k| k > 0).map(|k| k as usize),
        top_p,
        presence_penalty,
        frequency_penalty,
    };
    Ok(GenParams {
        prompt,
        max_tokens,
        sampling,
        // Negative seeds are accepted (OpenAI's is a signed integer) and mapped bit for bit.
        seed: s.seed.map(|x| x as u64),
        n,
        stop,
    })
}

/// Which endpoint's shapes a response takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Text,
}

async fn chat_completions(state: web::Data<AppState>, http: HttpRequest) -> Result<HttpResponse> {
    let req: ChatRequest = parse(&read_body(&http).await?)?;
    let info = state.engine.info()?;
    if let Some(m) = &req.sampling.model
        && *m != state.model_name
    {
        return Err(ServeError::UnknownModel(m.clone()));
    }
    let prompt = chat_prompt(&req.messages, info)?;
    respond(state, Kind::Chat, &req.sampling, prompt).await
}

async fn completions(state: web::Data<AppState>, http: HttpRequest) -> Result<HttpResponse> {
    let req: CompletionRequest = parse(&read_body(&http).await?)?;
    let info = state.engine.info()?;
    let mut prompts = req.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ServeError::invalid(
            "exactly one prompt per request is supported",
            Some("prompt"),
        ));
    }
    let text = prompts.pop().unwrap_or_default();
    // Raw completion continues a document, and documents start with <|bos|> in training.
    let mut prompt = vec![info.tokenizer.bos()];
    prompt.extend(info.tokenizer.encode(&text));
    respond(state, Kind::Text, &req.sampling, prompt).await
}

async fn respond(
    state: web::Data<AppState>,
    kind: Kind,
    s: &SamplingFields,
    prompt: Vec<u32>,
) -> Result<HttpResponse> {
    let info = state.engine.info()?;
    let params = gen_params(s, prompt, info, &state)?;
    let model = state.model_name.clone();
    let prompt_tokens = params.prompt.len();
    let n = params.n;
    if s.stream.unwrap_or(false) {
        let include_usage =
            s.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        let (tx, rx) = unbounded_channel();
        state.engine.submit(params, tx)?;
        let sse = Sse::new(rx, state.clone(), kind, model, include_usage, prompt_tokens, n);
        return Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("cache-control", "no-cache"))
            .insert_header(("x-accel-buffering", "no"))
            .streaming(sse.into_stream()));
    }
    let key = params.deterministic().then(|| {
        let kind = if kind == Kind::Chat { "chat" } else { "text" };
        format!("{kind}\n{model}\n{params:?}")
    });
    if let Some(k) = &key
        && let Some(body) = state.cache().get(k)
    {
        return Ok(HttpResponse::Ok()
            .content_type(ContentType::json())
            .insert_header(("x-cache", "hit"))
            .body(body));
    }
    let (tx, rx) = unbounded_channel();
    state.engine.submit(params, tx)?;
    // The whole reply before the status line: a failure at any token is a 500 (or 503), never
    // a 200 cut short, which clients would retry as a connection error. A client that hangs up
    // meanwhile ends this handler (the server refuses half-closed connections), and dropping
    // `rx` cancels the generation.
    let (texts, finishes, tokens) = collect(rx, n, &state.engine).await?;
    let body = completion_body(kind, model, prompt_tokens, texts, finishes, tokens)?;
    let mut resp = HttpResponse::Ok();
    resp.content_type(ContentType::json());
    if let Some(k) = key {
        resp.insert_header(("x-cache", "miss"));
        state.cache().insert(k, body.clone());
    }
    Ok(resp.body(body))
}

/// The whole (non-streamed) response of either endpoint.
fn completion_body(
    kind: Kind,
    model: String,
    prompt_tokens: usize,
    texts: Vec<String>,
    finishes: Vec<Finish>,
    completion_tokens: usize,
) -> Result<Vec<u8>> {
    let usage =
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
    let choices = texts.into_iter().zip(finishes).enumerate();
    match kind {
        Kind::Chat => serde_json::to_vec(&ChatCompletion {
            id: new_id("chatcmpl"),
            object: "chat.completion".into(),
            created: unix_now(),
            model,
            choices: choices
                .map(|(index, (content, f))| ChatChoice {
                    index,
                    message: ResponseMessage { role: "assistant".into(), content },
                    logprobs: None,
                    finish_reason: f.as_str().into(),
                })
                .collect(),
            usage,
        }),
        Kind::Text => serde_json::to_vec(&TextCompletion {
            id: new_id("cmpl"),
            object: "text_completion".into(),
            created: unix_now(),
            model,
            choices: choices
                .map(|(index, (text, f))| TextChoice {
                    text,
                    index,
                    logprobs: None,
                    finish_reason: Some(f.as_str().into()),
                })
                .collect(),
            usage: Some(Some(usage)),
        }),
    }
    .map_err(|e| ServeError::Engine(e.to_string()))
}

/// Wait for all n choices: their texts, finish reasons, and the total tokens generated.
async fn collect(
    mut rx: UnboundedReceiver<Event>,
    n: usize,
    engine: &Engine,
) -> Result<(Vec<String>, Vec<Finish>, usize)> {
    let mut texts = vec![String::new(); n];
    let mut finishes = vec![None; n];
    let (mut done, mut tokens) = (0, 0);
    while done < n {
        match rx.recv().await {
            Some(Event::Text { index, text }) => texts[index].push_str(&text),
            Some(Event::Done { index, finish, tokens: t }) => {
                finishes[index] = Some(finish);
                tokens += t;
                done += 1;
            }
            Some(Event::Error(m)) => return Err(ServeError::Engine(m)),
            None => return Err(engine.lost_request()),
        }
    }
    Ok((texts, finishes.into_iter().map(|f| f.unwrap_or(Finish::Stop)).collect(), tokens))
}

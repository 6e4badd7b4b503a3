//! The batching engine: one thread owns the model and runs continuous batching.
//!
//! Requests arrive on a bounded channel (its bound is the waiting queue; a full queue is a 429).
//! Each request becomes `n` rows; a row is one sequence with its own KV-cache row, sampler, stop
//! strings and calculator state. A request is admitted when enough rows are free: its prompt is
//! prefilled alone ((n, T) forward into a fresh cache) and its rows then join the shared cache.
//! Every decode step is one forward of (R, 1) tokens over all R active rows, each at its own
//! position; a row leaves (and its cache row is freed) when it stops, reaches its length, or its
//! client goes away. Rows never wait for each other to finish.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use femtochat_engine::Ids;
use femtochat_model::sampler::{Sampler, SamplingParams};
use femtochat_model::tokenizer::{StreamDecoder, Tokenizer};
use femtochat_model::{Gpt, KvCache};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::{Result, ServeError};
use crate::tool::use_calculator;

/// What one request asks the engine for (already validated against the model).
/// Its `Debug` form is the response cache's key (floats print exactly, fields in order).
#[derive(Clone, Debug)]
pub struct GenParams {
    pub prompt: Vec<u32>,
    /// Most new tokens per choice (prompt + max_tokens fits the context).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Choice i samples with seed + i; None = a fresh random seed.
    pub seed: Option<u64>,
    /// Independent choices (rows).
    pub n: usize,
    /// Generation stops before the first occurrence of any of these in the text.
    pub stop: Vec<String>,
}

impl GenParams {
    /// Whether the same request always gets the same answer (so it may be cached).
    pub fn deterministic(&self) -> bool {
        self.sampling.temperature == 0.0 || self.seed.is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end token or a stop string.
    Stop,
    /// `max_tokens`.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine tells a request, in order per choice.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// More text of choice `index` (never part of a stop string).
    Text { index: usize, text: String },
    /// Choice `index` is complete after `tokens` generated tokens.
    Done { index: usize, finish: Finish, tokens: usize },
    /// The request failed; no more events follow.
    Error(String),
}

/// A request in the queue: what to generate and where the events go. Dropping the receiving
/// end cancels it.
pub struct Job {
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most rows decoded together.
    pub max_batch: usize,
    /// Most requests waiting for rows.
    pub max_queue: usize,
    /// Context per row (prompt + completion); None = the model's sequence_len.
    pub context: Option<usize>,
    /// Pause after every decode step. Zero in service; tests use it to keep requests in flight
    /// long enough to observe queueing and cancellation on a model that is otherwise instant.
    pub step_delay: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_batch: 8, max_queue: 64, context: None, step_delay: Duration::ZERO }
    }
}

/// What request handling needs to know about the loaded model.
pub struct ModelInfo {
    pub tokenizer: Arc<Tokenizer>,
    /// Most tokens (prompt + completion) a request may use.
    pub context: usize,
    pub vocab_size: usize,
}

enum Status {
    Loading,
    Ready,
    Failed(String),
}

struct Shared {
    info: OnceLock<ModelInfo>,
    status: Mutex<Status>,
    changed: Condvar,
    active_rows: AtomicUsize,
    queued: AtomicUsize,
}

/// Load the model and tokenizer (runs on the engine thread).
pub type Loader = Box<dyn FnOnce() -> femtochat_model::Result<(Gpt, Tokenizer)> + Send>;

/// Handle to the engine thread; cheap to share behind an `Arc`.
pub struct Engine {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
    config: EngineConfig,
}

impl Engine {
    /// Start the engine thread; it loads the model with `loader` and then serves. Until then
    /// requests get `NotReady`.
    pub fn spawn(config: EngineConfig, loader: Loader) -> Result<Engine> {
        if config.max_batch == 0 {
            return Err(ServeError::invalid("max batch must be at least 1", None));
        }
        let (tx, rx) = sync_channel(config.max_queue);
        let shared = Arc::new(Shared {
            info: OnceLock::new(),
            status: Mutex::new(Status::Loading),
            changed: Condvar::new(),
            active_rows: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
        });
        let (sh, cfg) = (shared.clone(), config.clone());
        std::thread::Builder::new().name("engine".into()).spawn(move || {
            let set = |s: Status| {
                *sh.status.lock().unwrap_or_else(|p| p.into_inner()) = s;
                sh.changed.notify_all();
            };
            let (gpt, tok) = match loader() {
                Ok(m) => m,
                Err(e) => return set(Status::Failed(format!("loading the model failed: {e}"))),
            };
            let context =
                cfg.context.unwrap_or(gpt.config().sequence_len).min(gpt.max_positions()).max(1);
            let tok = Arc::new(tok);
            let info =
                ModelInfo { tokenizer: tok.clone(), context, vocab_size: gpt.config().vocab_size };
            let _ = sh.info.set(info);
            set(Status::Ready);
            let mut worker = Worker::new(gpt, tok, context, cfg, sh.clone());
            worker.run(rx);
            set(Status::Failed("the engine stopped".into()));
        })?;
        Ok(Engine { tx, shared, config })
    }

    /// Block until the model is loaded (or failed to load).
    pub fn wait_ready(&self) -> Result<&ModelInfo> {
        let mut st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        while matches!(*st, Status::Loading) {
            st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        drop(st);
        self.info()
    }

    /// The model, once it is loaded and the engine is running.
    pub fn info(&self) -> Result<&ModelInfo> {
        match &*self.shared.status.lock().unwrap_or_else(|p| p.into_inner()) {
            Status::Loading => Err(ServeError::NotReady("the model is still loading".into())),
            Status::Failed(m) => Err(ServeError::NotReady(m.clone())),
            Status::Ready => self
                .shared
                .info
                .get()
                .ok_or_else(|| ServeError::NotReady("the model is still loading".into())),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Rows decoding now.
    pub fn active_rows(&self) -> usize {
        self.shared.active_rows.load(Ordering::Relaxed)
    }

    /// Requests waiting for rows.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Queue a request; events arrive on `events`. Full queue: `QueueFull`.
    pub fn submit(&self, params: GenParams, events: UnboundedSender<Event>) -> Result<()> {
        self.info()?;
        if params.n == 0 || params.n > self.config.max_batch {
            return Err(ServeError::invalid(
                format!("n must be between 1 and {} (the batch size)", self.config.max_batch),
                Some("n"),
            ));
        }
        // Counted before sending so the engine's decrement can never run first.
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Job { params, events }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => ServeError::QueueFull(self.config.max_queue),
                    TrySendError::Disconnected(_) => {
                        ServeError::NotReady("the engine stopped".into())
                    }
                })
            }
        }
    }
}

/// The special tokens the engine acts on.
struct Specials {
    /// A row ends on either (docs/reference.md §10).
    end: [u32; 2],
    python_start: u32,
    python_end: u32,
    output_start: u32,
    output_end: u32,
}

impl Specials {
    fn of(tok: &Tokenizer) -> Specials {
        // Tokenizer::load checks that every nanochat special exists.
        let s = |name: &str| tok.special(name).unwrap_or(0);
        Specials {
            end: [s("<|assistant_end|>"), tok.bos()],
            python_start: s("<|python_start|>"),
            python_end: s("<|python_end|>"),
            output_start: s("<|output_start|>"),
            output_end: s("<|output_end|>"),
        }
    }
}

/// One sequence being generated.
struct Row {
    index: usize,
    events: UnboundedSender<Event>,
    sampler: Sampler,
    max_tokens: usize,
    stop: Arc<Vec<String>>,
    /// Generated tokens (sampled and forced), for the penalties and the count.
    generated: Vec<u32>,
    /// The token to feed at the next decode step.
    next: u32,
    decoder: StreamDecoder,
    /// Decoded text so far; `sent` bytes of it have gone out as events.
    text: String,
    sent: usize,
    /// Calculator: inside `<|python_start|> ... `, with the expression's tokens so far.
    in_python: Option<Vec<u32>>,
    /// Tokens to emit instead of sampling (the calculator's answer).
    forced: VecDeque<u32>,
}

impl Row {
    /// Take the next token given this row's logits (V); false once the row is done (its final
    /// events are sent) or its client is gone.
    fn step(&mut self, logits: &[f32], tok: &Tokenizer, sp: &Specials) -> bool {
        let id = match self.forced.pop_front() {
            Some(id) => id,
            None => match self.sampler.sample(logits, &self.generated) {
                Ok(id) => id,
                Err(e) => {
                    let _ = self.events.send(Event::Error(e.to_string()));
                    return false;
                }
            },
        };
        self.generated.push(id);
        if sp.end.contains(&id) {
            return self.finish(Finish::Stop);
        }
        self.calculator(id, tok, sp);
        match self.decoder.push(tok, id) {
            Ok(s) => self.text.push_str(&s),
            Err(e) => {
                let _ = self.events.send(Event::Error(e.to_string()));
                return false;
            }
        }
        if !self.emit() {
            return false;
        }
        if self.generated.len() >= self.max_tokens {
            return self.finish(Finish::Length);
        }
        self.next = id;
        true
    }

    /// Track python blocks; on `<|python_end|>` queue the calculator's answer, if any.
    fn calculator(&mut self, id: u32, tok: &Tokenizer, sp: &Specials) {
        if id == sp.python_start {
            self.in_python = Some(Vec::new());
        } else if id == sp.python_end {
            if let Some(expr) = self.in_python.take()
                && !expr.is_empty()
                && let Some(result) = tok.decode(&expr).ok().and_then(|e| use_calculator(&e))
            {
                self.forced.push_back(sp.output_start);
                self.forced.extend(tok.encode(&result));
                self.forced.push_back(sp.output_end);
            }
        } else if let Some(expr) = &mut self.in_python {
            expr.push(id);
        }
    }

    /// Send the text that can no longer turn into a stop string; on a stop string, send the
    /// text before it and finish. False when the row is done.
    fn emit(&mut self) -> bool {
        let pending = &self.text[self.sent..];
        let hit = self.stop.iter().filter_map(|s| pending.find(s.as_str())).min();
        if let Some(p) = hit {
            let end = self.sent + p;
            self.send_text(end);
            self.text.truncate(end);
            let _ = self.events.send(Event::Done {
                index: self.index,
                finish: Finish::Stop,
                tokens: self.generated.len(),
            });
            return false;
        }
        // Hold back the longest tail that is the start of a stop string: it may complete.
        let hold = self
            .stop
            .iter()
            .filter_map(|s| {
                (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        self.send_text(self.text.len() - hold.min(self.text.len() - self.sent));
        !self.events.is_closed()
    }

    fn send_text(&mut self, end: usize) {
        if end > self.sent {
            let text = self.text[self.sent..end].to_string();
            self.sent = end;
            let _ = self.events.send(Event::Text { index: self.index, text });
        }
    }

    /// Flush the decoder and held-back text, and report the finish.
    fn finish(&mut self, finish: Finish) -> bool {
        let rest = self.decoder.finish();
        self.text.push_str(&rest);
        if self.emit() {
            self.send_text(self.text.len());
            let _ = self.events.send(Event::Done {
                index: self.index,
                finish,
                tokens: self.generated.len(),
            });
        }
        false
    }
}

/// The engine thread's state.
struct Worker {
    gpt: Gpt,
    tok: Arc<Tokenizer>,
    sp: Specials,
    context: usize,
    config: EngineConfig,
    shared: Arc<Shared>,
    /// One cache row per entry of `rows`, in the same order.
    cache: KvCache,
    rows: Vec<Row>,
    /// A request taken from the queue that waits for enough free rows.
    pending: Option<Job>,
    seeds: u64,
}

impl Worker {
    fn new(
        gpt: Gpt,
        tok: Arc<Tokenizer>,
        context: usize,
        config: EngineConfig,
        shared: Arc<Shared>,
    ) -> Worker {
        let sp = Specials::of(&tok);
        let cache = KvCache::new(gpt.config(), context);
        // Unseeded requests draw seeds from the clock, so two servers do not repeat each other.
        let seeds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Worker {
            gpt,
            tok,
            sp,
            context,
            config,
            shared,
            cache,
            rows: Vec::new(),
            pending: None,
            seeds,
        }
    }

    fn run(&mut self, rx: Receiver<Job>) {
        loop {
            if !self.admit(&rx) {
                return;
            }
            self.drop_cancelled();
            if !self.rows.is_empty() {
                self.decode_step();
                if !self.config.step_delay.is_zero() {
                    std::thread::sleep(self.config.step_delay);
                }
            }
            self.shared.active_rows.store(self.rows.len(), Ordering::Relaxed);
        }
    }

    /// Take queued requests while rows are free (blocking when idle). False when every sender
    /// is gone and nothing is left to do.
    fn admit(&mut self, rx: &Receiver<Job>) -> bool {
        loop {
            let free = self.config.max_batch - self.rows.len();
            let job = match self.pending.take() {
                Some(job) => job,
                // Leave requests in the channel while no row is free, so its bound is the queue.
                None if free == 0 => return true,
                None if self.rows.is_empty() => match rx.recv() {
                    Ok(job) => self.dequeued(job),
                    Err(_) => return false,
                },
                None => match rx.try_recv() {
                    Ok(job) => self.dequeued(job),
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => return true,
                },
            };
            if job.events.is_closed() {
                continue;
            }
            if job.params.n > free {
                self.pending = Some(job);
                return true;
            }
            self.prefill(job);
            self.shared.active_rows.store(self.rows.len(), Ordering::Relaxed);
        }
    }

    fn dequeued(&self, job: Job) -> Job {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        job
    }

    /// Run the prompt for all n rows of a request, take each row's first token, and move the
    /// rows that go on into the shared cache.
    fn prefill(&mut self, job: Job) {
        let p = &job.params;
        let (n, t, v) = (p.n, p.prompt.len(), self.gpt.config().vocab_size);
        let fail = |e: String| {
            let _ = job.events.send(Event::Error(e));
        };
        if t == 0 || t + p.max_tokens > self.context {
            return fail(format!(
                "{t} prompt tokens + {} do not fit {}",
                p.max_tokens, self.context
            ));
        }
        let mut cache = KvCache::with_rows(self.gpt.config(), n, self.context);
        // Every row gets the same prompt: (n, T).
        let ids: Vec<u32> = (0..n).flat_map(|_| p.prompt.iter().copied()).collect();
        let logits = match Ids::new(ids, &[n, t])
            .map_err(femtochat_model::ModelError::from)
            .and_then(|ids| self.gpt.forward_cached(&ids, &mut cache))
        {
            Ok(l) => l.to_vec(), // (n, T, V)
            Err(e) => return fail(e.to_string()),
        };
        let stop = Arc::new(p.stop.clone());
        let mut rows = Vec::with_capacity(n);
        for i in 0..n {
            let seed = match p.seed {
                Some(s) => s.wrapping_add(i as u64),
                None => {
                    self.seeds = self
                        .seeds
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    self.seeds
                }
            };
            let sampler = match Sampler::new(p.sampling.clone(), seed) {
                Ok(s) => s,
                Err(e) => return fail(e.to_string()),
            };
            rows.push(Row {
                index: i,
                events: job.events.clone(),
                sampler,
                max_tokens: p.max_tokens,
                stop: stop.clone(),
                generated: Vec::new(),
                next: 0,
                decoder: StreamDecoder::default(),
                text: String::new(),
                sent: 0,
                in_python: None,
                forced: VecDeque::new(),
            });
        }
        let mut alive = Vec::with_capacity(n);
        for (i, row) in rows.iter_mut().enumerate() {
            let last = &logits[(i * t + t - 1) * v..(i * t + t) * v];
            alive.push(row.step(last, &self.tok, &self.sp));
        }
        // Rows done after one token free their cache rows at once (from the back: indices shift).
        for i in (0..n).rev() {
            if !alive[i] {
                rows.remove(i);
                let _ = cache.take_row(i);
            }
        }
        if let Err(e) = self.cache.absorb(cache) {
            return fail(e.to_string());
        }
        self.rows.extend(rows);
    }

    /// Free the rows whose clients are gone.
    fn drop_cancelled(&mut self) {
        for i in (0..self.rows.len()).rev() {
            if self.rows[i].events.is_closed() {
                self.remove(i);
            }
        }
    }

    fn remove(&mut self, i: usize) {
        self.rows.remove(i);
        let _ = self.cache.take_row(i);
    }

    /// One token for every active row: a (R, 1) forward over the shared cache.
    fn decode_step(&mut self) {
        let r = self.rows.len();
        let v = self.gpt.config().vocab_size;
        let ids: Vec<u32> = self.rows.iter().map(|row| row.next).collect();
        let logits = Ids::new(ids, &[r, 1])
            .map_err(femtochat_model::ModelError::from)
            .and_then(|ids| self.gpt.forward_cached(&ids, &mut self.cache));
        let logits = match logits {
            Ok(l) => l.to_vec(), // (R, 1, V)
            Err(e) => {
                // The cache may be half written: fail every row and start over clean.
                for row in &self.rows {
                    let _ = row.events.send(Event::Error(e.to_string()));
                }
                self.rows.clear();
                self.cache = KvCache::new(self.gpt.config(), self.context);
                return;
            }
        };
        let mut alive = Vec::with_capacity(r);
        for (i, row) in self.rows.iter_mut().enumerate() {
            alive.push(row.step(&logits[i * v..(i + 1) * v], &self.tok, &self.sp));
        }
        for i in (0..r).rev() {
            if !alive[i] {
                self.remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use femtochat_model::tokenizer::{SPECIAL_TOKENS, SPLIT_PATTERN, parse_tiktoken};
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    fn tokenizer() -> Tokenizer {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tokenizer/ranks_2048.tiktoken");
        let ranks = parse_tiktoken(&std::fs::read_to_string(path).unwrap()).unwrap();
        Tokenizer::new(ranks, &SPECIAL_TOKENS, SPLIT_PATTERN).unwrap()
    }

    /// A greedy row, so one-hot logits choose each token.
    fn row(stop: &[&str], max_tokens: usize) -> (Row, UnboundedReceiver<Event>) {
        let (events, rx) = unbounded_channel();
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        let row = Row {
            index: 0,
            events,
            sampler: Sampler::new(greedy, 0).unwrap(),
            max_tokens,
            stop: Arc::new(stop.iter().map(|s| s.to_string()).collect()),
            generated: Vec::new(),
            next: 0,
            decoder: StreamDecoder::default(),
            text: String::new(),
            sent: 0,
            in_python: None,
            forced: VecDeque::new(),
        };
        (row, rx)
    }

    fn one_hot(tok: &Tokenizer, id: u32) -> Vec<f32> {
        let mut l = vec![0.0; tok.vocab_size()];
        l[id as usize] = 1.0;
        l
    }

    fn drain(rx: &mut UnboundedReceiver<Event>) -> (String, Option<(Finish, usize)>) {
        let (mut text, mut done) = (String::new(), None);
        while let Ok(e) = rx.try_recv() {
            match e {
                Event::Text { text: t, .. } => {
                    assert!(done.is_none(), "text after done");
                    text.push_str(&t);
                }
                Event::Done { finish, tokens, .. } => done = Some((finish, tokens)),
                Event::Error(m) => panic!("{m}"),
            }
        }
        (text, done)
    }

    #[test]
    fn calculator_answer_is_forced_into_the_stream() {
        let tok = tokenizer();
        let sp = Specials::of(&tok);
        let (mut r, mut rx) = row(&[], 100);
        let mut script = vec![sp.python_start];
        script.extend(tok.encode("12 * 3,000"));
        script.push(sp.python_end);
        for &id in &script {
            assert!(r.step(&one_hot(&tok, id), &tok, &sp));
        }
        // The answer comes next whatever the logits say (here: the end token).
        let answer = tok.encode("36000");
        for _ in 0..answer.len() + 2 {
            assert!(r.step(&one_hot(&tok, sp.end[0]), &tok, &sp));
        }
        assert!(!r.step(&one_hot(&tok, sp.end[0]), &tok, &sp));
        let (text, done) = drain(&mut rx);
        assert_eq!(
            text,
            "<|python_start|>12 * 3,000<|python_end|><|output_start|>36000<|output_end|>"
        );
        assert_eq!(done, Some((Finish::Stop, script.len() + answer.len() + 3)));

        // Not arithmetic: nothing is forced, the model's own token follows.
        let (mut r, mut rx) = row(&[], 100);
        let mut script = vec![sp.python_start];
        script.extend(tok.encode("import os"));
        script.push(sp.python_end);
        for &id in &script {
            assert!(r.step(&one_hot(&tok, id), &tok, &sp));
        }
        assert!(!r.step(&one_hot(&tok, sp.end[1]), &tok, &sp));
        assert_eq!(drain(&mut rx).0, "<|python_start|>import os<|python_end|>");
    }

    #[test]
    fn stop_strings_are_held_back_and_never_sent() {
        let tok = tokenizer();
        let sp = Specials::of(&tok);
        let (mut r, mut rx) = row(&["o w", "zzz"], 100);
        let ids: Vec<u32> =
            "hello world".bytes().map(|b| tok.encode(&(b as char).to_string())[0]).collect();
        let mut sent = String::new();
        for (i, &id) in ids.iter().enumerate() {
            let alive = r.step(&one_hot(&tok, id), &tok, &sp);
            let (t, done) = drain(&mut rx);
            sent.push_str(&t);
            // "o" and "o " might begin the stop string, so they wait.
            assert!(!sent.contains('o'), "sent {sent:?}");
            if i == 6 {
                assert!(!alive);
                assert_eq!(done, Some((Finish::Stop, 7)));
                break;
            }
            assert!(alive);
        }
        assert_eq!(sent, "hell");

        // At max_tokens the held-back text is flushed.
        let (mut r, mut rx) = row(&["zzz"], 3);
        for c in ["a", "z", "z"] {
            r.step(&one_hot(&tok, tok.encode(c)[0]), &tok, &sp);
        }
        let (text, done) = drain(&mut rx);
        assert_eq!(done, Some((Finish::Length, 3)));
        assert_eq!(text, "azz");
    }
}

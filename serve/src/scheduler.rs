//! The batching engine: one thread owns the model and runs continuous batching.
//!
//! Each request becomes `n` rows; a row is one sequence with its own KV-cache row, sampler, stop
//! strings and calculator state. Admission is one ledger shared by `submit` and the engine
//! thread: a request takes free rows at once if nobody is waiting, else a place in the waiting
//! queue, else a 429 — so a burst of max_batch + max_queue requests is always accepted, however
//! far the engine thread lags behind. A request's prompt is prefilled once, alone ((1, T)
//! forward, logits for the last position only), and its n rows fork from that cache row. Every
//! decode step is one forward of (R, 1) tokens over all R active rows, each at its own position;
//! a row leaves (and its cache row is freed) when it stops, reaches its length, or its client
//! goes away. Rows never wait for each other to finish. If the engine thread dies, the engine
//! reports why to `/health` and to every request from then on.
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use femtochat_engine::Ids;
use femtochat_model::sampler::{Sampler, SamplingParams};
use femtochat_model::tokenizer::Tokenizer;
use femtochat_model::{Decoder, Gpt, KvCache};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::{Result, ServeError};
use crate::row::{Row, Specials};

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

/// An accepted request: what to generate and where the events go. Dropping the receiving end
/// cancels it.
struct Job {
    params: GenParams,
    events: UnboundedSender<Event>,
    /// Whether its rows were reserved at submission (else it holds a place in the queue).
    reserved: bool,
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
    /// Fault injection, for tests only: the engine thread panics at this decode step (counted
    /// from 1), as a bug or a lost device would end it. None in service.
    pub panic_at_step: Option<u64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 8,
            max_queue: 64,
            context: None,
            step_delay: Duration::ZERO,
            panic_at_step: None,
        }
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

/// Who holds the rows. `submit` and the engine thread change it under one lock, so what a
/// request is promised never depends on how far the engine thread has got.
#[derive(Default)]
struct Ledger {
    /// Rows the engine holds (an over-count between admitting a request and its prefill).
    active: usize,
    /// Rows promised to accepted requests the engine has not started.
    reserved: usize,
    /// Requests waiting for rows.
    queued: usize,
}

struct Shared {
    info: OnceLock<ModelInfo>,
    status: Mutex<Status>,
    changed: Condvar,
    ledger: Mutex<Ledger>,
    /// Prompts run through the model, and their tokens (one prefill per request, not per choice).
    prefills: AtomicU64,
    prefill_tokens: AtomicU64,
}

impl Shared {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Plain counters: a panic elsewhere cannot leave them half-updated.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, s: Status) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = s;
        self.changed.notify_all();
    }
}

/// Load the model and tokenizer (runs on the engine thread).
pub type Loader = Box<dyn FnOnce() -> femtochat_model::Result<(Gpt, Tokenizer)> + Send>;

/// Handle to the engine thread; cheap to share behind an `Arc`.
pub struct Engine {
    /// Unbounded: the ledger, not the channel, bounds what is accepted.
    tx: Sender<Job>,
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
        if config.context == Some(0) {
            return Err(ServeError::invalid("context must be at least 1 token", None));
        }
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            info: OnceLock::new(),
            status: Mutex::new(Status::Loading),
            changed: Condvar::new(),
            ledger: Mutex::new(Ledger::default()),
            prefills: AtomicU64::new(0),
            prefill_tokens: AtomicU64::new(0),
        });
        let (sh, cfg) = (shared.clone(), config.clone());
        std::thread::Builder::new().name("engine".into()).spawn(move || {
            let (gpt, tok) = match catch_unwind(AssertUnwindSafe(loader)) {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    return sh.set(Status::Failed(format!("loading the model failed: {e}")));
                }
                Err(p) => {
                    let why = panic_message(p.as_ref());
                    return sh.set(Status::Failed(format!("loading the model panicked: {why}")));
                }
            };
            let context = cfg.context.unwrap_or(gpt.config().sequence_len).min(gpt.max_positions());
            let tok = Arc::new(tok);
            let info =
                ModelInfo { tokenizer: tok.clone(), context, vocab_size: gpt.config().vocab_size };
            let _ = sh.info.set(info);
            sh.set(Status::Ready);
            let mut worker = Worker::new(gpt, tok, context, cfg, sh.clone());
            let why = match catch_unwind(AssertUnwindSafe(|| worker.run(&rx))) {
                Ok(()) => "the engine stopped".to_string(),
                Err(p) => format!("the engine thread panicked: {}", panic_message(p.as_ref())),
            };
            // The reason is set before the worker drops its rows' event channels and the queue
            // closes, so a request that sees either finds out why.
            sh.set(Status::Failed(why));
            drop((worker, rx));
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

    /// What a request whose events stopped before its end is told: why the engine stopped, or
    /// (engine still running) that it dropped the request.
    pub fn lost_request(&self) -> ServeError {
        match self.info() {
            Err(e) => e,
            Ok(_) => ServeError::Engine("the engine dropped the request".into()),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Rows decoding now.
    pub fn active_rows(&self) -> usize {
        self.shared.ledger().active
    }

    /// Requests waiting for rows.
    pub fn queued(&self) -> usize {
        self.shared.ledger().queued
    }

    /// Prefills run so far, and the prompt tokens they covered.
    pub fn prefills(&self) -> (u64, u64) {
        let s = &self.shared;
        (s.prefills.load(Ordering::Relaxed), s.prefill_tokens.load(Ordering::Relaxed))
    }

    /// Accept a request; events arrive on `events`. It gets rows at once when enough are free
    /// and nobody waits before it, else a place in the queue; a full queue is `QueueFull`.
    pub fn submit(&self, params: GenParams, events: UnboundedSender<Event>) -> Result<()> {
        self.info()?;
        let n = params.n;
        if n == 0 || n > self.config.max_batch {
            return Err(ServeError::invalid(
                format!("n must be between 1 and {} (the batch size)", self.config.max_batch),
                Some("n"),
            ));
        }
        let mut ledger = self.shared.ledger();
        let free = self.config.max_batch.saturating_sub(ledger.active + ledger.reserved);
        // Nobody waiting: a queued request never has rows promised past it.
        let reserved = ledger.queued == 0 && n <= free;
        if !reserved && ledger.queued >= self.config.max_queue {
            return Err(ServeError::QueueFull(self.config.max_queue));
        }
        // Sent under the ledger's lock, so the channel's order is the order of the promises.
        if self.tx.send(Job { params, events, reserved }).is_err() {
            drop(ledger);
            return Err(self.lost_request());
        }
        if reserved {
            ledger.reserved += n;
        } else {
            ledger.queued += 1;
        }
        Ok(())
    }
}

/// The text of a panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(no message)".into(),
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
    /// Scratch of the decode step, reused from step to step.
    dec: Decoder,
    /// Next token of every row, reused from step to step.
    ids: Vec<u32>,
    rows: Vec<Row>,
    /// Accepted requests not started yet, in order: those with reserved rows, then the queue.
    waiting: VecDeque<Job>,
    seeds: u64,
    steps: u64,
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
            dec: Decoder::new(),
            ids: Vec::new(),
            rows: Vec::new(),
            waiting: VecDeque::new(),
            seeds,
            steps: 0,
        }
    }

    fn run(&mut self, rx: &Receiver<Job>) {
        loop {
            if !self.receive(rx) {
                return;
            }
            self.drop_cancelled();
            self.admit();
            if !self.rows.is_empty() {
                self.steps += 1;
                if self.config.panic_at_step == Some(self.steps) {
                    panic!("fault injected at decode step {}", self.steps);
                }
                self.decode_step();
                if !self.config.step_delay.is_zero() {
                    std::thread::sleep(self.config.step_delay);
                }
            }
            self.shared.ledger().active = self.rows.len();
        }
    }

    /// Move newly accepted requests to `waiting`, blocking while there is nothing to do. False
    /// when every sender is gone and nothing is left.
    fn receive(&mut self, rx: &Receiver<Job>) -> bool {
        if self.rows.is_empty() && self.waiting.is_empty() {
            match rx.recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(_) => return false,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return true,
            }
        }
    }

    /// Start waiting requests in order while their rows are free: a reserved request's rows are
    /// free by construction; a queued one waits until enough rows are.
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            let n = job.params.n;
            {
                let mut ledger = self.shared.ledger();
                if job.reserved {
                    ledger.reserved -= n;
                } else if ledger.active + ledger.reserved + n <= self.config.max_batch {
                    ledger.queued -= 1;
                } else {
                    return;
                }
                ledger.active += n;
            }
            if let Some(job) = self.waiting.pop_front() {
                self.prefill(job);
            }
            self.shared.ledger().active = self.rows.len();
        }
    }

    /// Free the rows, reservations and queue places of requests whose clients are gone.
    fn drop_cancelled(&mut self) {
        for i in (0..self.rows.len()).rev() {
            if self.rows[i].events.is_closed() {
                self.remove(i);
            }
        }
        let shared = &self.shared;
        self.waiting.retain(|job| {
            if !job.events.is_closed() {
                return true;
            }
            let mut ledger = shared.ledger();
            if job.reserved {
                ledger.reserved -= job.params.n;
            } else {
                ledger.queued -= 1;
            }
            false
        });
    }

    /// Run the prompt once (logits for its last position only), fork its cache row for the n
    /// choices, take each choice's first token, and move the rows that go on into the shared
    /// cache.
    fn prefill(&mut self, job: Job) {
        let p = &job.params;
        let (n, t) = (p.n, p.prompt.len());
        let fail = |e: String| {
            let _ = job.events.send(Event::Error(e));
        };
        if t == 0 || t + p.max_tokens > self.context {
            return fail(format!(
                "{t} prompt tokens + {} do not fit {}",
                p.max_tokens, self.context
            ));
        }
        self.shared.prefills.fetch_add(1, Ordering::Relaxed);
        self.shared.prefill_tokens.fetch_add(t as u64, Ordering::Relaxed);
        let mut cache = KvCache::with_rows(self.gpt.config(), 1, self.context);
        let logits = Ids::new(p.prompt.clone(), &[1, t])
            .map_err(femtochat_model::ModelError::from)
            .and_then(|ids| self.gpt.forward_cached_last(&ids, &mut cache))
            .and_then(|l| Ok(l.try_to_vec()?)); // (1, V)
        let logits = match logits {
            Ok(l) => l,
            Err(e) => return fail(e.to_string()),
        };
        if n > 1 {
            match cache.fork_row(0, n - 1).and_then(|more| cache.absorb(more)) {
                Ok(()) => {}
                Err(e) => return fail(e.to_string()),
            }
        }
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
            rows.push(Row::new(i, job.events.clone(), sampler, p.max_tokens, stop.clone()));
        }
        let alive: Vec<bool> =
            rows.iter_mut().map(|row| row.step(&logits, &self.tok, &self.sp)).collect();
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

    fn remove(&mut self, i: usize) {
        self.rows.remove(i);
        let _ = self.cache.take_row(i);
    }

    /// One token for every active row: the model's decode step over the shared cache.
    fn decode_step(&mut self) {
        let r = self.rows.len();
        let v = self.gpt.config().vocab_size;
        self.ids.clear();
        self.ids.extend(self.rows.iter().map(|row| row.next));
        let logits = match self.gpt.decode_step(&self.ids, &mut self.cache, &mut self.dec) {
            Ok(l) => l, // (R, V)
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

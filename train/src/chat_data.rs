//! Conversation data for the chat stages (`train sft`, `train mid`): sources, the training
//! mixture, the packed batch source and the validation set.
//!
//! A source (`--data SOURCE`, repeatable) is `PATH[:EPOCHS]`, its kind read from its first row:
//! - conversations (`{"messages": [{role, content}, ...]}` or a bare array of messages; JSONL,
//!   JSONL.gz, or parquet with a `messages` column, as SmolTalk ships): nanochat's
//!   CustomJSON/SmolTalk;
//! - multiple choice `{question, choices, answer}` (MMLU, auxiliary_train-style rows);
//! - GSM8K `{question, answer}` with `<<expr=result>>` calculator annotations;
//!
//! or `spellingbee=N` / `simplespelling=N` (synthetic tasks over the bundled word list). Every
//! source becomes a task of `tasks/`, rendered exactly as nanochat's; the mixture interleaves
//! them as nanochat's TaskMixture does (a source with EPOCHS > 1 is listed that many times).
//!
//! Conversations longer than a row are truncated when rendered (nanochat truncates at 2048, its
//! context); with `Fill::Pad` no conversation is ever cut across rows.
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use femtochat_engine::{Ids, Reduction, no_grad};
use femtochat_model::Gpt;
use femtochat_model::tokenizer::{
    ChatMessage, Content, Conversation, DEFAULT_MAX_TOKENS, Tokenizer,
};
use rayon::prelude::*;

use crate::packing::{Fill, Seq, pack_row};
use crate::tasks::{Gsm8k, Mmlu, SimpleSpelling, SpellingBee, Task, bundled, open_text};
use crate::trainer::{Batch, BatchSource, Validator};

/// One `--data` source.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    File { path: PathBuf, epochs: usize },
    SpellingBee { size: usize },
    SimpleSpelling { size: usize },
}

impl std::str::FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Source, String> {
        let size = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{s}: the size must be a positive number"))
        };
        if let Some(v) = s.strip_prefix("spellingbee=") {
            return Ok(Source::SpellingBee { size: size(v)? });
        }
        if let Some(v) = s.strip_prefix("simplespelling=") {
            return Ok(Source::SimpleSpelling { size: size(v)? });
        }
        // PATH[:EPOCHS]: a trailing all-digit segment is the epoch count (so C:\x.jsonl works).
        if let Some((path, epochs)) = s.rsplit_once(':')
            && !epochs.is_empty()
            && epochs.bytes().all(|b| b.is_ascii_digit())
        {
            let epochs: usize = epochs.parse().map_err(|e| format!("{s}: {e}"))?;
            if epochs == 0 {
                return Err(format!("{s}: epochs must be at least 1"));
            }
            return Ok(Source::File { path: path.into(), epochs });
        }
        Ok(Source::File { path: s.into(), epochs: 1 })
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { path, epochs: 1 } => write!(f, "{}", path.display()),
            Source::File { path, epochs } => write!(f, "{}:{epochs}", path.display()),
            Source::SpellingBee { size } => write!(f, "spellingbee={size}"),
            Source::SimpleSpelling { size } => write!(f, "simplespelling={size}"),
        }
    }
}

/// The chat data bundled with the repository (`data/sft/`).
pub fn sft_data_dir() -> Result<PathBuf> {
    bundled("data/sft")
}

/// The default SFT mixture, from bundled data only (nanochat's shape: general conversations,
/// multiple choice x `mmlu_epochs`, GSM8K x `gsm8k_epochs`, the identity conversations twice,
/// and the spelling tasks). See data/sft/README.md for what each file is and its license.
pub fn default_sources(mmlu_epochs: usize, gsm8k_epochs: usize) -> Result<Vec<Source>> {
    let d = sft_data_dir()?;
    let file = |name: &str, epochs: usize| Source::File { path: d.join(name), epochs };
    Ok(vec![
        file("dolly15k.jsonl.gz", 1),
        file("gpteacher_codegen.jsonl.gz", 1),
        file("gpteacher_roleplay.jsonl.gz", 1),
        file("identity_conversations.jsonl.gz", 2),
        file("mmlu_dev.jsonl.gz", mmlu_epochs),
        file("mmlu_val.jsonl.gz", mmlu_epochs),
        file("gsm8k_train.jsonl.gz", gsm8k_epochs),
        Source::SpellingBee { size: 4000 },
        Source::SimpleSpelling { size: 4000 },
    ])
}

/// Held-out conversations for validation: OpenAssistant's own validation split, never trained on.
pub fn default_val_sources() -> Result<Vec<Source>> {
    Ok(vec![Source::File {
        path: sft_data_dir()?.join("oasst1_en_validation.jsonl.gz"),
        epochs: 1,
    }])
}

/// The files a set of sources reads (for the run record's fingerprints).
pub fn source_files(sources: &[Source]) -> Vec<PathBuf> {
    sources
        .iter()
        .filter_map(|s| match s {
            Source::File { path, .. } => Some(path.clone()),
            _ => None,
        })
        .collect()
}

/// Conversations read from a file and checked: an optional leading system message, then user
/// and assistant alternating from the user, every content non-empty text.
pub struct Conversations {
    name: String,
    conversations: Vec<Conversation>,
}

impl Task for Conversations {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.conversations.len()
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        self.conversations.get(i).cloned().with_context(|| {
            format!("example {i} out of range: {} has {}", self.name, self.conversations.len())
        })
    }
}

/// What is wrong with a conversation, if anything.
fn check_conversation(messages: &[ChatMessage]) -> Option<String> {
    let rest = match messages.first() {
        Some(m) if m.role == "system" => &messages[1..],
        _ => messages,
    };
    if rest.len() < 2 {
        return Some(format!(
            "{} messages after the system message; needs a user and an assistant one",
            rest.len()
        ));
    }
    for (k, m) in rest.iter().enumerate() {
        if !["user", "assistant", "system"].contains(&m.role.as_str()) {
            return Some(format!("message {k}: unknown role {:?}", m.role));
        }
        let want = if k % 2 == 0 { "user" } else { "assistant" };
        if m.role != want {
            return Some(format!(
                "message {k}: expected role {want:?}, got {:?} (roles must alternate from the user)",
                m.role
            ));
        }
        match &m.content {
            Content::Text(t) if t.trim().is_empty() => {
                return Some(format!("message {k}: empty content"));
            }
            Content::Parts(p) if p.is_empty() => {
                return Some(format!("message {k}: empty content"));
            }
            _ => {}
        }
    }
    None
}

/// One row of a conversation file: a bare array of messages or `{"messages": [...]}`.
fn messages_of(v: serde_json::Value) -> std::result::Result<Vec<ChatMessage>, String> {
    let arr = match v {
        serde_json::Value::Array(_) => v,
        serde_json::Value::Object(mut o) => o.remove("messages").ok_or("no `messages` field")?,
        _ => return Err("not a JSON object or array".into()),
    };
    serde_json::from_value(arr).map_err(|e| format!("messages: {e}"))
}

/// Read a conversation file (JSONL, JSONL.gz or parquet) into nanochat's dataset order; bad
/// rows are errors naming file and line, or skipped and counted with `skip_bad`.
pub fn load_conversations(
    path: &Path,
    skip_bad: bool,
    skipped: &mut usize,
) -> Result<Conversations> {
    let rows: ParsedRows = if is_parquet(path) {
        parquet_messages(path)?
    } else {
        let mut rows = Vec::new();
        for (n, line) in open_text(path)?.lines().enumerate() {
            let line = line.with_context(|| format!("{}:{}: reading", path.display(), n + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<serde_json::Value>(&line)
                .map_err(|e| format!("invalid JSON: {e}"))
                .and_then(messages_of);
            rows.push((n + 1, parsed));
        }
        rows
    };
    let mut conversations = Vec::with_capacity(rows.len());
    for (line, parsed) in rows {
        let problem = match &parsed {
            Ok(m) => check_conversation(m),
            Err(e) => Some(e.clone()),
        };
        match (problem, parsed) {
            (None, Ok(messages)) => conversations.push(Conversation { messages }),
            (Some(p), _) | (None, Err(p)) => {
                if !skip_bad {
                    bail!("{}:{line}: {p} (pass --skip-bad to skip such rows)", path.display());
                }
                *skipped += 1;
                if *skipped <= 5 {
                    eprintln!("skipping {}:{line}: {p}", path.display());
                }
            }
        }
    }
    if conversations.is_empty() {
        bail!("{}: no usable conversation", path.display());
    }
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    // In nanochat's dataset order (SmolTalk's `shuffle(seed=42)`), as every task here is.
    let conversations = crate::tasks::nanochat_order(conversations);
    Ok(Conversations { name, conversations })
}

fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

/// (line or row number, the row's messages or what is wrong with it).
type ParsedRows = Vec<(usize, std::result::Result<Vec<ChatMessage>, String>)>;

/// The `messages` column of a parquet file (a list of {role, content} structs per row).
fn parquet_messages(path: &Path) -> Result<ParsedRows> {
    use parquet::file::reader::FileReader;
    use parquet::file::serialized_reader::SerializedFileReader;
    use parquet::record::Field;
    let at = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("opening {at}"))?;
    let reader =
        SerializedFileReader::new(file).with_context(|| format!("{at}: not a parquet file"))?;
    let idx = reader
        .metadata()
        .file_metadata()
        .schema()
        .get_fields()
        .iter()
        .position(|f| f.name() == "messages")
        .with_context(|| format!("{at}: no `messages` column"))?;
    let mut out = Vec::new();
    for (n, row) in
        reader.get_row_iter(None).with_context(|| format!("{at}: reading rows"))?.enumerate()
    {
        let row = row.with_context(|| format!("{at}: row {}", n + 1))?;
        let field = row.get_column_iter().nth(idx).map(|(_, f)| f.clone());
        let parsed = match field {
            Some(Field::ListInternal(list)) => list
                .elements()
                .iter()
                .map(|e| match e {
                    Field::Group(g) => {
                        let (mut role, mut content) = (None, None);
                        for (k, v) in g.get_column_iter() {
                            if let Field::Str(s) = v {
                                match k.as_str() {
                                    "role" => role = Some(s.clone()),
                                    "content" => content = Some(s.clone()),
                                    _ => {}
                                }
                            }
                        }
                        match (role, content) {
                            (Some(role), Some(c)) => {
                                Ok(ChatMessage { role, content: Content::Text(c) })
                            }
                            _ => Err("a message without string `role` and `content`".to_string()),
                        }
                    }
                    _ => Err("a message that is not a struct".to_string()),
                })
                .collect(),
            _ => Err("`messages` is not a list".to_string()),
        };
        out.push((n + 1, parsed));
    }
    Ok(out)
}

/// Which task a data file holds, from its first row.
fn detect(path: &Path) -> Result<&'static str> {
    if is_parquet(path) {
        return Ok("conversations");
    }
    for line in open_text(path)?.lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:1: the first row is not JSON", path.display()))?;
        return Ok(match &v {
            serde_json::Value::Array(_) => "conversations",
            serde_json::Value::Object(o) if o.contains_key("messages") => "conversations",
            serde_json::Value::Object(o) if o.contains_key("choices") && o["answer"].is_u64() => {
                "mmlu"
            }
            serde_json::Value::Object(o)
                if o.contains_key("question") && o["answer"].is_string() =>
            {
                "gsm8k"
            }
            _ => bail!(
                "{}: rows are neither conversations ({{\"messages\": [...]}}), multiple choice \
                 ({{question, choices, answer}}) nor GSM8K ({{question, answer}})",
                path.display()
            ),
        });
    }
    bail!("{}: empty file", path.display())
}

/// Build the tasks of `sources` (a source with EPOCHS > 1 listed that many times) and their
/// count of skipped bad rows.
pub fn tasks(sources: &[Source], skip_bad: bool) -> Result<(Vec<Arc<dyn Task>>, usize)> {
    let mut out: Vec<Arc<dyn Task>> = Vec::new();
    let mut skipped = 0;
    let mut words: Option<Vec<String>> = None;
    let mut word_list = || -> Result<Vec<String>> {
        if words.is_none() {
            let path = bundled("data/eval/chat")?.join("words_alpha.txt.gz");
            words = Some(crate::tasks::spelling::load_words(&path)?);
        }
        Ok(words.clone().unwrap_or_default())
    };
    for s in sources {
        let (task, epochs): (Arc<dyn Task>, usize) = match s {
            Source::File { path, epochs } => {
                if !path.exists() {
                    bail!("{} does not exist", path.display());
                }
                let task: Arc<dyn Task> = match detect(path)? {
                    "conversations" => Arc::new(load_conversations(path, skip_bad, &mut skipped)?),
                    "mmlu" => Arc::new(Mmlu::load(path)?),
                    _ => Arc::new(Gsm8k::load(path)?),
                };
                (task, *epochs)
            }
            Source::SpellingBee { size } => (
                Arc::new(SpellingBee::new(
                    word_list()?,
                    *size,
                    crate::tasks::spelling::Split::Train,
                )),
                1,
            ),
            Source::SimpleSpelling { size } => (
                Arc::new(SimpleSpelling::new(
                    word_list()?,
                    *size,
                    crate::tasks::spelling::Split::Train,
                )),
                1,
            ),
        };
        for _ in 0..epochs {
            out.push(task.clone());
        }
    }
    if out.is_empty() {
        bail!("no data sources");
    }
    Ok((out, skipped))
}

/// How a chat stage packs and learns its conversations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Packing {
    pub fill: Fill,
    /// Learn only where the rendering's mask is 1 (SFT); every token otherwise (mid).
    pub masked: bool,
    /// Conversations held for best fit (nanochat's SFT: 100).
    pub buffer: usize,
}

impl Packing {
    pub const SFT: Packing = Packing { fill: Fill::Pad, masked: true, buffer: 100 };
    pub const MID: Packing = Packing { fill: Fill::Crop, masked: false, buffer: 1000 };
}

/// Tokens a conversation may have once rendered, for rows of `t + 1` tokens: with padding no
/// conversation may be longer than a row; cropping cuts at nanochat's 2048.
fn render_limit(p: Packing, t: usize) -> usize {
    match p.fill {
        Fill::Pad => (t + 1).min(DEFAULT_MAX_TOKENS),
        Fill::Crop => DEFAULT_MAX_TOKENS,
    }
}

fn render(data: &dyn Task, tok: &Tokenizer, i: usize, limit: usize) -> Result<(Vec<u32>, Vec<u8>)> {
    let conv = data.conversation(i)?;
    tok.render_conversation(&conv, limit)
        .with_context(|| format!("rendering example {i} of {}", data.name()))
}

/// Packed batches of the conversations of a task (a mixture), cycling epoch after epoch. The
/// state is the number of conversations fetched and the fetch numbers of the buffered ones, so
/// a restored loader rebuilds the same buffer.
pub struct ConvLoader {
    data: Arc<dyn Task>,
    tok: Arc<Tokenizer>,
    b: usize,
    t: usize,
    packing: Packing,
    /// Fetch number of the next conversation (conversation `next % len` of epoch `next / len`).
    next: u64,
    buffer: Vec<Seq>,
    /// Conversations placed in a row so far (whole, or cropped in Crop mode).
    consumed: u64,
    /// Stop at the end of the data instead of cycling (validation).
    once: bool,
}

impl ConvLoader {
    pub fn new(
        data: Arc<dyn Task>,
        tok: Arc<Tokenizer>,
        b: usize,
        t: usize,
        packing: Packing,
    ) -> Result<ConvLoader> {
        if data.is_empty() {
            bail!("the conversation data is empty");
        }
        Ok(ConvLoader {
            data,
            tok,
            b,
            t,
            packing,
            next: 0,
            buffer: Vec::new(),
            consumed: 0,
            once: false,
        })
    }

    /// One packed row, or None when a one-pass loader is exhausted.
    fn row(&mut self) -> Result<Option<crate::packing::Row>> {
        let (fill, pad, len) = (self.packing.fill, self.tok.bos(), self.t + 1);
        let (buf_before, next_before) = (self.buffer.len() as u64, self.next);
        let limit = render_limit(self.packing, self.t);
        let ConvLoader { data, tok, next, buffer, packing, once, .. } = self;
        let row = pack_row(buffer, len, fill, pad, |buf| {
            refill(data.as_ref(), tok, next, buf, packing.buffer, limit, *once)
        })?;
        // Every conversation that left the buffer went into a row (whole, or cropped).
        self.consumed += buf_before + (self.next - next_before) - self.buffer.len() as u64;
        Ok(row)
    }

    /// Conversations placed in rows so far, and the size of one epoch.
    #[cfg(test)]
    pub fn consumed(&self) -> (u64, usize) {
        (self.consumed, self.data.len())
    }
}

/// Top `buffer` up to `size` rendered conversations, fetching from `*next` on (rendering in
/// parallel); a one-pass loader stops at the end of the data.
fn refill(
    data: &dyn Task,
    tok: &Tokenizer,
    next: &mut u64,
    buffer: &mut Vec<Seq>,
    size: usize,
    limit: usize,
    once: bool,
) -> Result<()> {
    let len = data.len() as u64;
    let want = size.saturating_sub(buffer.len()) as u64;
    let ks: Vec<u64> = (*next..*next + want).filter(|&k| !once || k < len).collect();
    *next += ks.len() as u64;
    let one = |&k: &u64| -> Result<Seq> {
        let (ids, mask) = render(data, tok, (k % len) as usize, limit)?;
        Ok(Seq { id: k, ids, mask })
    };
    // Steady state tops up a conversation or two per row: render those here, on the loader's
    // thread, rather than as jobs for the pool the model's kernels run on.
    let seqs: Result<Vec<Seq>> =
        if ks.len() < 16 { ks.iter().map(one).collect() } else { ks.par_iter().map(one).collect() };
    buffer.extend(seqs?);
    Ok(())
}

impl BatchSource for ConvLoader {
    fn next_batch(&mut self) -> Result<Batch> {
        let (mut inputs, mut targets) =
            (Vec::with_capacity(self.b * self.t), Vec::with_capacity(self.b * self.t));
        for _ in 0..self.b {
            let row = self.row()?.context("the conversation data ran out")?;
            let (i, t) = row.inputs_targets(self.packing.masked);
            inputs.extend(i);
            targets.extend(t);
        }
        Ok(Batch { inputs, targets })
    }

    fn state(&self) -> serde_json::Value {
        let buffered: Vec<u64> = self.buffer.iter().map(|s| s.id).collect();
        serde_json::json!({ "next": self.next, "buffer": buffered, "consumed": self.consumed })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let num = |k: &str| state[k].as_u64().with_context(|| format!("loader state has no `{k}`"));
        let (next, consumed) = (num("next")?, num("consumed")?);
        let ids: Vec<u64> = state["buffer"]
            .as_array()
            .context("loader state has no `buffer`")?
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        let len = self.data.len() as u64;
        let limit = render_limit(self.packing, self.t);
        let (data, tok) = (&self.data, &self.tok);
        let seqs: Result<Vec<Seq>> = ids
            .par_iter()
            .map(|&k| {
                let (ids, mask) = render(data.as_ref(), tok, (k % len) as usize, limit)?;
                Ok(Seq { id: k, ids, mask })
            })
            .collect();
        self.buffer = seqs?;
        self.next = next;
        self.consumed = consumed;
        Ok(())
    }
}

/// Optimizer steps of one epoch: micro-batches are packed (from the rendered lengths alone)
/// until every conversation has been placed once, as nanochat's SFT stops when its loader has
/// consumed the dataset; steps = those micro-batches / `grad_accum`, rounded up.
pub fn epoch_steps(
    data: &dyn Task,
    tok: &Tokenizer,
    b: usize,
    t: usize,
    packing: Packing,
    grad_accum: usize,
) -> Result<usize> {
    let limit = render_limit(packing, t);
    let lengths: Vec<usize> = (0..data.len())
        .into_par_iter()
        .map(|i| render(data, tok, i, limit).map(|(ids, _)| ids.len()))
        .collect::<Result<_>>()?;
    let n = lengths.len() as u64;
    let (mut next, mut consumed, mut rows) = (0u64, 0u64, 0u64);
    let mut buffer: Vec<Seq> = Vec::new();
    while consumed < n {
        let (buf_before, next_before) = (buffer.len() as u64, next);
        pack_row(&mut buffer, t + 1, packing.fill, 0, |buf| {
            while buf.len() < packing.buffer {
                let len = lengths[(next % n) as usize];
                buf.push(Seq { id: next, ids: vec![0; len], mask: vec![0; len] });
                next += 1;
            }
            Ok(())
        })?;
        consumed += buf_before + (next - next_before) - buffer.len() as u64;
        rows += 1;
    }
    let micro = rows.div_ceil(b as u64) as usize;
    Ok(micro.div_ceil(grad_accum.max(1)).max(1))
}

/// Fixed validation batches of held-out conversations, packed and masked as in training, and
/// their bits per byte (the loss of learned targets with a non-zero byte length, over ln 2 times
/// their bytes).
pub struct ConvValSet {
    batches: Vec<Batch>,
    t: usize,
    token_bytes: Vec<u32>,
}

impl ConvValSet {
    /// Up to `max_tokens` worth of rows from one pass over `data`.
    pub fn new(
        data: Arc<dyn Task>,
        tok: Arc<Tokenizer>,
        b: usize,
        t: usize,
        packing: Packing,
        max_tokens: usize,
    ) -> Result<ConvValSet> {
        let token_bytes = tok.byte_lengths();
        let mut loader = ConvLoader::new(data, tok, 1, t, packing)?;
        loader.once = true;
        let mut rows = Vec::new();
        while rows.len() * t < max_tokens.max(t) {
            match loader.row()? {
                Some(r) => rows.push(r.inputs_targets(packing.masked)),
                None => break,
            }
        }
        if rows.is_empty() {
            bail!("the validation conversations give no row");
        }
        let batches = rows
            .chunks(b.max(1))
            .map(|c| Batch {
                inputs: c.iter().flat_map(|(i, _)| i.iter().copied()).collect(),
                targets: c.iter().flat_map(|(_, t)| t.iter().copied()).collect(),
            })
            .collect();
        Ok(ConvValSet { batches, t, token_bytes })
    }

    pub fn tokens(&self) -> usize {
        self.batches.iter().map(|b| b.inputs.len()).sum()
    }
}

impl Validator for ConvValSet {
    fn val_bpb(&mut self, gpt: &Gpt) -> Result<f64> {
        let _g = no_grad();
        let (mut nats, mut bytes) = (0.0f64, 0u64);
        for batch in &self.batches {
            let rows = batch.inputs.len() / self.t;
            let idx = Ids::new(batch.inputs.clone(), &[rows, self.t])?;
            let losses = gpt.loss(&idx, &batch.targets, Reduction::None)?.try_to_vec()?;
            for (&l, &tgt) in losses.iter().zip(&batch.targets) {
                let by = if tgt < 0 {
                    0
                } else {
                    self.token_bytes.get(tgt as usize).copied().unwrap_or(0)
                };
                if by > 0 {
                    nats += l as f64;
                    bytes += by as u64;
                }
            }
        }
        if bytes == 0 {
            bail!("the validation conversations hold no learned text bytes");
        }
        Ok(nats / (std::f64::consts::LN_2 * bytes as f64))
    }
}

#[cfg(test)]
#[path = "chat_data_tests.rs"]
mod tests;

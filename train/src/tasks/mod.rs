//! Tasks after nanochat's `tasks/`: a task is a dataset of conversations plus how to score a
//! completion. The same objects feed SFT mixtures (`conversation(i)`, rendered by
//! `Tokenizer::render_conversation`) and the chat evaluators (`evaluate(i, completion)`;
//! categorical tasks also name their answer letters).
//!
//! Row order is nanochat's: every dataset task holds its rows in the order of
//! `numpy.random.default_rng(42).permutation(n)` (nanochat's `HubDataset.shuffle(seed=42)`), so
//! example `i` here is example `i` there and `--max-problems N` picks the same problems.
//!
//! ```text
//! let gsm = Arc::new(Gsm8k::load(&chat_data_dir()?.join("gsm8k/test.jsonl.gz"))?);
//! let conv = gsm.conversation(0)?;                       // user question, assistant parts
//! let ok = gsm.evaluate(0, "... #### 18")?;             // answer extraction after ####
//! let mix = TaskMixture::new(vec![gsm.clone(), gsm]);   // two epochs, interleaved (seed 42)
//! let val = Slice::new(Arc::new(Mmlu::load(path)?), 0, Some(5200), 1)?; // nanochat's stop=5200
//! ```
// The training side (TaskMixture, Slice, JsonlConversations, SimpleSpelling) serves `train sft`,
// which lands separately; until then the binary does not call it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use femtochat_model::tokenizer::{ChatMessage, Content, Conversation};
use serde::de::DeserializeOwned;

use crate::pyrandom::PyRandom;

pub mod arc;
pub mod conversations;
pub mod gsm8k;
pub mod humaneval;
pub mod mmlu;
pub mod spelling;

pub use arc::Ai2Arc;
#[allow(unused_imports)] // for train sft
pub use conversations::JsonlConversations;
pub use gsm8k::Gsm8k;
pub use humaneval::HumanEval;
pub use mmlu::Mmlu;
#[allow(unused_imports)] // SimpleSpelling is for train sft
pub use spelling::{SimpleSpelling, SpellingBee};

/// How the chat evaluator scores a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalKind {
    /// One forward pass; the answer is the argmax of the logits over the answer letters.
    Categorical,
    /// Sample a completion and check it.
    Generative,
}

/// A dataset of conversations and how to score a completion of one.
pub trait Task: Send + Sync {
    /// Short name, e.g. "gsm8k".
    fn name(&self) -> &str;
    /// Number of examples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Example `i` (< len) as a conversation ending with the reference assistant message.
    fn conversation(&self, i: usize) -> Result<Conversation>;
    fn kind(&self) -> EvalKind {
        EvalKind::Generative
    }
    /// Answer letters of example `i` (categorical tasks; empty otherwise).
    fn letters(&self, _i: usize) -> Vec<String> {
        Vec::new()
    }
    /// Whether `completion` (the assistant's text, or the chosen letter for a categorical task)
    /// solves example `i`.
    fn evaluate(&self, _i: usize, _completion: &str) -> Result<bool> {
        bail!("task {} has no evaluation (training data only)", self.name())
    }
}

fn check_index(task: &dyn Task, i: usize) -> Result<()> {
    if i >= task.len() {
        bail!("example {i} out of range: task {} has {}", task.name(), task.len());
    }
    Ok(())
}

/// A strided view `start..stop` by `step` of a task (nanochat's Task(start, stop, step)).
pub struct Slice {
    inner: Arc<dyn Task>,
    start: usize,
    step: usize,
    len: usize,
    name: String,
}

impl Slice {
    pub fn new(
        inner: Arc<dyn Task>,
        start: usize,
        stop: Option<usize>,
        step: usize,
    ) -> Result<Slice> {
        let stop = stop.unwrap_or(inner.len());
        if step == 0 || stop < start || stop > inner.len() {
            bail!(
                "bad slice {start}..{stop} step {step} of task {} ({} examples)",
                inner.name(),
                inner.len()
            );
        }
        let len = (stop - start).div_ceil(step);
        let name = format!("{}[{start}:{stop}:{step}]", inner.name());
        Ok(Slice { inner, start, step, len, name })
    }

    fn map(&self, i: usize) -> Result<usize> {
        check_index(self, i)?;
        Ok(self.start + i * self.step)
    }
}

impl Task for Slice {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.len
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        self.inner.conversation(self.map(i)?)
    }
    fn kind(&self) -> EvalKind {
        self.inner.kind()
    }
    fn letters(&self, i: usize) -> Vec<String> {
        self.map(i).map(|j| self.inner.letters(j)).unwrap_or_default()
    }
    fn evaluate(&self, i: usize, completion: &str) -> Result<bool> {
        self.inner.evaluate(self.map(i)?, completion)
    }
}

/// Tasks interleaved for training, as nanochat's TaskMixture: every (task, example) pair once,
/// in the order of `random.Random(42).shuffle`. Pass a task several times to oversample it.
pub struct TaskMixture {
    tasks: Vec<Arc<dyn Task>>,
    index: Vec<(u32, u32)>,
}

impl TaskMixture {
    pub fn new(tasks: Vec<Arc<dyn Task>>) -> TaskMixture {
        let mut index: Vec<(u32, u32)> = Vec::new();
        for (t, task) in tasks.iter().enumerate() {
            index.extend((0..task.len()).map(|i| (t as u32, i as u32)));
        }
        PyRandom::new(42).shuffle(&mut index);
        TaskMixture { tasks, index }
    }

    /// Which task and which of its examples mixture example `i` is.
    pub fn source(&self, i: usize) -> Result<(&dyn Task, usize)> {
        let &(t, j) = self.index.get(i).with_context(|| {
            format!("example {i} out of range: mixture has {}", self.index.len())
        })?;
        Ok((self.tasks[t as usize].as_ref(), j as usize))
    }
}

impl Task for TaskMixture {
    fn name(&self) -> &str {
        "mixture"
    }
    fn len(&self) -> usize {
        self.index.len()
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        let (task, j) = self.source(i)?;
        task.conversation(j)
    }
    fn evaluate(&self, i: usize, completion: &str) -> Result<bool> {
        let (task, j) = self.source(i)?;
        task.evaluate(j, completion)
    }
}

/// The chat-eval data bundled with the repository (`data/eval/chat/`).
pub fn chat_data_dir() -> Result<PathBuf> {
    bundled("data/eval/chat")
}

/// A folder of the repository's `data/`, from the working directory or the source tree.
pub fn bundled(rel: &str) -> Result<PathBuf> {
    let candidates =
        [PathBuf::from(rel), Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)];
    candidates.into_iter().find(|p| p.is_dir()).with_context(|| {
        format!(
            "the bundled data ({rel}/) was not found; run from the repository root or pass a path"
        )
    })
}

/// A text file, gunzipped when its name ends in `.gz`.
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let r: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::new(r)))
}

/// Every non-empty line of a `.jsonl` / `.jsonl.gz` file as `T`; errors name the file and line.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (n, line) in open_text(path)?.lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: reading", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a valid row", path.display(), n + 1))?,
        );
    }
    Ok(out)
}

/// `rows` in nanochat's dataset order (`default_rng(42).permutation`).
pub fn nanochat_order<T>(rows: Vec<T>) -> Vec<T> {
    let mut slots: Vec<Option<T>> = rows.into_iter().map(Some).collect();
    crate::pyrandom::numpy::permutation(42, slots.len())
        .into_iter()
        .filter_map(|p| slots[p].take())
        .collect()
}

/// A user message then an assistant message.
pub fn user_assistant(user: String, assistant: Content) -> Conversation {
    Conversation {
        messages: vec![
            ChatMessage { role: "user".into(), content: Content::Text(user) },
            ChatMessage { role: "assistant".into(), content: assistant },
        ],
    }
}

/// nanochat's multiple-choice prompt: each choice followed by `=` and its letter (no space, so
/// the letter is the same token the assistant answers with).
pub fn render_mc(question: &str, letters: &[String], choices: &[String]) -> String {
    let mut q = format!("Multiple Choice question: {question}\n");
    for (letter, choice) in letters.iter().zip(choices) {
        q.push_str(&format!("- {choice}={letter}\n"));
    }
    q.push_str("\nRespond only with the letter of the correct answer.");
    q
}

/// The number after `#### ` (GSM8K's official normalisation: commas dropped), if any.
pub fn extract_answer(text: &str) -> Option<String> {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| regex::Regex::new(r"#### (-?[0-9.,]+)").expect("a valid regex"));
    re.captures(text).map(|c| c[1].trim().replace(',', ""))
}

/// A categorical task's verdict: the chosen letter equals the reference assistant message.
fn letter_matches(task: &dyn Task, i: usize, letter: &str) -> Result<bool> {
    let conv = task.conversation(i)?;
    Ok(match conv.messages.last().map(|m| &m.content) {
        Some(Content::Text(t)) => t == letter,
        _ => false,
    })
}

#[cfg(test)]
mod tests;

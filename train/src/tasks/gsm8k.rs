//! GSM8K: grade-school math word problems. The reference solutions carry calculator calls as
//! `<<expr=result>>`; a conversation renders each as a python part (`expr`, learned) and a
//! python_output part (`result`, forced by the tool at inference), the text around them as text
//! parts — including empty ones, exactly as nanochat splits them. Scoring compares the numbers
//! after `#### `.
use std::path::Path;

use anyhow::Result;
use femtochat_model::tokenizer::{Content, Conversation, Part};
use serde::Deserialize;

use super::{Task, check_index, extract_answer, nanochat_order, read_jsonl, user_assistant};

#[derive(Clone, Debug, Deserialize)]
struct Row {
    question: String,
    answer: String,
}

pub struct Gsm8k {
    rows: Vec<Row>,
}

impl Gsm8k {
    /// Load `train.jsonl.gz` or `test.jsonl.gz` (rows in nanochat's order).
    pub fn load(path: &Path) -> Result<Gsm8k> {
        Ok(Gsm8k { rows: nanochat_order(read_jsonl(path)?) })
    }

    /// The reference answer (the number after `####`) of example `i`.
    pub fn reference(&self, i: usize) -> Option<String> {
        self.rows.get(i).and_then(|r| extract_answer(&r.answer))
    }
}

/// Split a solution on its `<<...>>` calls (Python's `re.split(r'(<<[^>]+>>)', s)`): text
/// pieces and calls alternate, starting and ending with a text piece (possibly empty).
fn split_calls(s: &str) -> Vec<&str> {
    let b = s.as_bytes();
    let (mut out, mut last, mut i) = (Vec::new(), 0, 0);
    while i + 1 < b.len() {
        if b[i] == b'<' && b[i + 1] == b'<' {
            let mut j = i + 2;
            while j < b.len() && b[j] != b'>' {
                j += 1;
            }
            if j > i + 2 && j + 1 < b.len() && b[j + 1] == b'>' {
                out.push(&s[last..i]);
                out.push(&s[i..j + 2]);
                last = j + 2;
                i = j + 2;
                continue;
            }
        }
        i += 1;
    }
    out.push(&s[last..]);
    out
}

/// An answer's parts: text, python (`expr`), python_output (`result`), ...
pub fn answer_parts(answer: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    for piece in split_calls(answer) {
        match piece.strip_prefix("<<").and_then(|p| p.strip_suffix(">>")) {
            Some(inner) => {
                let (expr, result) = inner.rsplit_once('=').unwrap_or((inner, ""));
                parts.push(Part::Python(expr.to_string()));
                parts.push(Part::PythonOutput(result.to_string()));
            }
            None => parts.push(Part::Text(piece.to_string())),
        }
    }
    parts
}

impl Task for Gsm8k {
    fn name(&self) -> &str {
        "gsm8k"
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        check_index(self, i)?;
        let r = &self.rows[i];
        Ok(user_assistant(r.question.clone(), Content::Parts(answer_parts(&r.answer))))
    }
    fn evaluate(&self, i: usize, completion: &str) -> Result<bool> {
        check_index(self, i)?;
        // nanochat reads the reference from the last text part, which holds the #### line.
        let parts = answer_parts(&self.rows[i].answer);
        let last = match parts.last() {
            Some(Part::Text(t)) => t.as_str(),
            _ => "",
        };
        Ok(extract_answer(completion) == extract_answer(last))
    }
}

//! MMLU: 4-choice questions over 57 subjects, rows in Hugging Face `cais/mmlu` layout
//! (`question`, `choices` [4], `answer` 0-3, `subject`). The same layout serves SFT's
//! auxiliary_train-style rows.
use std::path::Path;

use anyhow::{Result, bail};
use femtochat_model::tokenizer::{Content, Conversation};
use serde::Deserialize;

use super::{
    EvalKind, Task, check_index, letter_matches, nanochat_order, read_jsonl, render_mc,
    user_assistant,
};

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

#[derive(Clone, Debug, Deserialize)]
struct Row {
    question: String,
    choices: Vec<String>,
    answer: usize,
    #[serde(default)]
    subject: String,
}

pub struct Mmlu {
    name: String,
    rows: Vec<Row>,
}

impl Mmlu {
    /// Load a split file; rows go into nanochat's order.
    pub fn load(path: &Path) -> Result<Mmlu> {
        let rows: Vec<Row> = read_jsonl(path)?;
        for (n, r) in rows.iter().enumerate() {
            if r.choices.len() != 4 || r.answer >= 4 {
                bail!(
                    "{}: row {}: MMLU needs 4 choices and an answer in 0..4, got {} and {}",
                    path.display(),
                    n + 1,
                    r.choices.len(),
                    r.answer
                );
            }
        }
        Ok(Mmlu { name: "mmlu".into(), rows: nanochat_order(rows) })
    }

    /// The subject of example `i` ("" when the file has none).
    pub fn subject(&self, i: usize) -> Option<&str> {
        self.rows.get(i).map(|r| r.subject.as_str())
    }
}

fn letters() -> Vec<String> {
    LETTERS.iter().map(|s| s.to_string()).collect()
}

impl Task for Mmlu {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        check_index(self, i)?;
        let r = &self.rows[i];
        let user = render_mc(&r.question, &letters(), &r.choices);
        Ok(user_assistant(user, Content::Text(LETTERS[r.answer].to_string())))
    }
    fn kind(&self) -> EvalKind {
        EvalKind::Categorical
    }
    fn letters(&self, _i: usize) -> Vec<String> {
        letters()
    }
    fn evaluate(&self, i: usize, completion: &str) -> Result<bool> {
        letter_matches(self, i, completion)
    }
}

//! ARC (AI2 Reasoning Challenge), Easy or Challenge: 4-choice science questions, rows in Hugging
//! Face `allenai/ai2_arc` layout (`question`, `choices: {text, label}`, `answerKey`).
use std::path::Path;

use anyhow::{Result, bail};
use femtochat_model::tokenizer::{Content, Conversation};
use serde::Deserialize;

use super::{
    EvalKind, Task, check_index, letter_matches, nanochat_order, read_jsonl, render_mc,
    user_assistant,
};

#[derive(Clone, Debug, Deserialize)]
struct Choices {
    text: Vec<String>,
    label: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct Row {
    question: String,
    choices: Choices,
    #[serde(rename = "answerKey")]
    answer_key: String,
}

pub struct Ai2Arc {
    name: String,
    rows: Vec<Row>,
}

impl Ai2Arc {
    /// Load a split (e.g. `ARC-Easy-test.jsonl`); `name` labels it ("arc-easy").
    pub fn load(path: &Path, name: &str) -> Result<Ai2Arc> {
        let rows: Vec<Row> = read_jsonl(path)?;
        for (n, r) in rows.iter().enumerate() {
            if r.choices.text.len() != r.choices.label.len()
                || !r.choices.label.contains(&r.answer_key)
            {
                bail!(
                    "{}: row {}: answerKey {:?} must be one of the {} labels {:?}",
                    path.display(),
                    n + 1,
                    r.answer_key,
                    r.choices.label.len(),
                    r.choices.label
                );
            }
        }
        Ok(Ai2Arc { name: name.to_string(), rows: nanochat_order(rows) })
    }
}

impl Task for Ai2Arc {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        check_index(self, i)?;
        let r = &self.rows[i];
        let user = render_mc(&r.question, &r.choices.label, &r.choices.text);
        Ok(user_assistant(user, Content::Text(r.answer_key.clone())))
    }
    fn kind(&self) -> EvalKind {
        EvalKind::Categorical
    }
    fn letters(&self, i: usize) -> Vec<String> {
        self.rows.get(i).map(|r| r.choices.label.clone()).unwrap_or_default()
    }
    fn evaluate(&self, i: usize, completion: &str) -> Result<bool> {
        letter_matches(self, i, completion)
    }
}

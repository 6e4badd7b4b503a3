//! Conversations stored one per line (nanochat's CustomJSON and SmolTalk-style data): either a
//! JSON array of messages or `{"messages": [...]}`, each message `{"role", "content"}` with
//! string content, user/assistant alternating from the user (an optional leading system
//! message is kept; rendering folds it into the first user message).
use std::path::Path;

use anyhow::{Result, bail};
use femtochat_model::tokenizer::{ChatMessage, Content, Conversation};
use serde::Deserialize;

use super::{Task, check_index, read_jsonl};

#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Messages(Vec<ChatMessage>),
    Object { messages: Vec<ChatMessage> },
}

pub struct JsonlConversations {
    name: String,
    conversations: Vec<Conversation>,
}

impl JsonlConversations {
    /// Load and check every conversation of a `.jsonl` / `.jsonl.gz` file (file order).
    pub fn load(path: &Path, name: &str) -> Result<JsonlConversations> {
        let lines: Vec<Line> = read_jsonl(path)?;
        let mut conversations = Vec::with_capacity(lines.len());
        for (n, line) in lines.into_iter().enumerate() {
            let messages = match line {
                Line::Messages(m) | Line::Object { messages: m } => m,
            };
            let rest = match messages.first() {
                Some(m) if m.role == "system" => &messages[1..],
                _ => &messages[..],
            };
            if rest.len() < 2 {
                bail!("{}: conversation {}: needs at least 2 messages", path.display(), n + 1);
            }
            for (k, m) in rest.iter().enumerate() {
                let want = if k % 2 == 0 { "user" } else { "assistant" };
                if m.role != want || !matches!(m.content, Content::Text(_)) {
                    bail!(
                        "{}: conversation {}: message {k} must be a {want} message with text content (got role {:?})",
                        path.display(),
                        n + 1,
                        m.role
                    );
                }
            }
            conversations.push(Conversation { messages });
        }
        Ok(JsonlConversations { name: name.to_string(), conversations })
    }
}

impl Task for JsonlConversations {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> usize {
        self.conversations.len()
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        check_index(self, i)?;
        Ok(self.conversations[i].clone())
    }
}

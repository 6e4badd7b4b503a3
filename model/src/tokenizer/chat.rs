//! nanochat's chat format (docs/reference.md §9): token ids plus a training mask (1 = the assistant's
//! tokens, which SFT learns to produce).
use serde::{Deserialize, Serialize};

use super::{Tokenizer, tok_err};
use crate::error::Result;

/// One piece of an assistant message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "text", rename_all = "snake_case")]
pub enum Part {
    Text(String),
    /// Code the assistant sends to the calculator tool.
    Python(String),
    /// The tool's answer (not learned: it is forced into the stream).
    PythonOutput(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Content,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
}

/// nanochat truncates renderings to this many tokens.
pub const DEFAULT_MAX_TOKENS: usize = 2048;

struct Rendered {
    ids: Vec<u32>,
    mask: Vec<u8>,
}

impl Rendered {
    fn push(&mut self, ids: Vec<u32>, mask: u8) {
        self.mask.extend(std::iter::repeat_n(mask, ids.len()));
        self.ids.extend(ids);
    }
}

impl Tokenizer {
    /// Ids and mask of a whole conversation, truncated to `max_tokens`.
    pub fn render_conversation(
        &self,
        conv: &Conversation,
        max_tokens: usize,
    ) -> Result<(Vec<u32>, Vec<u8>)> {
        let sp = |name: &str| self.special(name);
        let mut out = Rendered { ids: vec![sp("<|bos|>")?], mask: vec![0] };

        // A leading system message is folded into the first user message.
        let mut messages: Vec<ChatMessage> = conv.messages.clone();
        if messages.first().is_some_and(|m| m.role == "system") {
            let system = messages.remove(0);
            let first = messages
                .first_mut()
                .filter(|m| m.role == "user")
                .ok_or_else(|| tok_err("a system message must be followed by a user message"))?;
            match (&system.content, &mut first.content) {
                (Content::Text(s), Content::Text(u)) => *u = format!("{s}\n\n{u}"),
                _ => return Err(tok_err("system and user messages must be plain text")),
            }
        }
        if messages.is_empty() {
            return Err(tok_err("a conversation needs at least one message"));
        }
        for (i, msg) in messages.iter().enumerate() {
            let want = if i % 2 == 0 { "user" } else { "assistant" };
            if msg.role != want {
                return Err(tok_err(format!(
                    "message {i} has role {:?}; roles must alternate user/assistant starting with user",
                    msg.role
                )));
            }
            if msg.role == "user" {
                let Content::Text(text) = &msg.content else {
                    return Err(tok_err(format!("user message {i} must be plain text")));
                };
                out.push(vec![sp("<|user_start|>")?], 0);
                out.push(self.encode(text), 0);
                out.push(vec![sp("<|user_end|>")?], 0);
            } else {
                out.push(vec![sp("<|assistant_start|>")?], 0);
                match &msg.content {
                    Content::Text(text) => out.push(self.encode(text), 1),
                    Content::Parts(parts) => {
                        for part in parts {
                            match part {
                                Part::Text(t) => out.push(self.encode(t), 1),
                                Part::Python(code) => {
                                    out.push(vec![sp("<|python_start|>")?], 1);
                                    out.push(self.encode(code), 1);
                                    out.push(vec![sp("<|python_end|>")?], 1);
                                }
                                Part::PythonOutput(output) => {
                                    out.push(vec![sp("<|output_start|>")?], 0);
                                    out.push(self.encode(output), 0);
                                    out.push(vec![sp("<|output_end|>")?], 0);
                                }
                            }
                        }
                    }
                }
                out.push(vec![sp("<|assistant_end|>")?], 1);
            }
        }
        out.ids.truncate(max_tokens);
        out.mask.truncate(max_tokens);
        Ok((out.ids, out.mask))
    }

    /// Ids that prompt the model for the next assistant reply: the conversation without its
    /// last message (which must be the assistant's), then `<|assistant_start|>`.
    pub fn render_for_completion(&self, conv: &Conversation) -> Result<Vec<u32>> {
        let mut c = conv.clone();
        match c.messages.last() {
            Some(m) if m.role == "assistant" => {
                c.messages.pop();
            }
            _ => {
                return Err(tok_err(
                    "the last message must be the assistant's (it is replaced by the reply)",
                ));
            }
        }
        let (mut ids, _) = self.render_conversation(&c, usize::MAX)?;
        ids.push(self.special("<|assistant_start|>")?);
        Ok(ids)
    }

    /// Ids that prompt a reply to a conversation ending with a user message (chat serving).
    pub fn render_prompt(&self, conv: &Conversation) -> Result<Vec<u32>> {
        match conv.messages.last() {
            Some(m) if m.role == "user" => {}
            _ => return Err(tok_err("the last message must be the user's")),
        }
        let (mut ids, _) = self.render_conversation(conv, usize::MAX)?;
        ids.push(self.special("<|assistant_start|>")?);
        Ok(ids)
    }
}

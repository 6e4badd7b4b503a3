//! Server-sent events: a streaming request's engine events as OpenAI's chunk objects, ending
//! with `data: [DONE]`. An error after the 200 has gone out is an error object in the stream.
use std::collections::VecDeque;

use actix_web::web;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::*;
use crate::error::ServeError;
use crate::http::{AppState, Kind, error_body, new_id, unix_now};
use crate::scheduler::{Event, Finish};

/// Turns engine events into server-sent events of OpenAI's chunk shapes.
pub(crate) struct Sse {
    rx: UnboundedReceiver<Event>,
    /// Asked why, when the events stop before the end.
    state: web::Data<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    prompt_tokens: usize,
    n: usize,
    done: usize,
    completion_tokens: usize,
    /// Events ready to go out.
    out: VecDeque<web::Bytes>,
    finished: bool,
}

fn sse_line(value: &impl Serialize) -> web::Bytes {
    let json = serde_json::to_string(value).unwrap_or_default();
    web::Bytes::from(format!("data: {json}\n\n"))
}

impl Sse {
    /// The stream of one request of `kind` with `n` choices, fed by `rx`.
    pub(crate) fn new(
        rx: UnboundedReceiver<Event>,
        state: web::Data<AppState>,
        kind: Kind,
        model: String,
        include_usage: bool,
        prompt_tokens: usize,
        n: usize,
    ) -> Sse {
        Sse {
            rx,
            state,
            kind,
            id: new_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
            created: unix_now(),
            model,
            include_usage,
            prompt_tokens,
            n,
            done: 0,
            completion_tokens: 0,
            out: VecDeque::new(),
            finished: false,
        }
    }

    pub(crate) fn into_stream(
        mut self,
    ) -> impl futures_util::Stream<Item = std::result::Result<web::Bytes, actix_web::Error>> {
        if self.kind == Kind::Chat {
            // OpenAI opens each choice with the role.
            for index in 0..self.n {
                let delta = Delta { role: Some("assistant".into()), content: Some(String::new()) };
                let chunk = self.chat_chunk(index, delta, None);
                self.out.push_back(chunk);
            }
        }
        // Dropping this stream (client gone) drops `rx`, which the engine sees as a cancel.
        futures_util::stream::unfold(self, |mut s| async move {
            loop {
                if let Some(b) = s.out.pop_front() {
                    return Some((Ok(b), s));
                }
                if s.finished {
                    return None;
                }
                let event = s.rx.recv().await;
                s.on_event(event);
            }
        })
    }

    fn usage_field(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    fn chat_chunk(&self, index: usize, delta: Delta, finish: Option<Finish>) -> web::Bytes {
        sse_line(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index,
                delta,
                logprobs: None,
                finish_reason: finish.map(|f| f.as_str().into()),
            }],
            usage: self.usage_field(),
        })
    }

    fn text_chunk(&self, choices: Vec<TextChoice>, usage: Option<Option<Usage>>) -> web::Bytes {
        sse_line(&TextCompletion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn on_event(&mut self, event: Option<Event>) {
        let chunk = match event {
            Some(Event::Text { index, text }) => match self.kind {
                Kind::Chat => {
                    self.chat_chunk(index, Delta { role: None, content: Some(text) }, None)
                }
                Kind::Text => self.text_chunk(
                    vec![TextChoice { text, index, logprobs: None, finish_reason: None }],
                    self.usage_field(),
                ),
            },
            Some(Event::Done { index, finish, tokens }) => {
                self.done += 1;
                self.completion_tokens += tokens;
                match self.kind {
                    Kind::Chat => self.chat_chunk(index, Delta::default(), Some(finish)),
                    Kind::Text => self.text_chunk(
                        vec![TextChoice {
                            text: String::new(),
                            index,
                            logprobs: None,
                            finish_reason: Some(finish.as_str().into()),
                        }],
                        self.usage_field(),
                    ),
                }
            }
            Some(Event::Error(m)) => {
                self.finished = true;
                sse_line(&error_body(&ServeError::Engine(m)))
            }
            None => {
                self.finished = true;
                sse_line(&error_body(&self.state.engine.lost_request()))
            }
        };
        self.out.push_back(chunk);
        if self.done == self.n && !self.finished {
            self.finished = true;
            if self.include_usage {
                let usage = Some(Some(Usage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.completion_tokens,
                    total_tokens: self.prompt_tokens + self.completion_tokens,
                }));
                let last = match self.kind {
                    Kind::Chat => sse_line(&ChatChunk {
                        id: self.id.clone(),
                        object: "chat.completion.chunk".into(),
                        created: self.created,
                        model: self.model.clone(),
                        choices: vec![],
                        usage,
                    }),
                    Kind::Text => self.text_chunk(vec![], usage),
                };
                self.out.push_back(last);
            }
        }
        if self.finished {
            self.out.push_back(web::Bytes::from_static(b"data: [DONE]\n\n"));
        }
    }
}

//! One sequence being generated: its sampler, stop strings, streaming text decoder and the
//! calculator tool. The engine owns the rows and feeds each its logits per step; a row turns them
//! into a token and into the events its client sees.
use std::collections::VecDeque;
use std::sync::Arc;

use femtochat_model::sampler::Sampler;
use femtochat_model::tokenizer::{StreamDecoder, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::scheduler::{Event, Finish};
use femtochat_model::tool::use_calculator;

/// The special tokens the engine acts on.
pub(crate) struct Specials {
    /// A row ends on either (docs/reference.md §10).
    end: [u32; 2],
    python_start: u32,
    python_end: u32,
    output_start: u32,
    output_end: u32,
}

impl Specials {
    pub(crate) fn of(tok: &Tokenizer) -> Specials {
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
pub(crate) struct Row {
    index: usize,
    pub(crate) events: UnboundedSender<Event>,
    sampler: Sampler,
    max_tokens: usize,
    stop: Arc<Vec<String>>,
    /// Generated tokens (sampled and forced), for the penalties and the count.
    generated: Vec<u32>,
    /// The token to feed at the next decode step.
    pub(crate) next: u32,
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
    /// Choice `index` of a request, before its first token.
    pub(crate) fn new(
        index: usize,
        events: UnboundedSender<Event>,
        sampler: Sampler,
        max_tokens: usize,
        stop: Arc<Vec<String>>,
    ) -> Row {
        Row {
            index,
            events,
            sampler,
            max_tokens,
            stop,
            generated: Vec::new(),
            next: 0,
            decoder: StreamDecoder::default(),
            text: String::new(),
            sent: 0,
            in_python: None,
            forced: VecDeque::new(),
        }
    }

    /// Take the next token given this row's logits (V); false once the row is done (its final
    /// events are sent) or its client is gone.
    pub(crate) fn step(&mut self, logits: &[f32], tok: &Tokenizer, sp: &Specials) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use femtochat_model::sampler::SamplingParams;
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
        let stop = Arc::new(stop.iter().map(|s| s.to_string()).collect());
        let row = Row::new(0, events, Sampler::new(greedy, 0).unwrap(), max_tokens, stop);
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

//! The chat evaluator on a tiny model: categorical answers are the argmax over the letters at
//! the answer position, generative tasks run end to end, ChatCORE centers by nanochat's
//! baselines.
use std::sync::{Arc, Mutex};

use anyhow::Result;
use femtochat_engine::Ids;
use femtochat_model::tokenizer::{Content, Conversation};

use super::chat::{ChatOptions, prompt_ids, run};
use super::core_tests::{fixture_tokenizer, tiny_gpt};
use super::load_chat_tasks;
use crate::tasks::{EvalKind, Task, chat_data_dir, user_assistant};

/// Four questions whose evaluate records the letter it was given.
struct Recorder(Mutex<Vec<String>>);

impl Task for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn len(&self) -> usize {
        4
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        let q = format!("Question {i}: which letter?{}", " pad".repeat(i * 3));
        Ok(user_assistant(q, Content::Text("A".into())))
    }
    fn kind(&self) -> EvalKind {
        EvalKind::Categorical
    }
    fn letters(&self, _i: usize) -> Vec<String> {
        ["A", "B", "C", "D"].iter().map(|s| s.to_string()).collect()
    }
    fn evaluate(&self, _i: usize, completion: &str) -> Result<bool> {
        self.0.lock().unwrap().push(completion.to_string());
        Ok(completion == "A")
    }
}

#[test]
fn categorical_answer_is_the_argmax_over_the_letters() {
    let tok = fixture_tokenizer();
    let gpt = tiny_gpt(tok.vocab_size(), 128);
    let task = Arc::new(Recorder(Mutex::new(Vec::new())));
    // Batches of 3 with prompts of different lengths: padding must not change the answers.
    let opts = ChatOptions { batch_size: 3, ..Default::default() };
    let report = run(&gpt, &tok, &[task.clone() as Arc<dyn Task>], &opts, |_, _, _| {}).unwrap();
    let got = task.0.lock().unwrap().clone();
    let letters = task.letters(0);
    for (i, answer) in got.iter().enumerate() {
        let ids = prompt_ids(&tok, &task.conversation(i).unwrap()).unwrap();
        let n = ids.len();
        let logits = gpt.forward(&Ids::new(ids, &[1, n]).unwrap()).unwrap().to_vec();
        let v = tok.vocab_size();
        let z = &logits[(n - 1) * v..n * v];
        let score = |l: &String| z[tok.encode(l)[0] as usize];
        let best = letters.iter().fold(&letters[0], |b, l| if score(l) > score(b) { l } else { b });
        assert_eq!(answer, best, "question {i}");
    }
    let acc = got.iter().filter(|a| *a == "A").count() as f64 / 4.0;
    assert_eq!(report.tasks[0].accuracy, acc);
    assert!((report.chatcore - (acc - 0.25) / 0.75).abs() < 1e-12);
}

#[test]
fn every_chat_task_runs_end_to_end() {
    let tok = fixture_tokenizer();
    let gpt = tiny_gpt(tok.vocab_size(), 128);
    let names: Vec<String> = ["arc-easy", "mmlu", "gsm8k", "humaneval", "spellingbee"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tasks = load_chat_tasks(&names, &chat_data_dir().unwrap()).unwrap();
    let opts = ChatOptions { max_problems: Some(2), max_new_tokens: 6, ..Default::default() };
    let mut seen = Vec::new();
    let report = run(&gpt, &tok, &tasks, &opts, |name, done, total| {
        seen.push((name.to_string(), done, total))
    })
    .unwrap();
    assert_eq!(report.tasks.len(), 5);
    for (r, name) in report.tasks.iter().zip(&names) {
        assert_eq!((&r.task, r.n), (name, 2));
    }
    // A random model solves no generative problem: their centered accuracy is 0.
    assert!(report.tasks[2..].iter().all(|r| r.accuracy == 0.0 && r.centered == 0.0));
    assert!(seen.contains(&("gsm8k".to_string(), 2, 2)));
    assert!(load_chat_tasks(&["nope".into()], &chat_data_dir().unwrap()).is_err());
}

/// HumanEval's reference solutions pass in the sandbox; a wrong body does not.
#[test]
fn humaneval_reference_solutions_pass() {
    let tasks = load_chat_tasks(&["humaneval".into()], &chat_data_dir().unwrap()).unwrap();
    let he = &tasks[0];
    for i in 0..3 {
        let conv = he.conversation(i).unwrap();
        let Content::Text(solution) = &conv.messages[1].content else { panic!() };
        assert!(he.evaluate(i, solution).unwrap(), "example {i}");
        assert!(!he.evaluate(i, "def nothing():\n    pass\n").unwrap());
    }
}

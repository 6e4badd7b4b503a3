//! Tests of the chat stages' data: sources, bad rows, packing into batches, resume, the epoch
//! count and the masked validation loss.
use std::sync::Arc;

use femtochat_engine::{Ids, Reduction};
use femtochat_model::tokenizer::{ChatMessage, Content, Conversation, Tokenizer};
use femtochat_model::{GPTConfig, Gpt};

use super::*;
use crate::packing::Fill;
use crate::tasks::TaskMixture;
use crate::trainer::{BatchSource, Validator};

fn tok() -> Arc<Tokenizer> {
    let docs =
        ["what is two plus two? four. the cat sat on the mat", "a dog ran far away from home"];
    Arc::new(Tokenizer::train(&docs, 300).unwrap())
}

fn conv(user: &str, assistant: &str) -> Conversation {
    Conversation {
        messages: vec![
            ChatMessage { role: "user".into(), content: Content::Text(user.into()) },
            ChatMessage { role: "assistant".into(), content: Content::Text(assistant.into()) },
        ],
    }
}

fn write_jsonl(dir: &std::path::Path, name: &str, lines: &[String]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    p
}

/// `n` conversations of varied lengths.
fn conversations(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let c = conv(
                &format!("question {i}: {}", "what is two ".repeat(1 + i % 4)),
                &"four. ".repeat(1 + i % 7),
            );
            serde_json::to_string(&c).unwrap()
        })
        .collect();
    write_jsonl(dir, "conv.jsonl", &lines)
}

#[test]
fn sources_parse_with_epochs_and_synthetic_tasks() {
    assert_eq!(
        "a/b.jsonl".parse::<Source>().unwrap(),
        Source::File { path: "a/b.jsonl".into(), epochs: 1 }
    );
    assert_eq!(
        "a/b.jsonl:3".parse::<Source>().unwrap(),
        Source::File { path: "a/b.jsonl".into(), epochs: 3 }
    );
    assert_eq!(
        r"C:\x.jsonl".parse::<Source>().unwrap(),
        Source::File { path: r"C:\x.jsonl".into(), epochs: 1 }
    );
    assert_eq!("spellingbee=30".parse::<Source>().unwrap(), Source::SpellingBee { size: 30 });
    assert!("a.jsonl:0".parse::<Source>().is_err());
    assert!("simplespelling=0".parse::<Source>().is_err());
    assert_eq!(Source::File { path: "x".into(), epochs: 2 }.to_string(), "x:2");
}

#[test]
fn kinds_are_detected_and_epochs_repeat_a_task() {
    let dir = tempfile::tempdir().unwrap();
    let c = conversations(dir.path(), 5);
    let mc = write_jsonl(
        dir.path(),
        "mc.jsonl",
        &[r#"{"question": "2+2?", "choices": ["1","2","3","4"], "answer": 3}"#.into()],
    );
    let gsm = write_jsonl(
        dir.path(),
        "gsm.jsonl",
        &[r#"{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}"#.into()],
    );
    let srcs = vec![
        Source::File { path: c, epochs: 2 },
        Source::File { path: mc, epochs: 1 },
        Source::File { path: gsm, epochs: 1 },
        Source::SimpleSpelling { size: 3 },
    ];
    let (tasks, skipped) = tasks(&srcs, false).unwrap();
    assert_eq!((tasks.len(), skipped), (5, 0));
    let names: Vec<&str> = tasks.iter().map(|t| t.name()).collect();
    assert_eq!(names, ["conv.jsonl", "conv.jsonl", "mmlu", "gsm8k", "simplespelling"]);
    // The multiple-choice row renders nanochat's prompt; GSM8K's call becomes tool parts.
    let q = tasks[2].conversation(0).unwrap();
    match &q.messages[0].content {
        Content::Text(t) => {
            assert!(t.starts_with("Multiple Choice question: 2+2?\n- 1=A\n"), "{t}")
        }
        other => panic!("{other:?}"),
    }
    use femtochat_model::tokenizer::Part;
    let parts = match &tasks[3].conversation(0).unwrap().messages[1].content {
        Content::Parts(p) => p.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        parts,
        [
            Part::Text("1+1=".into()),
            Part::Python("1+1".into()),
            Part::PythonOutput("2".into()),
            Part::Text("2\n#### 2".into())
        ]
    );
    let unknown = write_jsonl(dir.path(), "x.jsonl", &[r#"{"body": 1}"#.into()]);
    let err = super::tasks(&[Source::File { path: unknown, epochs: 1 }], false).err().unwrap();
    assert!(err.to_string().contains("neither conversations"), "{err}");
}

#[test]
fn bad_rows_name_file_and_line_or_are_skipped_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let good = serde_json::to_string(&conv("hi", "hello")).unwrap();
    let cases = [
        (
            r#"{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}"#,
            "expected role \"user\"",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}"#,
            "empty content",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}"#,
            "unknown role",
        ),
        (r#"{"messages": [{"role": "user", "content": "x"}]}"#, "needs a user and an assistant"),
        ("not json", "invalid JSON"),
    ];
    for (bad, want) in cases {
        let p = write_jsonl(
            dir.path(),
            "c.jsonl",
            &[good.clone(), good.clone(), bad.to_string(), good.clone()],
        );
        let mut skipped = 0;
        let err = load_conversations(&p, false, &mut skipped).err().unwrap().to_string();
        assert!(err.contains("c.jsonl:3") && err.contains(want), "{err}");
        let ok = load_conversations(&p, true, &mut skipped).unwrap();
        assert_eq!((ok.len(), skipped), (3, 1));
    }
    // A leading system message is accepted (rendering folds it into the first user message).
    let sys = r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}"#;
    let p = write_jsonl(dir.path(), "s.jsonl", &[sys.to_string()]);
    assert_eq!(load_conversations(&p, false, &mut 0).unwrap().len(), 1);
}

fn mixture_of(n: usize) -> (tempfile::TempDir, Arc<dyn Task>) {
    let dir = tempfile::tempdir().unwrap();
    let c = conversations(dir.path(), n);
    let (t, _) = tasks(&[Source::File { path: c, epochs: 1 }], false).unwrap();
    (dir, Arc::new(TaskMixture::new(t)))
}

#[test]
fn sft_batches_pad_never_cut_and_learn_only_assistant_tokens() {
    let (_d, data) = mixture_of(40);
    let tok = tok();
    let (b, t) = (3, 160);
    let mut l = ConvLoader::new(data.clone(), tok.clone(), b, t, Packing::SFT).unwrap();
    // Every rendered conversation, to recognise whole ones in the rows.
    let rendered: Vec<Vec<u32>> = (0..data.len())
        .map(|i| tok.render_conversation(&data.conversation(i).unwrap(), t + 1).unwrap().0)
        .collect();
    let assistant_end = tok.special("<|assistant_end|>").unwrap();
    let mut padded = 0;
    for _ in 0..6 {
        let batch = l.next_batch().unwrap();
        for r in 0..b {
            let inputs = &batch.inputs[r * t..(r + 1) * t];
            let targets = &batch.targets[r * t..(r + 1) * t];
            assert_eq!(inputs[0], tok.bos(), "every row starts with BOS");
            // Split the row at BOS: every piece is a whole conversation or padding.
            let starts: Vec<usize> = (0..t).filter(|&i| inputs[i] == tok.bos()).collect();
            for (k, &s) in starts.iter().enumerate() {
                let end = starts.get(k + 1).copied().unwrap_or(t);
                let piece = &inputs[s..end];
                if piece == [tok.bos()]
                    && (end == t || k > 0)
                    && !rendered.iter().any(|c| c == piece)
                {
                    continue; // a BOS pad
                }
                // Whole, or whole but for the row's last token (targets hold it, inputs do not).
                let whole = rendered.iter().any(|c| c == piece)
                    || (end == t
                        && rendered
                            .iter()
                            .any(|c| c.len() == piece.len() + 1 && c.starts_with(piece)));
                assert!(whole, "a cut conversation: {piece:?}");
            }
            // Learned targets are assistant tokens; the assistant_end token is learned.
            assert!(targets.contains(&(assistant_end as i32)));
            assert!(targets.iter().all(|&x| x != tok.special("<|user_start|>").unwrap() as i32));
            if targets[t - 1] == -1 && inputs[t - 1] == tok.bos() {
                padded += 1;
            }
        }
    }
    assert!(padded > 0, "some rows are padded");
}

#[test]
fn conversation_loader_resumes_with_identical_batches() {
    let (_d, data) = mixture_of(30);
    let tok = tok();
    for packing in [Packing::SFT, Packing::MID] {
        let mut a = ConvLoader::new(data.clone(), tok.clone(), 2, 32, packing).unwrap();
        for _ in 0..7 {
            a.next_batch().unwrap();
        }
        let state = a.state();
        let want: Vec<_> = (0..10).map(|_| a.next_batch().unwrap()).collect();
        let mut b = ConvLoader::new(data.clone(), tok.clone(), 2, 32, packing).unwrap();
        b.restore(&state).unwrap();
        let got: Vec<_> = (0..10).map(|_| b.next_batch().unwrap()).collect();
        assert_eq!(got, want, "{packing:?}");
    }
}

#[test]
fn mid_batches_crop_and_learn_every_token() {
    let (_d, data) = mixture_of(30);
    let mut l = ConvLoader::new(data, tok(), 2, 32, Packing::MID).unwrap();
    let b = l.next_batch().unwrap();
    assert!(b.targets.iter().all(|&t| t >= 0), "no padding, no mask");
    assert_eq!(
        &b.targets[..31],
        &b.inputs[1..32].iter().map(|&x| x as i32).collect::<Vec<_>>()[..]
    );
}

#[test]
fn epoch_steps_cover_every_conversation_once() {
    let (_d, data) = mixture_of(50);
    let tok = tok();
    let (b, t, accum) = (2, 64, 3);
    let steps = epoch_steps(data.as_ref(), &tok, b, t, Packing::SFT, accum).unwrap();
    // Run the loader for that many micro-batches: the epoch is consumed exactly then.
    let mut l = ConvLoader::new(data.clone(), tok, b, t, Packing::SFT).unwrap();
    let mut micro = 0usize;
    while l.consumed().0 < data.len() as u64 {
        l.next_batch().unwrap();
        micro += 1;
    }
    assert_eq!(steps, micro.div_ceil(accum));
    assert!(steps > 1);
    let _ = Fill::Pad;
}

#[test]
fn masked_validation_loss_is_the_mean_over_learned_targets() {
    let (_d, data) = mixture_of(12);
    let tok = tok();
    let config = GPTConfig::from_depth(1, 64, 32, 32, tok.vocab_size(), "L").unwrap();
    let gpt = Gpt::init(config, 3).unwrap();
    let mut l = ConvLoader::new(data.clone(), tok.clone(), 2, 32, Packing::SFT).unwrap();
    let batch = l.next_batch().unwrap();
    let idx = Ids::new(batch.inputs.clone(), &[2, 32]).unwrap();
    let mean = gpt.loss(&idx, &batch.targets, Reduction::Mean).unwrap().item().unwrap() as f64;
    let each = gpt.loss(&idx, &batch.targets, Reduction::None).unwrap().to_vec();
    let learned: Vec<f64> =
        each.iter().zip(&batch.targets).filter(|(_, t)| **t >= 0).map(|(l, _)| *l as f64).collect();
    assert!(!learned.is_empty() && learned.len() < each.len());
    let by_hand = learned.iter().sum::<f64>() / learned.len() as f64;
    assert!((mean - by_hand).abs() < 1e-5 * by_hand, "{mean} vs {by_hand}");
    // bits per byte of the validation set: finite, positive, and the same twice.
    let mut val = ConvValSet::new(data, tok, 2, 32, Packing::SFT, 256).unwrap();
    let a = val.val_bpb(&gpt).unwrap();
    assert!(a.is_finite() && a > 0.0);
    assert_eq!(a, val.val_bpb(&gpt).unwrap());
}

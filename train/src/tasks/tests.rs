//! The tasks against nanochat's own task classes run on the same files
//! (`train/tests/fixtures/nanochat_tasks.json`: conversations as nanochat's `task[i]` returns
//! them, a TaskMixture order, GSM8K verdicts).
use std::path::PathBuf;
use std::sync::Arc;

use femtochat_model::tokenizer::{Content, Part};
use serde_json::Value;

use super::spelling::{Split, load_words};
use super::*;

fn fixture() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nanochat_tasks.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn chat(rel: &str) -> PathBuf {
    chat_data_dir().unwrap().join(rel)
}

fn words() -> Vec<String> {
    load_words(&chat("words_alpha.txt.gz")).unwrap()
}

/// Every listed example renders to nanochat's messages (and letters), and lengths agree.
fn check(task: &dyn Task, want: &Value) {
    assert_eq!(task.len() as u64, want["len"].as_u64().unwrap(), "{}", task.name());
    for ex in want["examples"].as_array().unwrap() {
        let i = ex["index"].as_u64().unwrap() as usize;
        let conv = task.conversation(i).unwrap();
        assert_eq!(
            serde_json::to_value(&conv.messages).unwrap(),
            ex["messages"],
            "{} #{i}",
            task.name()
        );
        if let Some(letters) = ex.get("letters") {
            assert_eq!(serde_json::to_value(task.letters(i)).unwrap(), *letters);
            assert_eq!(task.kind(), EvalKind::Categorical);
        }
    }
}

#[test]
fn dataset_tasks_match_nanochat() {
    let f = fixture();
    check(&Ai2Arc::load(&chat("arc/ARC-Easy-test.jsonl.gz"), "arc-easy").unwrap(), &f["arc-easy"]);
    check(
        &Ai2Arc::load(&chat("arc/ARC-Challenge-test.jsonl.gz"), "arc-challenge").unwrap(),
        &f["arc-challenge"],
    );
    check(&Mmlu::load(&chat("mmlu/mmlu_test.jsonl.gz")).unwrap(), &f["mmlu"]);
    check(&Gsm8k::load(&chat("gsm8k/test.jsonl.gz")).unwrap(), &f["gsm8k"]);
    check(&HumanEval::load(&chat("humaneval/HumanEval.jsonl.gz")).unwrap(), &f["humaneval"]);
}

#[test]
fn spelling_tasks_match_nanochat() {
    let f = fixture();
    check(&SpellingBee::new(words(), 100, Split::Train), &f["spellingbee-train"]);
    check(&SpellingBee::new(words(), 256, Split::Test), &f["spellingbee-test"]);
    check(&SimpleSpelling::new(words(), 100, Split::Train), &f["simplespelling-train"]);
}

#[test]
fn categorical_and_gsm8k_scoring_match_nanochat() {
    let f = fixture();
    let gsm = Gsm8k::load(&chat("gsm8k/test.jsonl.gz")).unwrap();
    for case in f["gsm8k_eval"].as_array().unwrap() {
        let completion = case[0].as_str().unwrap();
        assert_eq!(gsm.evaluate(0, completion).unwrap(), case[1] == 1, "{completion:?}");
    }
    assert_eq!(gsm.reference(0).as_deref(), Some("109"));
    let arc = Ai2Arc::load(&chat("arc/ARC-Easy-test.jsonl.gz"), "arc-easy").unwrap();
    // Example 0's answer is B.
    assert!(arc.evaluate(0, "B").unwrap());
    assert!(!arc.evaluate(0, "A").unwrap());
    assert!(arc.evaluate(arc.len(), "B").is_err());
}

#[test]
fn mixture_interleaves_like_nanochat() {
    struct Stub(usize, &'static str);
    impl Task for Stub {
        fn name(&self) -> &str {
            self.1
        }
        fn len(&self) -> usize {
            self.0
        }
        fn conversation(&self, i: usize) -> anyhow::Result<Conversation> {
            Ok(user_assistant(format!("{} {i}", self.1), Content::Text(String::new())))
        }
    }
    let (a, b, c): (Arc<dyn Task>, Arc<dyn Task>, Arc<dyn Task>) =
        (Arc::new(Stub(3, "0")), Arc::new(Stub(5, "1")), Arc::new(Stub(2, "2")));
    let mix = TaskMixture::new(vec![a.clone(), b, a, c]);
    let want = fixture()["mixture"].clone();
    assert_eq!(mix.len(), want.as_array().unwrap().len());
    for (i, w) in want.as_array().unwrap().iter().enumerate() {
        let conv = mix.conversation(i).unwrap();
        let Content::Text(user) = &conv.messages[0].content else { panic!() };
        assert_eq!(*user, format!("{} {}", w[0], w[1]), "mixture #{i}");
    }
    assert!(mix.conversation(mix.len()).is_err());
}

#[test]
fn slices_stride_like_python() {
    let gsm: Arc<dyn Task> = Arc::new(Gsm8k::load(&chat("gsm8k/test.jsonl.gz")).unwrap());
    let s = Slice::new(gsm.clone(), 1, Some(10), 4).unwrap();
    assert_eq!(s.len(), 3); // 1, 5, 9
    assert_eq!(s.conversation(2).unwrap(), gsm.conversation(9).unwrap());
    assert!(s.conversation(3).is_err());
    assert!(Slice::new(gsm.clone(), 5, Some(2), 1).is_err());
    assert_eq!(Slice::new(gsm, 0, Some(420), 1).unwrap().len(), 420);
}

#[test]
fn gsm8k_calls_split_like_re_split() {
    let parts = gsm8k::answer_parts("<<1+1=2>>2 then <<a>b>> <<x>><<3*4=12>>12\n#### 12");
    let want = vec![
        Part::Text("".into()),
        Part::Python("1+1".into()),
        Part::PythonOutput("2".into()),
        Part::Text("2 then <<a>b>> ".into()),
        Part::Python("x".into()),
        Part::PythonOutput("".into()),
        Part::Text("".into()),
        Part::Python("3*4".into()),
        Part::PythonOutput("12".into()),
        Part::Text("12\n#### 12".into()),
    ];
    assert_eq!(parts, want);
}

#[test]
fn conversation_files_load_and_reject_bad_roles() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("c.jsonl");
    std::fs::write(
        &good,
        "[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]\n\
         {\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"}]}\n",
    )
    .unwrap();
    let t = JsonlConversations::load(&good, "c").unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t.conversation(1).unwrap().messages.len(), 3);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "[{\"role\":\"assistant\",\"content\":\"x\"},{\"role\":\"user\",\"content\":\"y\"}]\n",
    )
    .unwrap();
    let err = JsonlConversations::load(&bad, "bad").err().unwrap().to_string();
    assert!(err.contains("bad.jsonl") && err.contains("conversation 1"), "{err}");
}

#[test]
fn humaneval_programs_are_assembled_like_nanochat() {
    let he = HumanEval::load(&chat("humaneval/HumanEval.jsonl.gz")).unwrap();
    let completion = "Here it is:\n```python\ndef f():\n    return 1\n```\nmore text";
    let program = he.program(0, completion).unwrap();
    assert!(program.contains("\n\ndef f():\n    return 1\n\n"), "{program}");
    assert!(program.trim_end().ends_with(')') && program.contains("check("));
    assert_eq!(humaneval::extract_program("  x = 1  "), "x = 1");
    assert_eq!(
        humaneval::extract_imports("import math\n# c\n\nfrom a import b\ndef f(): pass\nimport z"),
        "import math\nfrom a import b"
    );
}

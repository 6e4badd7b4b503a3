use super::*;
use crate::trainer::{Batch, BatchSource};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nanochat_checkpoint").join(rel)
}

/// Deterministic batches from a counter; fails on purpose at batch `fail_at` (a crash).
struct Counter {
    next: u64,
    fail_at: Option<u64>,
}

const B: usize = 2;
const T: usize = 16;
const VOCAB: u32 = 607;

impl BatchSource for Counter {
    fn next_batch(&mut self) -> Result<Batch> {
        if self.fail_at == Some(self.next) {
            bail!("simulated crash");
        }
        let n = B * T;
        let base = self.next as u32 * 13;
        let row: Vec<u32> = (0..=n as u32).map(|i| (base + i * i * 7 + i) % VOCAB).collect();
        self.next += 1;
        Ok(Batch {
            inputs: row[..n].to_vec(),
            targets: row[1..].iter().map(|&x| x as i32).collect(),
        })
    }
    fn state(&self) -> Value {
        json!({ "next": self.next })
    }
    fn restore(&mut self, state: &Value) -> Result<()> {
        self.next = state["next"].as_u64().unwrap_or(0);
        Ok(())
    }
}

/// A tiny run's settings, derived from a nanochat-style meta as an import derives them.
fn settings() -> Settings {
    let config = GPTConfig {
        sequence_len: T,
        vocab_size: VOCAB as usize,
        n_layer: 3,
        n_head: 2,
        n_kv_head: 1,
        n_embd: 32,
        window_pattern: "SL".into(),
    };
    let meta = json!({
        "device_batch_size": B, "total_batch_size": 2 * B * T,
        "user_config": {"num_iterations": 4, "warmup_steps": 1, "warmdown_ratio": 0.5,
                        "eval_every": 0, "sample_every": -1, "save_every": 2},
    });
    let s = settings_from_meta(&config, &meta, Source::Base, 0, None).unwrap();
    assert_eq!((s.grad_accum_steps, s.num_iterations, s.save_every, s.sample_every), (2, 4, 2, 0));
    s
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

/// A femtochat run exported to nanochat's layout and imported again is the same run: bit-equal
/// weights, optimizer state and step, the same tokenizer and settings; and training resumed
/// from the imported run continues as the uninterrupted run does.
#[test]
fn export_then_import_is_identical_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let [whole, crashed, nc, back] =
        ["whole", "crashed", "nanochat", "back"].map(|d| tmp.path().join(d));
    let tok = nanochat::load_tokenizer(&fixture("tokenizer")).unwrap();

    let mut t = Trainer::new(settings(), &whole, "whole").unwrap();
    t.train(&mut Counter { next: 0, fail_at: None }, None, None, |_, _, _| {}).unwrap();
    // Crash during step 3, after the step-2 checkpoint.
    let mut t = Trainer::new(settings(), &crashed, "crashed").unwrap();
    tok.save(&crashed.join("tokenizer")).unwrap();
    let err = t.train(&mut Counter { next: 0, fail_at: Some(5) }, None, None, |_, _, _| {});
    assert!(err.is_err());

    let dir = export(&crashed, &nc, Source::Base, None, true).unwrap();
    assert_eq!(dir, nc.join("base_checkpoints/d3"));
    for f in ["model_000002.pt", "meta_000002.json", "optim_000002_rank0.pt"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert!(
        nc.join("tokenizer/tokenizer.pkl").is_file()
            && nc.join("tokenizer/token_bytes.pt").is_file()
    );
    let done = import(&nc, &back, None, None, None, true).unwrap();
    assert_eq!((done.located.tag.as_str(), done.located.step), ("d3", 2));

    let (g0, tok0, s0, (st0, b0), step0) = read_run(&crashed).unwrap();
    let (g1, tok1, s1, (st1, b1), step1) = read_run(&back).unwrap();
    assert_eq!((step0, st0, &s0), (step1, st1, &s1));
    assert_eq!(g0.config(), g1.config());
    for (name, p) in g0.params().iter() {
        let q = g1.params().get(name).unwrap().to_vec();
        assert!(p.to_vec().iter().zip(&q).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}");
    }
    assert_eq!(b0.len(), b1.len());
    for (k, v) in &b0 {
        assert!(v.iter().zip(&b1[k]).all(|(a, b)| a.to_bits() == b.to_bits()), "{k}");
    }
    assert_eq!((tok0.parts(), tok0.pattern()), (tok1.parts(), tok1.pattern()));
    let record: Value =
        serde_json::from_slice(&std::fs::read(back.join("imported.json")).unwrap()).unwrap();
    assert_eq!((record["source"].as_str(), record["step"].as_u64()), (Some("base"), Some(2)));

    // Continue the imported run as `train base --resume` does; the data position is the test's.
    let mut src = Counter { next: 0, fail_at: None };
    let mut resumed = Trainer::resume(&back, &mut src, None).unwrap();
    assert_eq!(resumed.step(), 2);
    src.next = 4;
    resumed.train(&mut src, None, None, |_, _, _| {}).unwrap();
    let (a, b) = (losses(&whole), losses(&back));
    assert_eq!((a.len(), b.len()), (4, 2));
    assert_eq!(a[2..], b[..], "steps 2 and 3 after the round trip");

    // Exporting a second run with another tokenizer into the same directory is refused.
    let other = Tokenizer::train(&["a few words of text"; 4], 300).unwrap();
    other.save(&crashed.join("tokenizer")).unwrap();
    let err = export(&crashed, &nc, Source::Sft, None, false).unwrap_err().to_string();
    assert!(err.contains("different tokenizer"), "{err}");
}

/// nanochat's own checkpoint becomes a run whose settings follow nanochat's derivations (the
/// learning rates from its optimizer groups), and `train base --resume` trains on from it.
#[test]
fn nanochat_fixture_imports_as_a_resumable_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let done = import(&fixture(""), &out, None, None, None, true).unwrap();
    assert!(done.optimizer.starts_with("imported from 1 rank"), "{}", done.optimizer);
    let (gpt, tok, s, (step, _), at) = read_run(&out).unwrap();
    assert_eq!((at, step, tok.vocab_size(), gpt.config().n_kv_head), (30, 30, 607, 1));
    // The meta has no total_batch_size: base_train's auto batch for this model, 2^16 tokens
    // (the recipe is recipe.rs's), in micro-batches of 8 x 128.
    assert_eq!((s.device_batch_size, s.grad_accum_steps, s.tokens_per_step()), (8, 64, 65536));
    let close = |a: f32, b: f32| (a - b).abs() < 1e-6 * b;
    // The learning rates the run trained with, from its optimizer groups.
    assert!(close(s.embedding_lr, 0.3) && close(s.unembedding_lr, 0.008), "{s:?}");
    assert!(close(s.matrix_lr, 0.02) && close(s.scalar_lr, 0.5), "{s:?}");
    // 12 tokens per scaling parameter (blocks + lm_head) over 2^16-token steps.
    let want = (12.0 * gpt.config().scaling_params() as f64) as usize / 65536;
    assert!(want > 30);
    assert_eq!(s.num_iterations, want);
    let state: Value =
        serde_json::from_slice(&std::fs::read(out.join("step_000030/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["source"], BestFitLoader::initial_state());

    // A second import into the same run directory is refused.
    assert!(import(&fixture(""), &out, None, None, None, false).is_err());
    // Without --optimizer the state starts fresh and the lrs come from nanochat's defaults.
    let fresh = tmp.path().join("fresh");
    let done =
        import(&fixture(""), &fresh, Some(Source::Base), Some("d2"), Some(30), false).unwrap();
    assert!(done.optimizer.starts_with("fresh"), "{}", done.optimizer);
    let (_, _, s, (step, bufs), _) = read_run(&fresh).unwrap();
    assert_eq!(step, 0);
    assert!(bufs.values().all(|v| v.iter().all(|&x| x == 0.0)));
    assert!(close(s.matrix_lr, 0.02 * (65536.0f32 / 524288.0).sqrt()), "{s:?}");
}

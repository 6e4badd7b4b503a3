//! RL: the advantages and loss on hand-built rollouts against hand-computed values, the
//! calculator's forced tokens outside the loss, a tiny model learning a toy reward (the sign of
//! the update), and a resumed run equal to an uninterrupted one, bit for bit.
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use femtochat_engine::Ids;
use femtochat_model::GPTConfig;
use femtochat_model::tokenizer::{
    Content, Conversation, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, parse_tiktoken,
};

use super::rollout::{Group, PgRows, advantages, pass_at_k, pg_weights, sampled_mask};
use super::*;
use crate::tasks::{Task, user_assistant};

fn tokenizer() -> Tokenizer {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tokenizer/ranks_2048.tiktoken");
    let text = std::fs::read_to_string(p).unwrap();
    Tokenizer::new(parse_tiktoken(&text).unwrap(), &SPECIAL_TOKENS, SPLIT_PATTERN).unwrap()
}

fn config(vocab: usize) -> GPTConfig {
    GPTConfig {
        sequence_len: 32,
        vocab_size: vocab,
        n_layer: 1,
        n_head: 2,
        n_kv_head: 2,
        n_embd: 32,
        window_pattern: "L".into(),
    }
}

/// A model whose predictions are not uniform (the init's zero lm_head makes them so).
fn perturbed(vocab: usize) -> Gpt {
    let gpt = Gpt::init(config(vocab), 3).unwrap();
    let mut rng = femtochat_model::rng::Rng::new(7);
    for (_, t) in gpt.params().iter() {
        t.with_data_mut(|d| d.iter_mut().for_each(|x| *x += 0.3 * rng.normal())).unwrap();
    }
    gpt
}

#[test]
fn advantages_subtract_the_group_mean() {
    assert_eq!(advantages(&[1.0, 0.0, 0.0, 1.0]), [0.5, -0.5, -0.5, 0.5]);
    assert_eq!(advantages(&[1.0, 0.0, 0.0, 0.0]), [0.75, -0.25, -0.25, -0.25]);
    assert_eq!(advantages(&[1.0, 1.0]), [0.0, 0.0]);
}

#[test]
fn pass_at_k_counts_a_success_among_the_first_k() {
    let o = vec![vec![false, true, false], vec![false, false, false], vec![true, false, true]];
    let p = pass_at_k(&o);
    assert_eq!(p.len(), 3);
    assert!((p[0] - 1.0 / 3.0).abs() < 1e-12 && (p[1] - 2.0 / 3.0).abs() < 1e-12);
    assert!((p[2] - 2.0 / 3.0).abs() < 1e-12);
}

/// The calculator's output tokens are forced, not sampled: mask 0, target -1, weight 0.
#[test]
fn forced_tool_output_is_masked_out() {
    let tok = tokenizer();
    let s = |n: &str| tok.special(n).unwrap();
    let mut generated = tok.encode("So ");
    let n_text = generated.len();
    generated.push(s("<|python_start|>"));
    generated.extend(tok.encode("12+30"));
    generated.push(s("<|python_end|>"));
    let n_sampled = generated.len();
    let forced: Vec<u32> = std::iter::once(s("<|output_start|>"))
        .chain(tok.encode("42"))
        .chain([s("<|output_end|>")])
        .collect();
    generated.extend(&forced);
    let tail = tok.encode(" #### 42");
    generated.extend(&tail);
    let mask = sampled_mask(&tok, &generated).unwrap();
    let mut expected = vec![1u8; n_sampled];
    expected.extend(vec![0u8; forced.len()]);
    expected.extend(vec![1u8; tail.len()]);
    assert_eq!(mask, expected, "{n_text} text tokens");
    // A calculator call on something it refuses forces nothing.
    let mut refused = vec![s("<|python_start|>")];
    refused.extend(tok.encode("import os"));
    refused.push(s("<|python_end|>"));
    refused.extend(tok.encode("ok"));
    assert!(sampled_mask(&tok, &refused).unwrap().iter().all(|&m| m == 1));

    // In the rows: prompt [5, 6] then `generated`; the forced positions are ignored targets.
    let mut seq = vec![5, 6];
    seq.extend(&generated);
    let mut m = vec![0, 0];
    m.extend(&mask);
    let g = Group { seqs: vec![seq.clone()], masks: vec![m], rewards: vec![1.0] };
    let rows = PgRows::new(&g, 0).unwrap();
    for (i, &y) in rows.targets.iter().enumerate() {
        let pos = i + 1; // target i is token i + 1
        let is_forced = pos >= 2 + n_sampled && pos < 2 + n_sampled + forced.len();
        assert_eq!(y < 0, pos < 2 || is_forced, "position {pos}");
        if y >= 0 {
            assert_eq!(y as u32, seq[pos]);
        }
    }
    let w = pg_weights(&rows.targets, rows.t, &[0.5], 1, 1);
    assert!(w.iter().zip(&rows.targets).all(|(&w, &y)| (w == 0.0) == (y < 0)));
}

/// Two questions with mixed rewards, by hand: the padded rows, the weights, and the loss
/// against nanochat's formula evaluated on log-softmaxed logits.
#[test]
fn pg_loss_on_a_hand_built_batch_equals_the_hand_computed_value() {
    // Question A: two samples, rewards 1 and 0 -> advantages +0.5, -0.5.
    let a = Group {
        seqs: vec![vec![10, 11, 20, 21], vec![10, 11, 22]],
        masks: vec![vec![0, 0, 1, 1], vec![0, 0, 1]],
        rewards: vec![1.0, 0.0],
    };
    let rows = PgRows::new(&a, 99).unwrap();
    assert_eq!((rows.rows, rows.t), (2, 3));
    assert_eq!(rows.inputs, [10, 11, 20, 10, 11, 22]);
    assert_eq!(rows.targets, [-1, 20, 21, -1, 22, -1]);
    // 3 learned targets, 1 pass, 2 examples per step: each weight is advantage / 6.
    let w = pg_weights(&rows.targets, rows.t, &advantages(&a.rewards), 1, 2);
    let e = 0.5 / 6.0;
    assert_eq!(w, [0.0, e, e, 0.0, -e, 0.0]);
    // Question B: four samples in two device batches of 2; rewards 1, 0, 0, 0.
    let b = Group {
        seqs: vec![vec![10, 30, 31], vec![10, 32], vec![10, 33, 34], vec![10, 35, 36]],
        masks: vec![vec![0, 1, 1], vec![0, 1], vec![0, 1, 0], vec![0, 1, 1]],
        rewards: vec![1.0, 0.0, 0.0, 0.0],
    };
    let gpt = perturbed(64);
    for (group, passes) in [(&a, 1usize), (&b, 2)] {
        let (loss, grads) = group_loss(&gpt, group, 63, 2, 2).unwrap();
        assert!(grads.is_some());
        // By hand: per pass, -sum(logp * adv) / (valid * passes * examples).
        let adv = advantages(&group.rewards);
        let rows = PgRows::new(group, 63).unwrap();
        let mut expected = 0.0f64;
        for p in 0..passes {
            let (inputs, targets) = rows.slice(2 * p, 2 * p + 2);
            let logits = gpt.forward(&Ids::new(inputs, &[2, rows.t]).unwrap()).unwrap().to_vec();
            let valid = targets.iter().filter(|&&y| y >= 0).count() as f64;
            let mut obj = 0.0;
            for (i, &y) in targets.iter().enumerate() {
                if y < 0 {
                    continue;
                }
                let z = &logits[i * 64..(i + 1) * 64];
                let m = z.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                let logp = z[y as usize] as f64 - lse;
                obj += logp * adv[2 * p + i / rows.t] as f64;
            }
            expected += -obj / (valid * passes as f64 * 2.0);
        }
        assert!((loss - expected).abs() < 1e-5 * expected.abs().max(1e-3), "{loss} vs {expected}");
    }
    // Equal rewards: no signal, no gradient.
    let flat = Group { rewards: vec![1.0, 1.0], ..a.clone() };
    let (loss, grads) = group_loss(&gpt, &flat, 63, 2, 2).unwrap();
    assert_eq!(loss, 0.0);
    assert!(grads.is_none());
}

/// A one-token toy task: the reward is 1 when the reply starts with a lowercase letter.
struct Lowercase;

impl Task for Lowercase {
    fn name(&self) -> &str {
        "lowercase"
    }
    fn len(&self) -> usize {
        4
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        Ok(user_assistant(format!("Say a word ({i})."), Content::Text(String::new())))
    }
    fn evaluate(&self, _i: usize, completion: &str) -> Result<bool> {
        Ok(completion.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
    }
}

fn rewarded(tok: &Tokenizer, t: u32) -> bool {
    tok.decode(&[t]).is_ok_and(|s| s.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
}

/// The policy's probability of a rewarded first token, averaged over the toy prompts.
fn rewarded_mass(gpt: &Gpt, tok: &Tokenizer) -> f64 {
    let v = gpt.config().vocab_size;
    let mut total = 0.0;
    for i in 0..4 {
        let p = prompt_ids(tok, &Lowercase.conversation(i).unwrap()).unwrap();
        let n = p.len();
        let z = gpt.forward(&Ids::new(p, &[1, n]).unwrap()).unwrap().to_vec();
        let z = &z[(n - 1) * v..n * v];
        let m = z.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = z.iter().map(|&x| (x as f64 - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        total += (0..v).filter(|&t| rewarded(tok, t as u32)).map(|t| e[t]).sum::<f64>() / sum;
    }
    total / 4.0
}

fn toy_settings(vocab: usize, steps: usize) -> Settings {
    Settings {
        model: GPTConfig { sequence_len: 64, ..config(vocab) },
        device_batch_size: 4,
        grad_accum_steps: 4,
        num_iterations: steps,
        warmup_steps: 0,
        warmdown_ratio: 0.0,
        final_lr_frac: 0.0,
        unembedding_lr: 0.05,
        embedding_lr: 0.2,
        matrix_lr: 0.02,
        scalar_lr: 0.5,
        weight_decay: 0.0,
        lr_schedule: LrSchedule::Linear,
        lr_scale: 1.0,
        eval_every: 2,
        save_every: 2,
        sample_every: 0,
        seed: 1,
    }
}

fn toy_rl(tok: &Arc<Tokenizer>, examples: usize) -> Rl {
    Rl {
        tok: tok.clone(),
        train: Arc::new(Lowercase),
        val: Some(Arc::new(Lowercase)),
        opts: Options {
            examples_per_step: 2,
            num_samples: 8,
            device_batch_size: 4,
            max_new_tokens: 1,
            sampling: SamplingParams { temperature: 1.0, top_k: None, ..Default::default() },
            eval_examples: 2,
            seed: 5,
        },
        examples,
    }
}

/// Rewarding replies that start with a lowercase letter makes such first tokens more likely.
#[test]
fn rl_moves_the_policy_toward_the_reward() {
    let tok = Arc::new(tokenizer());
    let dir = tempfile::tempdir().unwrap();
    let mut tr = Trainer::new(toy_settings(tok.vocab_size(), 6), dir.path(), "run").unwrap();
    let before = rewarded_mass(&tr.gpt, &tok);
    let mut rl = toy_rl(&tok, 0);
    let mut rewards = Vec::new();
    let summary = rl.run(&mut tr, |_, log| rewards.push(log.reward)).unwrap();
    let after = rewarded_mass(&tr.gpt, &tok);
    assert_eq!(summary.steps, 6);
    assert!(before > 0.05 && before < 0.95, "the toy reward must be neither rare nor certain");
    assert!(after > before + 0.1, "rewarded mass {before:.3} -> {after:.3}; rewards {rewards:?}");
    // Logged: a reward line per step, pass@k at steps 0, 2, 4 and the end.
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().filter(|v| v["reward"].is_f64()).count(), 6);
    let evals: Vec<u64> = lines
        .iter()
        .filter(|v| v["pass@4"].is_f64())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [0, 2, 4, 6]);
    assert_eq!(rl.examples, 12);
}

/// A run resumed from its step-2 checkpoint logs the same metrics and ends on the same
/// weights as the uninterrupted run.
#[test]
fn resumed_rl_run_equals_uninterrupted_run() {
    let tok = Arc::new(tokenizer());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut whole = Trainer::new(toy_settings(tok.vocab_size(), 4), a.path(), "run").unwrap();
    toy_rl(&tok, 0).run(&mut whole, |_, _| {}).unwrap();
    // The interrupted copy: everything up to the step-2 checkpoint (the retention keeps it).
    for e in std::fs::read_dir(a.path()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if p.is_dir() {
            if name == "step_000002" {
                std::fs::create_dir_all(b.path().join(&name)).unwrap();
                for f in std::fs::read_dir(&p).unwrap() {
                    let f = f.unwrap().path();
                    std::fs::copy(&f, b.path().join(&name).join(f.file_name().unwrap())).unwrap();
                }
            }
        } else {
            std::fs::copy(&p, b.path().join(&name)).unwrap();
        }
    }
    std::fs::write(b.path().join("latest.json"), r#"{"step":2,"dir":"step_000002"}"#).unwrap();
    let mut cursor = Cursor(0);
    let mut resumed = Trainer::resume(b.path(), &mut cursor, Some("run")).unwrap();
    assert_eq!((resumed.step(), cursor.0), (2, 4));
    toy_rl(&tok, cursor.0).run(&mut resumed, |_, _| {}).unwrap();
    let metrics = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["dt_ms", "gen_tok_per_s"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect()
    };
    assert_eq!(metrics(a.path()), metrics(b.path()));
    for (n, p) in whole.gpt.params().iter() {
        let q = resumed.gpt.params().get(n).unwrap();
        assert!(p.to_vec().iter().zip(q.to_vec()).all(|(x, y)| x.to_bits() == y.to_bits()), "{n}");
    }
}

/// The policy-gradient loss of the same rollouts on the GPU (lavapipe in CI) matches the CPU's,
/// and so does the gradient of the lm_head.
#[test]
fn pg_loss_on_the_gpu_matches_the_cpu() {
    if let Err(e) = Device::Gpu.ensure_available() {
        assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
        return;
    }
    let g = Group {
        seqs: vec![vec![10, 30, 31], vec![10, 32], vec![10, 33, 34], vec![10, 35, 36]],
        masks: vec![vec![0, 1, 1], vec![0, 1], vec![0, 1, 0], vec![0, 1, 1]],
        rewards: vec![1.0, 0.0, 0.0, 1.0],
    };
    let cpu = perturbed(64);
    let gpu = perturbed(64).to_device(Device::Gpu).unwrap();
    let (lc, gc) = group_loss(&cpu, &g, 63, 2, 1).unwrap();
    let (lg, gg) = group_loss(&gpu, &g, 63, 2, 1).unwrap();
    assert!((lc - lg).abs() < 1e-4 * lc.abs().max(1e-3), "cpu {lc} gpu {lg}");
    let head = |gpt: &Gpt, grads: &Grads| {
        grads.get(gpt.params().get("lm_head.weight").unwrap()).unwrap().try_to_vec().unwrap()
    };
    let (hc, hg) = (head(&cpu, &gc.unwrap()), head(&gpu, &gg.unwrap()));
    let err: f32 = hc.iter().zip(&hg).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
    let norm: f32 = hc.iter().map(|a| a * a).sum::<f32>().sqrt();
    assert!(norm > 0.0 && err / norm < 1e-4, "relative error {}", err / norm);
}

//! Training-level checks of the GPT: initialisation statistics and memorising one batch.
use femtochat::engine::{Device, Ids, MuonAdamW, Reduction};
use femtochat::model::optim::{OptimizerConfig, param_groups};
use femtochat::model::rng::Rng;
use femtochat::model::{GPTConfig, Gpt};

fn tiny() -> GPTConfig {
    GPTConfig {
        sequence_len: 32,
        vocab_size: 61,
        n_layer: 2,
        n_head: 2,
        n_kv_head: 1,
        n_embd: 64,
        window_pattern: "SL".into(),
    }
}

fn std_of(x: &[f32]) -> f32 {
    let m = x.iter().sum::<f32>() / x.len() as f32;
    (x.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / x.len() as f32).sqrt()
}

#[test]
fn init_follows_the_reference_recipe() {
    let a = Gpt::init(tiny(), 3).unwrap();
    let b = Gpt::init(tiny(), 3).unwrap();
    let p = |g: &Gpt, n: &str| g.params().get(n).unwrap().to_vec();
    assert_eq!(p(&a, "transformer.wte.weight"), p(&b, "transformer.wte.weight"), "seeded");
    let wte = std_of(&p(&a, "transformer.wte.weight"));
    assert!((wte - 0.8).abs() < 0.05, "wte std {wte}");
    let s = 3f32.sqrt() / 8.0;
    let cq = p(&a, "transformer.h.0.attn.c_q.weight");
    assert!(cq.iter().all(|&v| v.abs() <= s) && (std_of(&cq) - s / 3f32.sqrt()).abs() < 0.01);
    assert!(p(&a, "transformer.h.1.mlp.c_proj.weight").iter().all(|&v| v == 0.0));
    assert_eq!(p(&a, "resid_lambdas"), vec![1.15, 1.05]);
    assert_eq!(p(&a, "backout_lambda"), vec![0.2]);
    assert_eq!(p(&a, "smear_lambda"), vec![0.0]);
}

/// A tiny model memorises one batch: the loss falls from ~ln(V) to near 0.
#[test]
fn overfits_one_batch() {
    let config = tiny();
    let gpt = Gpt::init(config.clone(), 0).unwrap();
    let (b, t) = (2, 32);
    let mut rng = Rng::new(1);
    let tokens: Vec<u32> =
        (0..b * (t + 1)).map(|_| (rng.next_u64() % config.vocab_size as u64) as u32).collect();
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for row in tokens.chunks_exact(t + 1) {
        inputs.extend_from_slice(&row[..t]);
        targets.extend(row[1..].iter().map(|&x| x as i32));
    }
    let idx = Ids::new(inputs, &[b, t]).unwrap();
    let o = OptimizerConfig { matrix_lr: 0.02, ..OptimizerConfig::default() };
    let mut opt = MuonAdamW::new(param_groups(&config, &o), gpt.params()).unwrap();
    let mut first = None;
    let mut last = f32::NAN;
    for _ in 0..40 {
        let loss = gpt.loss(&idx, &targets, Reduction::Mean).unwrap();
        last = loss.item().unwrap();
        first.get_or_insert(last);
        let grads = loss.backward().unwrap();
        opt.step(gpt.params(), &grads).unwrap();
    }
    let first = first.unwrap();
    assert!((first - (config.vocab_size as f32).ln()).abs() < 0.5, "initial loss {first}");
    assert!(last < 0.05, "loss after 40 steps: {last} (started at {first})");
}

/// Greedy generation with the KV cache picks, at every step, the argmax of a full forward over
/// everything so far; stop tokens and cancellation end it.
#[test]
fn cached_greedy_generation_matches_full_forward() {
    use femtochat::model::generate::{Finish, generate};
    use femtochat::model::sampler::{Sampler, SamplingParams, argmax};
    let gpt = Gpt::init(tiny(), 5).unwrap();
    let greedy =
        || Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() }, 0).unwrap();
    let prompt = vec![3u32, 14, 15, 9, 26];
    let (out, finish) = generate(&gpt, &prompt, &mut greedy(), 8, &[], |_| true).unwrap();
    assert_eq!((out.len(), finish), (8, Finish::Length));
    let mut seq = prompt.clone();
    for &tok in &out {
        let logits =
            gpt.forward(&Ids::new(seq.clone(), &[1, seq.len()]).unwrap()).unwrap().to_vec();
        let v = tiny().vocab_size;
        assert_eq!(argmax(&logits[(seq.len() - 1) * v..]), tok);
        seq.push(tok);
    }
    let (stopped, finish) = generate(&gpt, &prompt, &mut greedy(), 8, &[out[2]], |_| true).unwrap();
    assert_eq!(finish, Finish::Stop);
    assert_eq!(stopped.last(), Some(&out[2]));
    let (cut, finish) = generate(&gpt, &prompt, &mut greedy(), 8, &[], |_| false).unwrap();
    assert_eq!((cut.len(), finish), (1, Finish::Cancelled));
}

/// The loss in row chunks (what keeps a d12 batch's 4 GiB of logits under a GPU's largest
/// buffer) equals the loss in one piece: values, per-token losses and every gradient, with
/// ignored targets and a ragged last chunk.
#[test]
fn chunked_loss_equals_one_shot_loss() {
    chunked_loss_on(Device::Cpu);
}

/// The same on the GPU (lavapipe in CI).
#[test]
fn chunked_loss_equals_one_shot_loss_on_gpu() {
    if let Err(e) = Device::Gpu.ensure_available() {
        assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
        return;
    }
    chunked_loss_on(Device::Gpu);
}

fn chunked_loss_on(device: Device) {
    let config = tiny();
    let gpt = Gpt::init(config.clone(), 5).unwrap().to_device(device).unwrap();
    let (b, t) = (3, 7);
    let mut rng = Rng::new(9);
    let mut draw = || (rng.next_u64() % config.vocab_size as u64) as u32;
    let idx = Ids::new((0..b * t).map(|_| draw()).collect(), &[b, t]).unwrap();
    let mut targets: Vec<i32> = (0..b * t).map(|_| draw() as i32).collect();
    (targets[2], targets[9], targets[20]) = (-1, -1, -1);
    let close = |what: &str, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
        }
    };
    let whole = gpt.loss(&idx, &targets, Reduction::Mean).unwrap();
    let whole_grads = whole.backward().unwrap();
    let per_token = gpt.loss(&idx, &targets, Reduction::None).unwrap().to_vec();
    for chunk in [1, 4, 8, 20] {
        let tag = format!("chunks of {chunk} rows");
        let loss = gpt.loss_in_chunks(&idx, &targets, Reduction::Mean, chunk).unwrap();
        close(&tag, &[loss.item().unwrap()], &[whole.item().unwrap()]);
        let grads = loss.backward().unwrap();
        for (name, p) in gpt.params().iter() {
            let (g, w) = (grads.get(p).unwrap().to_vec(), whole_grads.get(p).unwrap().to_vec());
            close(&format!("{tag}: d {name}"), &g, &w);
        }
        let losses = gpt.loss_in_chunks(&idx, &targets, Reduction::None, chunk).unwrap();
        close(&format!("{tag}: per-token"), &losses.to_vec(), &per_token);
    }
    // Every target ignored: NaN, as the one-shot mean (and PyTorch).
    let none = vec![-1; b * t];
    assert!(gpt.loss_in_chunks(&idx, &none, Reduction::Mean, 4).unwrap().item().unwrap().is_nan());
}

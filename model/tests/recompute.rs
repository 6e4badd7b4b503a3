//! Activation checkpointing changes memory, never numbers: on the CPU every gradient of the
//! model fixtures, and the parameters after training steps, are bit-identical with and without
//! `--recompute`.
use std::path::PathBuf;

use femtochat_engine::{Ids, MuonAdamW, Reduction};
use femtochat_model::optim::{OptimizerConfig, param_groups};
use femtochat_model::parity::Fixture;
use femtochat_model::rng::Rng;
use femtochat_model::{GPTConfig, Gpt, Recompute};

const MODES: [Recompute; 5] = [
    Recompute::Blocks,
    Recompute::Every(2),
    Recompute::Every(3),
    Recompute::All,
    Recompute::Sublayers,
];
/// `All` and `Sublayers` also chunk the lm head (`Gpt::loss_chunk_rows`), which sums the loss
/// per chunk: they are compared with `None` on the same chunks.
const SAME_CHUNKS: [Recompute; 3] = [Recompute::Blocks, Recompute::Every(2), Recompute::Every(3)];

fn fixtures() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/model");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures in {}", dir.display());
    v
}

/// (loss bits, every gradient's bits by parameter name) of one forward/backward.
fn grads_of(gpt: &Gpt, idx: &Ids, targets: &[i32], chunk_rows: usize) -> (u32, Vec<Vec<u32>>) {
    let loss = gpt.loss_in_chunks(idx, targets, Reduction::Mean, chunk_rows).unwrap();
    let grads = loss.backward().unwrap();
    let g = gpt
        .params()
        .iter()
        .map(|(_, p)| {
            grads
                .get(p)
                .map(|g| g.to_vec())
                .unwrap_or_default()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect();
    (loss.item().unwrap().to_bits(), g)
}

#[test]
fn fixture_gradients_are_bit_identical_under_every_recompute_mode() {
    for path in fixtures() {
        let fx = Fixture::load(&path).unwrap();
        let mut gpt = fx.model().unwrap();
        let (b, t) = (fx.json["batch"].as_u64().unwrap(), fx.json["T"].as_u64().unwrap());
        let (b, t) = (b as usize, t as usize);
        let v = fx.config.vocab_size as u32;
        let mut rng = Rng::new(7);
        let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % v as u64) as u32).collect();
        let idx = Ids::new(ids.clone(), &[b, t]).unwrap();
        let mut targets: Vec<i32> = ids.iter().rev().map(|&x| x as i32).collect();
        targets[0] = -1; // an ignored target too
        // Whole-batch loss, and the loss in chunks of 3 rows (the recomputed head per chunk).
        for chunk in [usize::MAX, 3] {
            let want = grads_of(&gpt, &idx, &targets, chunk);
            assert!(want.1.iter().any(|g| g.iter().any(|&x| x != 0)), "{}", fx.name);
            for mode in MODES {
                gpt.set_recompute(mode);
                let got = grads_of(&gpt, &idx, &targets, chunk);
                assert!(got == want, "{} --recompute {mode} (chunk {chunk}) differs", fx.name);
                gpt.set_recompute(Recompute::None);
            }
        }
    }
}

#[test]
fn training_steps_are_bit_identical_with_recompute() {
    let config = GPTConfig::from_depth(3, 32, 16, 16, 97, "SL").unwrap();
    // `chunks_of`: train with the lm-head chunks `loss` uses under that mode.
    let run = |mode: Recompute, chunks_of: Recompute| -> Vec<Vec<u32>> {
        let mut gpt = Gpt::init(config.clone(), 3).unwrap();
        gpt.set_recompute(chunks_of);
        let rows = gpt.loss_chunk_rows(32);
        gpt.set_recompute(mode);
        let mut opt =
            MuonAdamW::new(param_groups(&config, &OptimizerConfig::default()), gpt.params())
                .unwrap();
        let mut rng = Rng::new(11);
        for _ in 0..3 {
            let ids: Vec<u32> = (0..=2 * 16).map(|_| (rng.next_u64() % 97) as u32).collect();
            let idx = Ids::new(ids[..32].to_vec(), &[2, 16]).unwrap();
            let targets: Vec<i32> = ids[1..].iter().map(|&x| x as i32).collect();
            let loss = gpt.loss_in_chunks(&idx, &targets, Reduction::Mean, rows).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(gpt.params(), &grads).unwrap();
        }
        gpt.params().iter().map(|(_, p)| p.to_vec().iter().map(|x| x.to_bits()).collect()).collect()
    };
    let want = run(Recompute::None, Recompute::None);
    for mode in SAME_CHUNKS {
        assert!(run(mode, mode) == want, "--recompute {mode} trained to different parameters");
    }
    for head in [Recompute::All, Recompute::Sublayers] {
        let want = run(Recompute::None, head);
        assert!(run(head, head) == want, "--recompute {head} trained differently");
    }
}

//! The fast decode step (`Gpt::decode_step`) against the engine path (`forward_cached`): logits
//! on the reference fixtures, greedy generations token for token, batches of rows at different
//! positions, and bad input. (No allocation per step: tests/decode_alloc.rs.)
use std::path::PathBuf;

use femtochat_engine::Ids;
use femtochat_model::parity::{Fixture, rel_err};
use femtochat_model::{Decoder, Gpt, KvCache};

fn fixture(name: &str) -> Fixture {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/model").join(name);
    Fixture::load(&p.with_extension("safetensors")).unwrap()
}

/// A prompt of `n` tokens below `vocab`.
fn prompt(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729 + 3) % vocab) as u32).collect()
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Prefill `prompts` one by one into a cache of `cap` positions (rows at different positions);
/// returns the cache and each row's last logits.
fn prefilled(gpt: &Gpt, prompts: &[Vec<u32>], cap: usize) -> (KvCache, Vec<Vec<f32>>) {
    let mut cache = KvCache::new(gpt.config(), cap);
    let mut last = Vec::new();
    for p in prompts {
        let mut one = KvCache::with_rows(gpt.config(), 1, cap);
        let ids = Ids::new(p.clone(), &[1, p.len()]).unwrap();
        last.push(gpt.forward_cached_last(&ids, &mut one).unwrap().to_vec());
        cache.absorb(one).unwrap();
    }
    (cache, last)
}

/// Greedy decoding of several rows together, each step through `decode_step` and through
/// `forward_cached`: same logits within rounding, same tokens, on every fixture model (GQA,
/// sliding windows, odd shapes, value embeddings on alternate layers).
#[test]
fn greedy_batches_equal_the_engine_path() {
    for name in ["tiny_mha", "gqa_window", "odd_shapes"] {
        let gpt = fixture(name).model().unwrap();
        let v = gpt.config().vocab_size;
        let prompts: Vec<Vec<u32>> = [5, 1, 17].iter().map(|&n| prompt(n, v, n)).collect();
        let cap = 17 + 40;
        let (mut fast, last) = prefilled(&gpt, &prompts, cap);
        let (mut slow, _) = prefilled(&gpt, &prompts, cap);
        let mut next: Vec<u32> = last.iter().map(|l| argmax(l)).collect();
        let mut dec = Decoder::new();
        for step in 0..40 {
            let got = gpt.decode_step(&next, &mut fast, &mut dec).unwrap().to_vec();
            let ids = Ids::new(next.clone(), &[next.len(), 1]).unwrap();
            let want = gpt.forward_cached(&ids, &mut slow).unwrap().to_vec();
            let e = rel_err(&got, &want);
            assert!(e < 1e-5, "{name} step {step}: logits rel err {e}");
            let (a, b): (Vec<u32>, Vec<u32>) = (
                got.chunks_exact(v).map(argmax).collect(),
                want.chunks_exact(v).map(argmax).collect(),
            );
            assert_eq!(a, b, "{name} step {step}");
            next = a;
        }
        for r in 0..prompts.len() {
            assert_eq!(fast.position(r), slow.position(r));
        }
    }
}

/// The reference's own KV-cache decode logits (written by nanochat), through `decode_step`.
#[test]
fn decode_step_matches_nanochat_fixture_logits() {
    for name in ["tiny_mha", "gqa_window", "odd_shapes"] {
        let fx = fixture(name);
        let Ok(tokens) = fx.i64("decode.tokens") else { continue };
        let tokens: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        let gpt = fx.model().unwrap();
        let p = fx.json["prefill"].as_u64().unwrap() as usize;
        let d = fx.json["decode"].as_u64().unwrap() as usize;
        let mut cache = KvCache::with_rows(gpt.config(), 1, p + d);
        let ids = Ids::new(tokens[..p].to_vec(), &[1, p]).unwrap();
        let mut got = gpt.forward_cached_last(&ids, &mut cache).unwrap().to_vec();
        let mut dec = Decoder::new();
        for k in 1..d {
            got.extend(gpt.decode_step(&[tokens[p + k - 1]], &mut cache, &mut dec).unwrap());
        }
        let e = rel_err(&got, fx.f32("decode.logits").unwrap());
        assert!(e < 1e-5, "{name}: rel err {e} against nanochat's decode logits");
    }
}

/// Bad input is an error, not a panic: wrong row count, out-of-range token, full cache.
#[test]
fn bad_input_is_an_error() {
    let gpt = fixture("tiny_mha").model().unwrap();
    let v = gpt.config().vocab_size as u32;
    let mut cache = KvCache::with_rows(gpt.config(), 2, 2);
    let mut dec = Decoder::new();
    assert!(gpt.decode_step(&[1], &mut cache, &mut dec).is_err());
    assert!(gpt.decode_step(&[1, v], &mut cache, &mut dec).is_err());
    gpt.decode_step(&[1, 2], &mut cache, &mut dec).unwrap();
    gpt.decode_step(&[1, 2], &mut cache, &mut dec).unwrap();
    assert!(gpt.decode_step(&[1, 2], &mut cache, &mut dec).is_err());
}

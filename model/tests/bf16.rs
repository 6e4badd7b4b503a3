//! bf16 inference weights and the decode-kernel forward (`Gpt::extend`) they run on.
//!
//! - `extend` on f32 weights equals the engine's `forward_cached` (prefill of one or several
//!   rows, long prompts in chunks, then decode), so the path bf16 models take is right before
//!   bf16 enters;
//! - a bf16 model against nanochat's own f32 KV-cache logits: relative L2 within 2e-2 (bf16 keeps
//!   8 significant bits, a relative rounding of at most 2^-9 per weight; through a few layers
//!   and a softcapped head that is about 1e-2 in logits; measured values are printed);
//! - a bf16 checkpoint round trip: BF16 tensors in the file, the same logits after loading;
//! - the engine paths (training forward, GPU) refuse a bf16 model with an error saying why.
use std::path::PathBuf;

use femtochat_engine::{Device, Ids};
use femtochat_model::checkpoint::{load_model, save_model};
use femtochat_model::parity::{Fixture, rel_err};
use femtochat_model::{Decoder, Gpt, KvCache, WeightDtype};

fn fixture(name: &str) -> Fixture {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/model").join(name);
    Fixture::load(&p.with_extension("safetensors")).unwrap()
}

const MODELS: [&str; 3] = ["tiny_mha", "gqa_window", "odd_shapes"];

/// A prompt of `n` tokens below `vocab`.
fn prompt(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729 + 3) % vocab) as u32).collect()
}

/// Rows at different positions: prompts prefilled one by one through the engine.
fn cache_with(gpt: &Gpt, prompts: &[Vec<u32>], cap: usize) -> KvCache {
    let mut cache = KvCache::new(gpt.config(), cap);
    for p in prompts {
        let mut one = KvCache::with_rows(gpt.config(), 1, cap);
        gpt.forward_cached(&Ids::new(p.clone(), &[1, p.len()]).unwrap(), &mut one).unwrap();
        cache.absorb(one).unwrap();
    }
    cache
}

#[test]
fn extend_equals_the_engine_forward_on_f32_weights() {
    for name in MODELS {
        let gpt = fixture(name).model().unwrap();
        let v = gpt.config().vocab_size;
        // One row, a prompt longer than one prefill chunk (256 slots) where the model allows.
        let n = 300.min(gpt.max_positions() - 8);
        let p = prompt(n, v, 1);
        let ids = Ids::new(p.clone(), &[1, n]).unwrap();
        let (mut a, mut b) = (
            KvCache::with_rows(gpt.config(), 1, n + 8),
            KvCache::with_rows(gpt.config(), 1, n + 8),
        );
        let want = gpt.forward_cached(&ids, &mut a).unwrap().to_vec();
        let got = gpt.extend(&ids, &mut b, false).unwrap().to_vec();
        let e = rel_err(&got, &want);
        assert!(e < 1e-5, "{name}: prefill of {n}: rel err {e}");
        assert_eq!(a.position(0), b.position(0));
        // Then a few tokens more on the filled caches, last logits only.
        let more = Ids::new(prompt(5, v, 2), &[1, 5]).unwrap();
        let want = gpt.forward_cached_last(&more, &mut a).unwrap().to_vec();
        let got = gpt.extend(&more, &mut b, true).unwrap().to_vec();
        let e = rel_err(&got, &want);
        assert!(e < 1e-5, "{name}: continuation: rel err {e}");

        // Three rows at different positions, three new tokens each.
        let prompts: Vec<Vec<u32>> = [4, 1, 9].iter().map(|&n| prompt(n, v, n)).collect();
        let (mut a, mut b) = (cache_with(&gpt, &prompts, 16), cache_with(&gpt, &prompts, 16));
        let ids = Ids::new(prompt(9, v, 7), &[3, 3]).unwrap();
        let want = gpt.forward_cached(&ids, &mut a).unwrap();
        let got = gpt.extend(&ids, &mut b, false).unwrap();
        assert_eq!(got.shape(), want.shape());
        let e = rel_err(&got.to_vec(), &want.to_vec());
        assert!(e < 1e-5, "{name}: 3 rows: rel err {e}");
        for r in 0..3 {
            assert_eq!(a.position(r), b.position(r));
        }
    }
}

/// A bf16 model through prefill and decode against the logits nanochat's own KV-cache decode
/// wrote in f32.
#[test]
fn bf16_logits_stay_close_to_nanochat_f32() {
    for name in MODELS {
        let fx = fixture(name);
        let Ok(tokens) = fx.i64("decode.tokens") else { continue };
        let tokens: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        let f32_model = fx.model().unwrap();
        let gpt = f32_model.with_weight_dtype(WeightDtype::Bf16).unwrap();
        assert_eq!(gpt.weight_dtype(), WeightDtype::Bf16);
        assert_eq!(gpt.num_params(), f32_model.num_params());
        let (p, d) = (
            fx.json["prefill"].as_u64().unwrap() as usize,
            fx.json["decode"].as_u64().unwrap() as usize,
        );
        let mut cache = KvCache::with_rows(gpt.config(), 1, p + d);
        let ids = Ids::new(tokens[..p].to_vec(), &[1, p]).unwrap();
        let mut got = gpt.forward_cached_last(&ids, &mut cache).unwrap().to_vec();
        let mut dec = Decoder::new();
        for k in 1..d {
            got.extend(gpt.decode_step(&[tokens[p + k - 1]], &mut cache, &mut dec).unwrap());
        }
        let e = rel_err(&got, fx.f32("decode.logits").unwrap());
        println!("{name}: bf16 weights vs nanochat f32 logits: relative L2 {e:.2e}");
        assert!(e < 2e-2, "{name}: rel err {e}");
        assert!(e > 1e-6, "{name}: bf16 rounding should show ({e})");
        // The matrices take half the bytes; the small parameters stay f32.
        let (full, half) = (f32_model.weight_bytes(), gpt.weight_bytes());
        assert!(half * 2 > full && (half as f64) < 0.52 * full as f64, "{half} vs {full}");
    }
}

#[test]
fn bf16_checkpoints_round_trip() {
    let gpt = fixture("gqa_window").model().unwrap().with_weight_dtype(WeightDtype::Bf16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    save_model(&path, &gpt, &serde_json::json!({})).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dtype = |n: &str| st.tensor(n).unwrap().dtype();
    assert_eq!(dtype("lm_head.weight"), safetensors::Dtype::BF16);
    assert_eq!(dtype("transformer.h.0.mlp.c_fc.weight"), safetensors::Dtype::BF16);
    assert_eq!(dtype("resid_lambdas"), safetensors::Dtype::F32);

    // Loading widens (exactly) to f32 and says what the file stored; back to bf16 it is the
    // same model bit for bit.
    let (wide, meta) = load_model(&path).unwrap();
    assert_eq!(meta.stored_dtype, "BF16");
    assert_eq!(wide.weight_dtype(), WeightDtype::F32);
    let again = wide.with_weight_dtype(WeightDtype::Bf16).unwrap();
    let v = gpt.config().vocab_size;
    let ids = Ids::new(prompt(12, v, 3), &[1, 12]).unwrap();
    let run = |g: &Gpt| {
        let mut c = KvCache::with_rows(g.config(), 1, 16);
        g.forward_cached(&ids, &mut c).unwrap().to_vec()
    };
    let bits = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(bits(run(&gpt)), bits(run(&again)));
    // The widened model on the engine path agrees with the bf16 one to float rounding.
    let e = rel_err(&run(&wide), &run(&gpt));
    assert!(e < 1e-5, "widened f32 on the engine vs bf16: {e}");
    // An f32 checkpoint says F32.
    save_model(&path, &wide, &serde_json::json!({})).unwrap();
    assert_eq!(load_model(&path).unwrap().1.stored_dtype, "F32");
}

#[test]
fn engine_paths_refuse_a_bf16_model() {
    let gpt = fixture("tiny_mha").model().unwrap().with_weight_dtype(WeightDtype::Bf16).unwrap();
    let ids = Ids::new(vec![1, 2, 3], &[1, 3]).unwrap();
    let err = gpt.forward(&ids).unwrap_err().to_string();
    assert!(err.contains("bf16"), "{err}");
    let err = gpt.to_device(Device::Gpu).unwrap_err().to_string();
    assert!(err.contains("bf16"), "{err}");
    // A clone keeps its weights (they live in the shared plan).
    let clone = gpt.clone();
    let mut c = KvCache::with_rows(clone.config(), 1, 8);
    assert_eq!(clone.forward_cached_last(&ids, &mut c).unwrap().shape(), &[1, 512]);
    // Bad input is an error, as on the f32 path.
    let mut c = KvCache::with_rows(gpt.config(), 1, 2);
    assert!(gpt.forward_cached(&ids, &mut c).is_err(), "3 tokens into a 2-position cache");
    let bad = Ids::new(vec![1, 600], &[1, 2]).unwrap();
    let mut c = KvCache::with_rows(gpt.config(), 1, 8);
    assert!(gpt.forward_cached(&bad, &mut c).is_err(), "token past the vocabulary");
    assert!("fp16".parse::<WeightDtype>().is_err());
}

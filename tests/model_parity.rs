//! The GPT against the PyTorch nanochat fixtures (copied into tests/fixtures/model/): logits,
//! loss, every parameter gradient, and KV-cache decode logits vs the full forward.
use std::collections::HashMap;
use std::path::Path;

use femtochat::engine::{Ids, ParamStore, Reduction, Tensor};
use femtochat::model::{GPTConfig, Gpt, KvCache};
use safetensors::SafeTensors;

struct Case {
    name: &'static str,
    json: serde_json::Value,
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    i64s: HashMap<String, Vec<i64>>,
}

fn load(name: &'static str) -> Case {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model");
    let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (mut f32s, mut i64s) = (HashMap::new(), HashMap::new());
    for (n, v) in st.tensors() {
        match v.dtype() {
            safetensors::Dtype::F32 => {
                let d = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()));
                f32s.insert(n, (v.shape().to_vec(), d.collect()));
            }
            safetensors::Dtype::I64 => {
                let d = v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()));
                i64s.insert(n, d.collect());
            }
            other => panic!("{name}: unexpected dtype {other:?} for {n}"),
        }
    }
    let json =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    Case { name, json, f32s, i64s }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn model(case: &Case) -> (Gpt, Vec<(String, Tensor)>) {
    let config: GPTConfig = serde_json::from_value(case.json["config"].clone()).unwrap();
    let mut params = ParamStore::new();
    let mut list = Vec::new();
    for (n, (shape, data)) in &case.f32s {
        if let Some(name) = n.strip_prefix("param.") {
            let t = Tensor::param(data.clone(), shape).unwrap();
            params.insert(name, t.clone());
            list.push((name.to_string(), t));
        }
    }
    // The config's derived windows must be the reference's.
    let windows: Vec<usize> = case.json["window_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w[0].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(config.window_sizes(), windows, "{}: window sizes", case.name);
    assert_eq!(
        config.padded_vocab_size(),
        case.json["padded_vocab_size"].as_u64().unwrap() as usize
    );
    (Gpt::from_params(config, params).unwrap(), list)
}

fn check_forward_backward(name: &'static str) {
    let case = load(name);
    let (gpt, params) = model(&case);
    let (b, t) =
        (case.json["batch"].as_u64().unwrap() as usize, case.json["T"].as_u64().unwrap() as usize);
    let idx = Ids::from_i64(&case.i64s["input.idx"], &[b, t]).unwrap();
    let targets: Vec<i32> = case.i64s["input.targets"].iter().map(|&x| x as i32).collect();

    let logits = gpt.forward(&idx).unwrap();
    let e = rel_err(&logits.to_vec(), &case.f32s["output.logits"].1);
    assert!(e < 1e-5, "{name}: logits rel err {e}");

    let loss = gpt.loss(&idx, &targets, Reduction::Mean).unwrap();
    let want = case.f32s["output.loss"].1[0];
    let got = loss.item().unwrap();
    assert!(((got - want) / want).abs() < 1e-5, "{name}: loss {got} vs {want}");

    let grads = loss.backward().unwrap();
    for (pname, t) in &params {
        let got = grads.get(t).map(Tensor::to_vec).unwrap_or_else(|| vec![0.0; t.numel()]);
        let want = &case.f32s[&format!("grad.{pname}")].1;
        let e = rel_err(&got, want);
        // backout_lambda's true gradient is ~0 where the backout layer is the last one (RMSNorm
        // is scale invariant), so its relative error is noise: accept a tiny absolute error.
        let norm = want.iter().map(|&w| (w as f64).powi(2)).sum::<f64>().sqrt();
        assert!(e < 1e-4 || e * norm < 1e-8, "{name}: grad {pname} rel err {e:.3e}");
    }
}

/// Prefill P tokens, then decode one at a time: row k of `decode.logits` predicts token P+k.
fn check_decode(name: &'static str) {
    let case = load(name);
    let (gpt, _) = model(&case);
    let tokens: Vec<u32> = case.i64s["decode.tokens"].iter().map(|&x| x as u32).collect();
    let p = case.json["prefill"].as_u64().unwrap() as usize;
    let d = case.json["decode"].as_u64().unwrap() as usize;
    let v = gpt.config().vocab_size;
    let (want, want_full) = (&case.f32s["decode.logits"].1, &case.f32s["decode.full_logits"].1);

    let mut cache = KvCache::with_rows(gpt.config(), 1, p + d);
    let pre = gpt.forward_cached(&Ids::new(tokens[..p].to_vec(), &[1, p]).unwrap(), &mut cache);
    let pre = pre.unwrap().to_vec();
    let mut got = pre[(p - 1) * v..].to_vec();
    for k in 1..d {
        let step = Ids::new(vec![tokens[p + k - 1]], &[1, 1]).unwrap();
        got.extend(gpt.forward_cached(&step, &mut cache).unwrap().to_vec());
    }
    let e = rel_err(&got, want);
    assert!(e < 1e-5, "{name}: decode logits rel err {e}");

    let full = gpt.forward(&Ids::new(tokens[..p + d - 1].to_vec(), &[1, p + d - 1]).unwrap());
    let full = full.unwrap().to_vec();
    let e = rel_err(&full[(p - 1) * v..], want_full);
    assert!(e < 1e-5, "{name}: full-forward logits rel err {e}");
}

/// Rows at different positions decode together (continuous batching: each request prefills
/// in its own cache, then joins the batch) and match decoding each alone.
#[test]
fn batched_decode_rows_at_different_positions() {
    let case = load("gqa_window");
    let (gpt, _) = model(&case);
    let tokens: Vec<u32> = case.i64s["decode.tokens"].iter().map(|&x| x as u32).collect();
    let prefill = |p: usize| {
        let mut c = KvCache::with_rows(gpt.config(), 1, 16);
        gpt.forward_cached(&Ids::new(tokens[..p].to_vec(), &[1, p]).unwrap(), &mut c).unwrap();
        c
    };
    let (p1, p2) = (5, 9);
    let mut solo = Vec::new();
    for p in [p1, p2] {
        let mut c = prefill(p);
        let step = Ids::new(vec![tokens[p]], &[1, 1]).unwrap();
        solo.extend(gpt.forward_cached(&step, &mut c).unwrap().to_vec());
    }
    let mut batch = prefill(p1);
    batch.absorb(prefill(p2)).unwrap();
    assert_eq!((batch.position(0), batch.position(1)), (p1, p2));
    let step = Ids::new(vec![tokens[p1], tokens[p2]], &[2, 1]).unwrap();
    let got = gpt.forward_cached(&step, &mut batch).unwrap().to_vec();
    let e = rel_err(&got, &solo);
    assert!(e < 1e-6, "batched vs solo decode rel err {e}");
    assert_eq!((batch.position(0), batch.position(1)), (p1 + 1, p2 + 1));

    // A finished row leaves; the other keeps decoding from its own position.
    let row0 = batch.take_row(0).unwrap();
    assert_eq!((row0.rows(), batch.rows(), batch.position(0)), (1, 1, p2 + 1));
    // A full cache is an error, not a panic.
    let long = Ids::new(vec![tokens[0]; 16], &[1, 16]).unwrap();
    assert!(gpt.forward_cached(&long, &mut batch).is_err());
}

#[test]
fn tiny_mha_forward_backward() {
    check_forward_backward("tiny_mha");
}

#[test]
fn gqa_window_forward_backward() {
    check_forward_backward("gqa_window");
}

#[test]
fn odd_shapes_forward_backward() {
    check_forward_backward("odd_shapes");
}

#[test]
fn tiny_mha_decode() {
    check_decode("tiny_mha");
}

#[test]
fn gqa_window_decode() {
    check_decode("gqa_window");
}

#[test]
fn odd_shapes_decode() {
    check_decode("odd_shapes");
}

/// One MuonAdamW step with setup_optimizer's defaults from param.* with grad.* gives step1.*,
/// and our groups are the reference's (same members, hyper-parameters).
fn check_step1(name: &'static str) {
    use femtochat::engine::{GroupKind, MuonAdamW};
    use femtochat::model::optim::{OptimizerConfig, param_groups};
    let case = load(name);
    let (gpt, _) = model(&case);
    let groups = param_groups(gpt.config(), &OptimizerConfig::default());
    let mut want_groups: Vec<(Vec<String>, f64)> = case.json["optimizer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let mut names: Vec<String> = g["params"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().into())
                .collect();
            names.sort();
            (names, g["lr"].as_f64().unwrap())
        })
        .collect();
    let mut got_groups: Vec<(Vec<String>, f64)> = groups
        .iter()
        .map(|g| {
            let mut names = g.params.clone();
            names.sort();
            (names, g.lr as f64)
        })
        .collect();
    want_groups.sort_by(|a, b| a.0.cmp(&b.0));
    got_groups.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got_groups.len(), want_groups.len(), "{name}: group count");
    for (g, w) in got_groups.iter().zip(&want_groups) {
        assert_eq!(g.0, w.0, "{name}: group members");
        assert!((g.1 - w.1).abs() < 1e-6 * w.1.abs().max(1.0), "{name}: lr {} vs {}", g.1, w.1);
    }
    assert!(groups.iter().any(|g| matches!(g.kind, GroupKind::Muon { .. })));

    let mut opt = MuonAdamW::new(groups, gpt.params()).unwrap();
    opt.step_with(gpt.params(), |_, n| case.f32s.get(&format!("grad.{n}")).map(|g| g.1.clone()))
        .unwrap();
    let mut worst = (0.0f64, String::new());
    for (pname, t) in gpt.params().iter() {
        let want = &case.f32s[&format!("step1.{pname}")].1;
        let e = rel_err(&t.to_vec(), want);
        if e > worst.0 {
            worst = (e, pname.to_string());
        }
        assert!(e < 1e-4, "{name}: step1 {pname} rel err {e:.3e}");
    }
    eprintln!("{name}: worst step1 rel err {:.2e} ({})", worst.0, worst.1);
}

#[test]
fn tiny_mha_optimizer_step() {
    check_step1("tiny_mha");
}

#[test]
fn gqa_window_optimizer_step() {
    check_step1("gqa_window");
}

#[test]
fn odd_shapes_optimizer_step() {
    check_step1("odd_shapes");
}

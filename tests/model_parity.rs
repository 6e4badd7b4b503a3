//! The GPT and MuonAdamW against the PyTorch nanochat fixtures (copied into
//! tests/fixtures/model/): logits, loss, every gradient, one optimizer step, KV-cache decode.
use std::path::{Path, PathBuf};

use femtochat::engine::Ids;
use femtochat::model::KvCache;
use femtochat::model::optim::{OptimizerConfig, param_groups};
use femtochat::model::parity::{Fixture, rel_err, run};

fn path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/model/{name}.safetensors"))
}

fn check(name: &str) {
    let fx = Fixture::load(&path(name)).unwrap();
    let checks = run(&fx).unwrap();
    // logits, loss, window sizes, decode x2, and a gradient and a step per parameter.
    let n_params = fx.model().unwrap().params().len();
    assert_eq!(checks.len(), 5 + 2 * n_params, "{name}: every quantity compared");
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok()).collect();
    assert!(failed.is_empty(), "{name}: {failed:#?}");
}

#[test]
fn tiny_mha() {
    check("tiny_mha");
}

#[test]
fn gqa_window() {
    check("gqa_window");
}

#[test]
fn odd_shapes() {
    check("odd_shapes");
}

/// Our parameter groups are the reference's: same members, same learning rates.
#[test]
fn optimizer_groups_match_the_reference() {
    for name in ["tiny_mha", "gqa_window", "odd_shapes"] {
        let fx = Fixture::load(&path(name)).unwrap();
        let key = |mut names: Vec<String>, lr: f64| {
            names.sort();
            (names, (lr * 1e6).round() as i64)
        };
        let mut want: Vec<_> = fx.json["optimizer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                let names = g["params"].as_array().unwrap().iter();
                key(
                    names.map(|n| n.as_str().unwrap().to_string()).collect(),
                    g["lr"].as_f64().unwrap(),
                )
            })
            .collect();
        let mut got: Vec<_> = param_groups(&fx.config, &OptimizerConfig::default())
            .into_iter()
            .map(|g| key(g.params, g.lr as f64))
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{name}");
    }
}

/// Rows at different positions decode together (continuous batching: each request prefills in
/// its own cache, then joins the batch) and match decoding each alone.
#[test]
fn batched_decode_rows_at_different_positions() {
    batched_decode_on(femtochat::engine::Device::Cpu, 1e-6);
}

/// The same on the GPU (lavapipe in CI).
#[test]
fn batched_decode_rows_at_different_positions_on_gpu() {
    use femtochat::engine::Device;
    if let Err(e) = Device::Gpu.ensure_available() {
        assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
        return;
    }
    batched_decode_on(Device::Gpu, 1e-5);
}

fn batched_decode_on(device: femtochat::engine::Device, tol: f64) {
    let fx = Fixture::load(&path("gqa_window")).unwrap();
    let gpt = fx.model_on(device).unwrap();
    let tokens: Vec<u32> = (0..16).map(|i| (i * 37 % 300) as u32).collect();
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
    assert!(e < tol, "batched vs solo decode rel err {e}");
    assert_eq!((batch.position(0), batch.position(1)), (p1 + 1, p2 + 1));

    // A finished row leaves; the other keeps its position.
    let row0 = batch.take_row(0).unwrap();
    assert_eq!((row0.rows(), batch.rows(), batch.position(0)), (1, 1, p2 + 1));
    // A full cache is an error, not a panic.
    let long = Ids::new(vec![tokens[0]; 16], &[1, 16]).unwrap();
    assert!(gpt.forward_cached(&long, &mut batch).is_err());
}

/// Three MuonAdamW steps with base_train's LRs and per-step schedules (cautious weight decay,
/// momentum and NorMuon state all carried): every loss, gradient, update and parameter.
fn check_optim_steps(device: femtochat::engine::Device) {
    let fx = Fixture::load(&path("optim_steps")).unwrap();
    let checks = femtochat::model::parity::run_optim_steps(&fx, device).unwrap();
    let n_params = fx.model().unwrap().params().len();
    assert_eq!(n_params, 21);
    // Per step: the loss, then a gradient, an update and a parameter check per parameter.
    assert_eq!(checks.len(), 3 * (1 + 3 * n_params), "every tensor compared: {checks:#?}");
    assert_eq!(checks.iter().filter(|c| c.what.starts_with("update.")).count(), 3 * n_params);
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok()).collect();
    assert!(failed.is_empty(), "optim_steps on {device}: {failed:#?}");
    let worst = checks
        .iter()
        .filter(|c| c.what.starts_with("update."))
        .map(|c| c.rel_err)
        .fold(0.0, f64::max);
    eprintln!("optim_steps on {device}: worst update rel err {worst:.2e}");
}

#[test]
fn optim_steps() {
    check_optim_steps(femtochat::engine::Device::Cpu);
}

#[test]
fn optim_steps_on_gpu() {
    use femtochat::engine::Device;
    if let Err(e) = Device::Gpu.ensure_available() {
        assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
        return;
    }
    check_optim_steps(Device::Gpu);
}

/// A prefill that computes logits for the last position only gives the last position of the
/// full cached forward's logits; rows forked from the prefilled row decode as fresh prefills do,
/// and decoding them leaves the original row untouched (they copy, not share, its keys).
#[test]
fn last_position_prefill_and_forked_rows() {
    last_position_and_fork_on(femtochat::engine::Device::Cpu, 1e-6);
}

#[test]
fn last_position_prefill_and_forked_rows_on_gpu() {
    use femtochat::engine::Device;
    if let Err(e) = Device::Gpu.ensure_available() {
        assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
        return;
    }
    last_position_and_fork_on(Device::Gpu, 1e-5);
}

fn last_position_and_fork_on(device: femtochat::engine::Device, tol: f64) {
    let fx = Fixture::load(&path("gqa_window")).unwrap();
    let gpt = fx.model_on(device).unwrap();
    let v = gpt.config().vocab_size;
    let p = 7;
    let prompt: Vec<u32> = (0..p).map(|i| (i * 53 % 300) as u32).collect();
    let ids = Ids::new(prompt.clone(), &[1, p]).unwrap();
    let mut full_cache = KvCache::with_rows(gpt.config(), 1, 16);
    let full = gpt.forward_cached(&ids, &mut full_cache).unwrap().to_vec(); // (1, P, V)
    let mut cache = KvCache::with_rows(gpt.config(), 1, 16);
    let last = gpt.forward_cached_last(&ids, &mut cache).unwrap();
    assert_eq!(last.shape(), &[1, v]);
    let e = rel_err(&last.to_vec(), &full[(p - 1) * v..]);
    assert!(e < tol, "last-position prefill vs full forward rel err {e}");
    assert_eq!(cache.position(0), p);

    // One step after the prompt, solo: a fresh prefill per token.
    let solo = |tok: u32| {
        let mut c = KvCache::with_rows(gpt.config(), 1, 16);
        gpt.forward_cached_last(&ids, &mut c).unwrap();
        gpt.forward_cached(&Ids::new(vec![tok], &[1, 1]).unwrap(), &mut c).unwrap().to_vec()
    };
    let (a, b, d) = (11, 222, 5);
    let mut forks = cache.fork_row(0, 2).unwrap();
    assert_eq!((forks.rows(), forks.position(0), forks.position(1)), (2, p, p));
    let got = gpt.forward_cached(&Ids::new(vec![a, b], &[2, 1]).unwrap(), &mut forks).unwrap();
    let want: Vec<f32> = [solo(a), solo(b)].concat();
    let e = rel_err(&got.to_vec(), &want);
    assert!(e < tol, "forked rows vs fresh prefills rel err {e}");
    let got = gpt.forward_cached(&Ids::new(vec![d], &[1, 1]).unwrap(), &mut cache).unwrap();
    let e = rel_err(&got.to_vec(), &solo(d));
    assert!(e < tol, "the original row after its forks decoded: rel err {e}");
    assert!(cache.fork_row(1, 1).is_err());
}

/// The same fixtures with the model on the GPU (lavapipe in CI): logits, loss, every gradient,
/// one optimizer step and KV-cache decode within `TOL_GPU` of the PyTorch reference.
#[test]
fn fixtures_on_gpu() {
    use femtochat::engine::Device;
    if let Err(e) = Device::Gpu.ensure_available() {
        assert!(std::env::var("FEMTOCHAT_SKIP_GPU").as_deref() == Ok("1"), "{e}");
        return;
    }
    for name in ["tiny_mha", "gqa_window", "odd_shapes"] {
        let fx = Fixture::load(&path(name)).unwrap();
        let checks = femtochat::model::parity::run_on(&fx, Device::Gpu).unwrap();
        let failed: Vec<_> = checks.iter().filter(|c| !c.ok()).collect();
        assert!(failed.is_empty(), "{name} on gpu: {failed:#?}");
        let worst = checks.iter().map(|c| c.rel_err).fold(0.0, f64::max);
        eprintln!("{name} on gpu: {} checks, worst rel err {worst:.2e}", checks.len());
    }
}
